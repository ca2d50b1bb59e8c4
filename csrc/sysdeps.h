/*
 * sysdeps.h -- the kernel and libc interfaces newer than the oldest
 * system a wheel is built on (manylinux2014: glibc 2.17, kernel 3.10
 * headers), defined here so the core compiles against old headers.
 * Every definition is guarded (#ifndef): the system's wins where present.
 * Whether the running kernel has the feature is found out at run time
 * (the calls fail with ENOSYS/EINVAL and the caller falls back):
 *   - userfaultfd write-protection (5.7; of shmem pages 5.19): wp.c uses
 *     mprotect when the syscall or the UFFDIO_API features are refused;
 *   - getrandom (3.17, glibc 2.25): ds_getrandom reads /dev/urandom when
 *     the syscall is missing;
 *   - OFD locks (3.15), MADV_POPULATE_WRITE (5.14): callers check errors.
 * Values are the kernel's UAPI (they do not differ between x86-64 and
 * arm64).  DEDUPSHM_OWN_UFFD_H uses our userfaultfd definitions even when
 * <linux/userfaultfd.h> exists (CI builds that way once, to test them).
 * Internal: include after the system headers; not part of the ABI.
 */
#ifndef DS_SYSDEPS_H
#define DS_SYSDEPS_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- syscall numbers ---- */
#ifndef SYS_userfaultfd
# if defined(__x86_64__)
#  define SYS_userfaultfd 323
# elif defined(__aarch64__)
#  define SYS_userfaultfd 282
# else
#  define SYS_userfaultfd (-1)      /* unknown here: syscall() fails with ENOSYS */
# endif
#endif
#ifndef SYS_getrandom
# if defined(__x86_64__)
#  define SYS_getrandom 318
# elif defined(__aarch64__)
#  define SYS_getrandom 278
# else
#  define SYS_getrandom (-1)
# endif
#endif

/* ---- fcntl / fallocate / madvise ---- */
#ifndef F_OFD_GETLK
# define F_OFD_GETLK 36
#endif
#ifndef F_OFD_SETLK
# define F_OFD_SETLK 37
#endif
#ifndef F_OFD_SETLKW
# define F_OFD_SETLKW 38
#endif
#ifndef FALLOC_FL_KEEP_SIZE
# define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
# define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef MADV_POPULATE_WRITE
# define MADV_POPULATE_WRITE 23
#endif

/* ---- userfaultfd ---- */
#if !defined(DEDUPSHM_OWN_UFFD_H) && defined(__has_include)
# if __has_include(<linux/userfaultfd.h>)
#  include <linux/userfaultfd.h>
#  define DS_SYS_UFFD_H 1
# endif
#endif

#ifndef DS_SYS_UFFD_H
/* headers older than 4.3: the whole interface (include/uapi/linux/userfaultfd.h) */
#define UFFD_API ((uint64_t)0xAA)
#define UFFDIO 0xAA
#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFDIO_REGISTER_MODE_MISSING ((uint64_t)1 << 0)
struct uffdio_range { uint64_t start, len; };
struct uffdio_api { uint64_t api, features, ioctls; };
struct uffdio_register { struct uffdio_range range; uint64_t mode, ioctls; };
struct uffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct { uint64_t flags, address; union { uint32_t ptid; } feat; } pagefault;
        struct { uint64_t reserved1, reserved2, reserved3; } reserved;
    } arg;
} __attribute__((packed));
#define UFFDIO_REGISTER _IOWR(UFFDIO, 0x00, struct uffdio_register)
#define UFFDIO_WAKE _IOR(UFFDIO, 0x02, struct uffdio_range)
#define UFFDIO_API _IOWR(UFFDIO, 0x3F, struct uffdio_api)
#endif

#ifndef UFFDIO_WRITEPROTECT_MODE_WP
/* headers older than 5.7: write-protection */
struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
#define UFFDIO_WRITEPROTECT_MODE_WP ((uint64_t)1 << 0)
#define UFFDIO_WRITEPROTECT _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)
#endif
#ifndef UFFDIO_REGISTER_MODE_WP
# define UFFDIO_REGISTER_MODE_WP ((uint64_t)1 << 1)
#endif
#ifndef UFFD_FEATURE_PAGEFAULT_FLAG_WP
# define UFFD_FEATURE_PAGEFAULT_FLAG_WP ((uint64_t)1 << 0)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
/* headers older than 5.19 */
# define UFFD_FEATURE_WP_HUGETLBFS_SHMEM ((uint64_t)1 << 12)
#endif

_Static_assert(sizeof(struct uffd_msg) == 32, "userfaultfd message is 32 bytes");

/* ---- random bytes ---- */
/* Fill buf with n bytes from the kernel's CSPRNG: getrandom(2), or
 * /dev/urandom where the kernel has no getrandom.  0 or an errno. */
static inline int ds_getrandom(void *buf, size_t n) {
    uint8_t *p = buf;
    size_t got = 0;
    while (got < n) {
        long r = syscall(SYS_getrandom, p + got, n - got, 0);
        if (r > 0) { got += (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == ENOSYS) break;
        return r < 0 ? errno : EIO;
    }
    if (got == n) return 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r > 0) { got += (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        int e = r < 0 ? errno : EIO;
        close(fd);
        return e;
    }
    close(fd);
    return 0;
}

#endif
