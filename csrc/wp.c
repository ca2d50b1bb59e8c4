/*
 * wp.c -- write protection for the merger: keeping a page still while it
 * is compared and remapped.
 *
 * THE INVARIANT: a page is never compared-and-remapped while writable.
 * merger.c's scan_batch opens a merge window (ds_wp_open) over the pages
 * it means to merge, compares them with their pool pages, remaps the
 * equal ones (mmap MAP_FIXED of the pool file) and closes the window
 * (ds_wp_close).  Between open and close no write can land in a page of
 * the window, so the bytes compared are the bytes mapped.  If protecting
 * fails (mprotect's ENOMEM near vm.max_map_count: the resource merging
 * spends) ds_wp_open undoes what it did and fails, and the caller drops
 * the batch.
 *
 * Order inside a window, relied on by the SIGSEGV handler below:
 *   open:  publish the busy entry; g_seq++; protect.
 *   close: unprotect (or the page was remapped: a fresh writable
 *          mapping); g_seq++; clear the busy entry.
 * So a write that faults on a page of a window finds it busy, or finds a
 * newer g_seq than its previous fault at that address.
 *
 * Two mechanisms:
 *  - userfaultfd write-protection (UFFDIO_WRITEPROTECT), where available:
 *    a writer -- a thread of ours, or the kernel on our behalf (read(2)
 *    into the buffer) -- sleeps in the kernel; our fault thread wakes it
 *    once the page is no longer busy.  Nothing fails.
 *  - mprotect(PROT_READ), the fallback (no userfaultfd, no privilege,
 *    DEDUPSHM_NO_UFFD=1, or a mapping that could not be registered): a
 *    writing thread takes SIGSEGV; on_segv sees the page busy, waits, and
 *    returns, and the write is retried on the new mapping.  A system call
 *    that hits such a page fails with EFAULT instead (tens of
 *    microseconds of window).
 *
 * on_segv: a fault that no merge window caused is passed on -- to the
 * handler installed before ours, or to the default action (the process
 * dies with SIGSEGV).  A fault in our regions whose page is not busy may
 * still be ours: the window may have closed between the fault and the
 * handler's look.  It is retried once; a second fault at the same address
 * with g_seq unchanged (no window opened or closed in between) is
 * genuine, say a page the caller mprotect()ed itself.
 *
 * Fork: no fork may land inside a window.  merger.c's fork hooks take each
 * merger's mu (which a window is open only under); ds_wp_atfork_* take
 * g_wp_mu, and in the child clear the busy table and forget the parent's
 * userfaultfd (its fault thread is not inherited; the child sets up its
 * own at its next ds_wp_setup).
 *
 * Who calls, which lock:
 *  - ds_wp_setup: merger.c, with no merger mu held; takes g_wp_mu.
 *  - ds_wp_open / ds_wp_close: merger.c's scan, under that merger's mu.
 *  - ds_wp_uffd_register, ds_wp_region_add/del: any thread, any lock held;
 *    lock-free.
 *  - ds_wp_atfork_*: refs.c's atfork handlers (today merger.c's temporary
 *    one).  Lock order: g_wp_mu is never taken with a merger mu held, so
 *    g_wp_mu -> merger->mu (the fork order) cannot deadlock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "layout.h"
#include "sysdeps.h"
#include "wp.h"

#define MAX_REGIONS 4096
#define MAX_BUSY 16

static pthread_mutex_t g_wp_mu = PTHREAD_MUTEX_INITIALIZER;   /* setup below */

/* ---- the region table and the busy table (lock-free) ----
 * Regions: [lo, hi) of every live mergeable region of this process.  A
 * slot is claimed by a CAS of lo from 0, then hi is set; freed hi first.
 * A reader racing an update may see a bogus range for an instant: that
 * costs one retry of a genuine fault, never a wrong chain. */
static uintptr_t g_reg_lo[MAX_REGIONS], g_reg_hi[MAX_REGIONS];
/* Busy: the open merge windows (one per merger at most). */
static uintptr_t g_busy_lo[MAX_BUSY], g_busy_hi[MAX_BUSY];
/* Windows opened plus windows closed, ever. */
static uint64_t g_seq;

static int addr_busy(uintptr_t a) {
    for (int i = 0; i < MAX_BUSY; i++)
        if (a >= __atomic_load_n(&g_busy_lo[i], __ATOMIC_SEQ_CST) &&
            a < __atomic_load_n(&g_busy_hi[i], __ATOMIC_SEQ_CST))
            return 1;
    return 0;
}

static int addr_ours(uintptr_t a) {
    for (int i = 0; i < MAX_REGIONS; i++)
        if (a >= __atomic_load_n(&g_reg_lo[i], __ATOMIC_ACQUIRE) &&
            a < __atomic_load_n(&g_reg_hi[i], __ATOMIC_ACQUIRE))
            return 1;
    return 0;
}

int ds_wp_region_add(void *lo, uint64_t len) {
    for (int i = 0; i < MAX_REGIONS; i++) {
        uintptr_t zero = 0;
        if (__atomic_compare_exchange_n(&g_reg_lo[i], &zero, (uintptr_t)lo, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&g_reg_hi[i], (uintptr_t)lo + len, __ATOMIC_RELEASE);
            return 0;
        }
    }
    return DS_ELIMIT;
}

void ds_wp_region_del(void *lo) {
    for (int i = 0; i < MAX_REGIONS; i++) {
        if (__atomic_load_n(&g_reg_lo[i], __ATOMIC_ACQUIRE) == (uintptr_t)lo) {
            __atomic_store_n(&g_reg_hi[i], 0, __ATOMIC_RELEASE);
            __atomic_store_n(&g_reg_lo[i], 0, __ATOMIC_RELEASE);
            return;
        }
    }
}

static int busy_set(uintptr_t lo, uintptr_t hi) {
    for (;;) {
        for (int i = 0; i < MAX_BUSY; i++) {
            uintptr_t zero = 0;
            if (__atomic_compare_exchange_n(&g_busy_hi[i], &zero, hi, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                __atomic_store_n(&g_busy_lo[i], lo, __ATOMIC_SEQ_CST);
                return i;
            }
        }
        sched_yield();
    }
}

static void busy_clear(int i) {
    __atomic_store_n(&g_busy_lo[i], 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&g_busy_hi[i], 0, __ATOMIC_SEQ_CST);
}

/* ---- the SIGSEGV handler ---- */

static struct sigaction g_old_segv;
static int g_handler_installed;
/* This thread's last fault in our regions that found no busy page.
 * initial-exec: no TLS allocation (and no lock) inside a signal handler. */
static __thread struct { uintptr_t addr; uint64_t seq; } t_last __attribute__((tls_model("initial-exec")));

static void chain(int sig, siginfo_t *si, void *ctx) {
    struct sigaction *o = &g_old_segv;
    if ((o->sa_flags & SA_SIGINFO) && (void *)o->sa_sigaction != (void *)SIG_DFL &&
        (void *)o->sa_sigaction != (void *)SIG_IGN) {
        o->sa_sigaction(sig, si, ctx);
    } else if (!(o->sa_flags & SA_SIGINFO) && o->sa_handler != SIG_DFL && o->sa_handler != SIG_IGN) {
        o->sa_handler(sig);
    } else {
        /* the default action: a real fault repeats when we return and
         * kills us; a sent signal is sent again */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL);
        if (si->si_code <= 0) raise(sig);
    }
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    int saved = errno;
    uintptr_t a = (uintptr_t)si->si_addr & ~(uintptr_t)(DS_PAGE_SIZE - 1);
    if (si->si_code == SEGV_ACCERR && addr_ours(a)) {
        /* read g_seq BEFORE looking at the busy table (see the top) */
        uint64_t seq = __atomic_load_n(&g_seq, __ATOMIC_SEQ_CST);
        if (addr_busy(a)) {
            /* a write to a page being merged: wait, then retry the write */
            while (addr_busy(a)) sched_yield();
            t_last.addr = 0;
            errno = saved;
            return;
        }
        if (t_last.addr != a || t_last.seq != seq) {
            /* maybe a window that closed just now: retry once */
            t_last.addr = a;
            t_last.seq = seq;
            errno = saved;
            return;
        }
        /* the same fault again and no window in between: genuine */
    }
    t_last.addr = 0;
    errno = saved;
    chain(sig, si, ctx);
}

/* g_wp_mu held */
static int install_handler(void) {
    if (g_handler_installed) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &g_old_segv) != 0) return errno;
    g_handler_installed = 1;
    return 0;
}

/* ---- userfaultfd ---- */

static int g_uffd = -1;          /* this process's, or -1 */
static pid_t g_uffd_pid;
static int g_uffd_off;           /* unavailable or disabled: don't try again */
static int g_fail_every;         /* test hook: DEDUPSHM_TEST_WP_FAIL=k */
static unsigned g_protects;

static void *uffd_thread(void *arg) {
    int fd = (int)(intptr_t)arg;
    struct pollfd pfd = {fd, POLLIN, 0};
    for (;;) {
        if (poll(&pfd, 1, -1) < 0) {
            if (errno == EINTR) continue;
            return NULL;
        }
        struct uffd_msg msg;
        ssize_t got = read(fd, &msg, sizeof msg);
        if (got != (ssize_t)sizeof msg) {
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            return NULL;
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
        uintptr_t a = (uintptr_t)msg.arg.pagefault.address & ~(uintptr_t)(DS_PAGE_SIZE - 1);
        while (addr_busy(a)) sched_yield();
        struct uffdio_range rg = {a, DS_PAGE_SIZE};
        ioctl(fd, UFFDIO_WAKE, &rg);
    }
}

/* g_wp_mu held */
static int uffd_setup(void) {
    if (g_uffd >= 0 && g_uffd_pid == getpid()) return 1;
    if (g_uffd >= 0) { close(g_uffd); __atomic_store_n(&g_uffd, -1, __ATOMIC_RELEASE); }
    if (g_uffd_off) return 0;
    const char *env = getenv("DEDUPSHM_NO_UFFD");
    if (env && *env && *env != '0') { g_uffd_off = 1; return 0; }
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) { g_uffd_off = 1; return 0; }
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int ok = ioctl(fd, UFFDIO_API, &api) == 0 && (api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP) &&
             pthread_create(&th, &at, uffd_thread, (void *)(intptr_t)fd) == 0;
    pthread_attr_destroy(&at);
    if (!ok) { close(fd); g_uffd_off = 1; return 0; }
    g_uffd_pid = getpid();
    __atomic_store_n(&g_uffd, fd, __ATOMIC_RELEASE);
    return 1;
}

int ds_wp_setup(void) {
    pthread_mutex_lock(&g_wp_mu);
    int first = !g_handler_installed;
    int rc = install_handler();
    if (rc == 0) {
        if (first) {
            /* test hook: every k-th protect fails with ENOMEM */
            const char *f = getenv("DEDUPSHM_TEST_WP_FAIL");
            g_fail_every = f ? atoi(f) : 0;
        }
        uffd_setup();
    }
    pthread_mutex_unlock(&g_wp_mu);
    return rc;
}

int ds_wp_uffd_ready(void) {
    int fd = __atomic_load_n(&g_uffd, __ATOMIC_ACQUIRE);
    return fd >= 0 && g_uffd_pid == getpid();
}

int ds_wp_uffd_register(void *va, uint64_t len) {
    int fd = __atomic_load_n(&g_uffd, __ATOMIC_ACQUIRE);
    if (fd < 0 || g_uffd_pid != getpid() || !len) return 0;
    struct uffdio_register reg = {.range = {(uintptr_t)va, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    return ioctl(fd, UFFDIO_REGISTER, &reg) == 0;
}

const char *ds_merger_wp_mode(void) {
    pthread_mutex_lock(&g_wp_mu);
    int ok = uffd_setup();
    pthread_mutex_unlock(&g_wp_mu);
    return ok ? "userfaultfd" : "mprotect";
}

/* ---- merge windows ---- */

/* Protect (on) or release one run.  *uffd: the mechanism; protecting
 * falls back from userfaultfd to mprotect and says which it used. */
static int wp_run(uint8_t *a, uint64_t len, uint8_t *uffd, int on) {
    if (on && g_fail_every > 0 && __atomic_add_fetch(&g_protects, 1, __ATOMIC_RELAXED) % (unsigned)g_fail_every == 0)
        return ENOMEM;                               /* test hook: as near vm.max_map_count */
    if (*uffd) {
        int fd = __atomic_load_n(&g_uffd, __ATOMIC_ACQUIRE);
        struct uffdio_writeprotect wp = {.range = {(uintptr_t)a, len},
                                         .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
        if (fd >= 0 && ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0) return 0;
        if (!on) return errno;
        *uffd = 0;                                   /* protect by mprotect instead */
    }
    return mprotect(a, len, on ? PROT_READ : PROT_READ | PROT_WRITE) == 0 ? 0 : errno;
}

/* Lift the protection of run k's pages with still[] set (all if !still). */
static void release_run(ds_wp_window *w, uint32_t k, const uint8_t *still) {
    uint32_t f = w->runs[k].first, e = f + w->runs[k].len;
    for (uint32_t i = f; i < e;) {
        if (still && !still[i]) { i++; continue; }
        uint32_t j = i + 1;
        while (j < e && (!still || still[j])) j++;
        uint8_t u = w->runs[k].uffd;
        /* Restoring the protection the range had splits no mapping, so
         * this does not fail for want of map count; should it fail for
         * another reason, try again: a page left read-only would turn
         * its next write into a genuine-looking fault. */
        for (int tries = 0; tries < 1000 && wp_run(w->base + (uint64_t)i * DS_PAGE_SIZE,
                                                    (uint64_t)(j - i) * DS_PAGE_SIZE, &u, 0); tries++)
            sched_yield();
        i = j;
    }
}

int ds_wp_open(ds_wp_window *w, uint8_t *base, uint32_t n, const uint8_t *sel, const uint8_t *uffd) {
    w->base = base;
    w->n = n;
    w->nruns = 0;
    w->slot = busy_set((uintptr_t)base, (uintptr_t)base + (uint64_t)n * DS_PAGE_SIZE);
    __atomic_add_fetch(&g_seq, 1, __ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < n;) {
        if (!sel[i]) { i++; continue; }
        uint32_t j = i + 1;
        while (j < n && sel[j] && uffd[j] == uffd[i]) j++;
        uint8_t u = uffd[i];
        int rc = wp_run(base + (uint64_t)i * DS_PAGE_SIZE, (uint64_t)(j - i) * DS_PAGE_SIZE, &u, 1);
        if (rc) {                                    /* undo: the batch is dropped */
            ds_wp_close(w, NULL);
            return rc;
        }
        w->runs[w->nruns].first = i;
        w->runs[w->nruns].len = j - i;
        w->runs[w->nruns].uffd = u;
        w->nruns++;
        i = j;
    }
    return 0;
}

void ds_wp_close(ds_wp_window *w, const uint8_t *still) {
    for (uint32_t k = 0; k < w->nruns; k++) release_run(w, k, still);
    w->nruns = 0;
    __atomic_add_fetch(&g_seq, 1, __ATOMIC_SEQ_CST);
    busy_clear(w->slot);
}

/* ---- fork (called by refs.c's atfork handlers; see layout.h) ---- */

void ds_wp_atfork_prepare(void) {
    pthread_mutex_lock(&g_wp_mu);
}

void ds_wp_atfork_parent(void) {
    pthread_mutex_unlock(&g_wp_mu);
}

void ds_wp_atfork_child(void) {
    /* The mergers' fork hooks kept every window closed, so the busy table
     * is empty; clear it anyway: a busy entry inherited would make our
     * writers wait forever. */
    for (int i = 0; i < MAX_BUSY; i++) busy_clear(i);
    /* the parent's userfaultfd: its fault thread is not ours, and our
     * mappings are not registered with it; ds_wp_setup makes our own */
    if (g_uffd >= 0) close(g_uffd);
    __atomic_store_n(&g_uffd, -1, __ATOMIC_RELEASE);
    g_uffd_pid = 0;
    t_last.addr = 0;
    pthread_mutex_unlock(&g_wp_mu);
}
