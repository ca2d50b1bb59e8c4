/*
 * store.c -- opening and creating stores, the lock, clients, garbage
 * collection of what dead processes left, crash recovery, statistics.
 *
 * Who may call: ds_open/ds_gc/ds_stats_get/ds_clients are public and take
 * hdr->lock themselves.  ds_rebuild runs with the lock held, right after a
 * locker got EOWNERDEAD.  ds_release_slot needs the lock; ds_teardown is
 * refs.c's, when a closed handle's last reference goes.
 *
 * Liveness.  A client slot is alive while an OFD write lock on byte
 * DS_LIVE_LOCK_BASE + slot of the index file is held (F_OFD_SETLK: owned
 * by an open file description, dropped by the kernel when the last fd of
 * it closes -- when the process dies).  gc asks F_OFD_GETLK; no pid, no
 * /proc, so a client in another PID namespace sharing the directory (a
 * container) is never taken for dead.  A slot is locked before its pid is
 * written and its pid cleared before the lock is dropped.  gc claims a
 * dead slot by taking its lock (then it is alive to every other process
 * while it is reaped, in slices, and cannot be taken by an attach).
 *
 * Files.  Created with O_EXCL | O_NOFOLLOW, mode 0600; an existing file is
 * opened with O_NOFOLLOW and refused (EACCES) unless it is a regular file
 * owned by the caller with no group/other permission bits.  create over a
 * file that is not a store (wrong magic) fails with DS_ECORRUPT: it is
 * never truncated.
 *
 * Creation is serialised with flock(LOCK_EX) on the index file; attachers
 * take LOCK_SH, so they see either no store or a fully initialised one.
 * A creator that dies half way leaves state != READY, and the next
 * creator initialises the file again.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "layout.h"
#include "sysdeps.h"

#define PAGE_ROUND(x) (((x) + 4095ull) & ~4095ull)
#define HEAP_MAX (0xFFFFFFF0ull * DS_UNIT)

uint64_t ds_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec;
}

static int file_trusted(int fd);

uint64_t ds_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

const char *ds_strerror(int rc) {
    switch (rc) {
    case 0: return "success";
    case DS_ENOTFOUND: return "no such object";
    case DS_EFULL: return "store is full";
    case DS_ECORRUPT: return "store metadata is corrupt";
    case DS_EVERSION: return "store was made by an incompatible version";
    case DS_ELIMIT: return "a fixed table of the store is full";
    case DS_EINVAL: return "invalid argument";
    case DS_ESTATE: return "object is in the wrong state for this call";
    case DS_ECLOSED: return "the store handle was closed";
    default: return rc > 0 ? strerror(rc) : "unknown error";
    }
}

int ds_back(ds_store *s, uint64_t off, uint64_t len) {
    if (len == 0) return 0;
    if (ds_fallocate(s->index_fd, 0, off, len) != 0) return errno == ENOSPC ? DS_EFULL : errno;
    return 0;
}

/* ---- clients ---- */

int ds_slot_lock(int fd, uint32_t slot) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET,
                       .l_start = (off_t)(DS_LIVE_LOCK_BASE + slot), .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : errno;
}

static void slot_unlock(int fd, uint32_t slot) {
    struct flock fl = {.l_type = F_UNLCK, .l_whence = SEEK_SET,
                       .l_start = (off_t)(DS_LIVE_LOCK_BASE + slot), .l_len = 1};
    fcntl(fd, F_OFD_SETLK, &fl);
}

/* Another open file description holds slot's lock: its process lives.
 * (Our own description's locks never conflict with us: never ask about
 * our own slot.) */
int ds_slot_alive(ds_store *s, uint32_t slot) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET,
                       .l_start = (off_t)(DS_LIVE_LOCK_BASE + slot), .l_len = 1};
    if (fcntl(s->index_fd, F_OFD_GETLK, &fl) != 0) return 1;   /* cannot tell: alive */
    return fl.l_type != F_UNLCK;
}

/* Take a free slot and lock it (lock held). */
static int client_register(ds_store *s) {
    ds_header *h = s->hdr;
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < h->max_clients; i++) {
            ds_client *c = DS_CLIENT(s, i);
            if (c->pid != 0) continue;
            int e = ds_slot_lock(s->index_fd, i);
            if (e == EAGAIN || e == EACCES) continue;   /* a reservation in flight */
            if (e) return e == EINVAL ? ENOTSUP : e;    /* no OFD locks here */
            memset(c, 0, sizeof *c);
            c->attach_ns = ds_now_ns();
            c->pid = s->pid;
            s->slot = i;
            return 0;
        }
        ds_gcinfo gi;
        ds_unlock(s);
        ds_gc(s, &gi);
        int rc = ds_lock(s);
        if (rc) return rc;
    }
    return DS_ELIMIT;
}

/* ---- the lock ---- */

static void ds_rebuild(ds_store *s);

int ds_lock(ds_store *s) {
    int rc = pthread_mutex_lock(&s->hdr->lock);
    if (rc == EOWNERDEAD) {
        ds_rebuild(s);
        s->hdr->recoveries++;
        pthread_mutex_consistent(&s->hdr->lock);
        return 0;
    }
    if (rc == ENOTRECOVERABLE) return DS_ECORRUPT;
    return rc;
}

/* Large values dropped in this critical section (object.c) and pages
 * freed past the warm cap (pool.c) are released and punched in slices,
 * each under a lock hold of its own. */
void ds_unlock(ds_store *s) {
    int more = ds_reap_flush(s);
    more |= ds_punch_flush(s);
    pthread_mutex_unlock(&s->hdr->lock);
    while (more) {
        ds_reap_pause();
        if (ds_lock(s) != 0) {
            ds_punch_forget();
            return;
        }
        more = ds_reap_flush(s);
        more |= ds_punch_flush(s);
        pthread_mutex_unlock(&s->hdr->lock);
    }
}

/* ---- open / create ---- */

static int init_store(ds_store *s, uint64_t capacity, uint64_t warm_bytes,
                      uint32_t ttl, const char *pool_path) {
    uint64_t cap_pages = (capacity + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE;
    if (cap_pages == 0 || cap_pages > 0xFFFFFFF0ull) return DS_EINVAL;
    uint64_t pbuckets = 256;
    while (pbuckets < cap_pages / 2) pbuckets <<= 1;
    uint64_t heap = PAGE_ROUND(capacity + (64ull << 20));
    if (heap > HEAP_MAX) heap = HEAP_MAX & ~4095ull;
    uint64_t xbuckets = 1024;
    while (xbuckets < heap / 256 && xbuckets < (1ull << 31)) xbuckets <<= 1;

    uint64_t off = 4096;
    uint64_t clients_off = off;  off += PAGE_ROUND(DS_MAX_CLIENTS * sizeof(ds_client));
    uint64_t pmeta_off = off;    off += PAGE_ROUND(cap_pages * sizeof(ds_pmeta));
    uint64_t pbk_off = off;      off += PAGE_ROUND(pbuckets * 4);
    uint64_t used_off = off;     off += PAGE_ROUND((cap_pages + 63) / 64 * 8);
    uint64_t backed_off = off;   off += PAGE_ROUND((cap_pages + 63) / 64 * 8);
    uint64_t bbk_off = off;      off += PAGE_ROUND(xbuckets * 4);
    uint64_t kbk_off = off;      off += PAGE_ROUND(xbuckets * 4);
    uint64_t hints = 4096;
    while (hints < cap_pages / 2) hints <<= 1;
    uint64_t hints_off = off;    off += PAGE_ROUND(hints * sizeof(ds_hint));
    uint64_t heap_off = off;     off += heap;

    if (ftruncate(s->index_fd, (off_t)off) != 0) return errno;
    /* back the fixed part now: header, clients, bitmaps */
    int rc = ds_back(s, 0, pmeta_off);
    if (!rc) rc = ds_back(s, used_off, bbk_off - used_off);
    if (rc) return rc;

    /* the pool file: new, or left by a creator of ours that died (we hold
     * the index's LOCK_EX); a file that is not ours is refused */
    int pfd = open(pool_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (pfd < 0 && errno == EEXIST) pfd = open(pool_path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (pfd < 0) return errno == ELOOP ? EACCES : errno;
    int trust = file_trusted(pfd);
    if (trust) { close(pfd); return trust; }
    if (ftruncate(pfd, 0) != 0 || ftruncate(pfd, (off_t)(cap_pages * DS_PAGE_SIZE)) != 0) {
        int e = errno;
        close(pfd);
        return e;
    }
    s->pool_fd = pfd;
    s->ix_len = off;

    void *ix = mmap(NULL, off, PROT_READ | PROT_WRITE, MAP_SHARED, s->index_fd, 0);
    if (ix == MAP_FAILED) return errno;
    s->ix = ix;
    ds_header *h = s->hdr = (ds_header *)ix;
    memset(h, 0, sizeof *h);
    h->format = DS_FORMAT;
    h->page_size = DS_PAGE_SIZE;
    h->capacity = cap_pages * DS_PAGE_SIZE < capacity ? cap_pages * DS_PAGE_SIZE : capacity;
    h->cap_pages = (uint32_t)cap_pages;
    h->max_clients = DS_MAX_CLIENTS;
    int rrc = ds_getrandom(h->salt, sizeof h->salt);
    if (rrc == 0) rrc = ds_getrandom(h->uuid, sizeof h->uuid);
    if (rrc != 0) return rrc;
    h->index_size = off;
    h->clients_off = clients_off;
    h->pmeta_off = pmeta_off;
    h->used_off = used_off;
    h->backed_off = backed_off;
    h->heap_off = heap_off;
    h->heap_size = heap;
    h->warm_pages = warm_bytes / DS_PAGE_SIZE;
    h->hints_off = hints_off;
    h->hints_mask = (uint32_t)(hints - 1);
    h->hints_active = 4095;
    h->transit_ttl = ttl;
    h->heap_top = 1;
    h->gen_seq = 1;

    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&h->lock, &a);
    pthread_mutexattr_destroy(&a);

    ds_lhash *ts[3] = {&h->pages_ix, &h->blobs_ix, &h->keys_ix};
    uint64_t offs[3] = {pbk_off, bbk_off, kbk_off};
    uint64_t maxb[3] = {pbuckets, xbuckets, xbuckets};
    for (int i = 0; i < 3; i++) {
        ts[i]->buckets_off = offs[i];
        ts[i]->max_buckets = (uint32_t)maxb[i];
        ts[i]->backed = 0;
        ds_lh_reset(s, ts[i]);
        if (ts[i]->backed == 0) return DS_EFULL;
    }
    __atomic_store_n(&h->magic, DS_MAGIC, __ATOMIC_RELEASE);
    __atomic_store_n(&h->state, DS_ST_READY, __ATOMIC_RELEASE);
    return 0;
}

/* Check the immutable header against the file before trusting it. */
static int validate_header(const ds_header *h, uint64_t file_size) {
    if (h->magic != DS_MAGIC) return DS_ECORRUPT;
    if (h->format != DS_FORMAT || h->page_size != DS_PAGE_SIZE) return DS_EVERSION;
    if (h->state != DS_ST_READY) return DS_ECORRUPT;
    if (h->index_size != file_size || h->cap_pages == 0 ||
        h->max_clients != DS_MAX_CLIENTS) return DS_ECORRUPT;
    uint64_t offs[] = {h->clients_off, h->pmeta_off, h->used_off, h->backed_off, h->heap_off};
    uint64_t prev = 4096;
    for (unsigned i = 0; i < sizeof offs / sizeof offs[0]; i++) {
        if (offs[i] < prev || offs[i] >= file_size || (offs[i] & 4095)) return DS_ECORRUPT;
        prev = offs[i];
    }
    if (h->pmeta_off + (uint64_t)h->cap_pages * sizeof(ds_pmeta) > h->used_off) return DS_ECORRUPT;
    if (h->heap_off + h->heap_size > file_size) return DS_ECORRUPT;
    const ds_lhash *ts[3] = {&h->pages_ix, &h->blobs_ix, &h->keys_ix};
    for (int i = 0; i < 3; i++)
        if (ts[i]->buckets_off + (uint64_t)ts[i]->max_buckets * 4 > file_size ||
            ts[i]->buckets_off < h->pmeta_off || ts[i]->backed > (uint64_t)ts[i]->max_buckets * 4 ||
            ts[i]->level > 31)
            return DS_ECORRUPT;
    if (h->heap_top * DS_UNIT > h->heap_size || h->page_hwm > h->cap_pages) return DS_ECORRUPT;
    if (h->hints_mask == 0 || ((uint64_t)h->hints_mask & ((uint64_t)h->hints_mask + 1)) ||
        h->hints_off < h->pmeta_off ||
        h->hints_off + ((uint64_t)h->hints_mask + 1) * sizeof(ds_hint) > h->heap_off)
        return DS_ECORRUPT;
    return 0;
}

static void unmap_all(ds_store *s) {
    if (s->ix) munmap(s->ix, s->ix_len);
    if (s->ix_ro) munmap(s->ix_ro, s->ix_len);
    if (s->pool_rw) munmap(s->pool_rw, s->pool_len);
    if (s->pool_ro) munmap(s->pool_ro, s->pool_len);
    if (s->index_fd >= 0) close(s->index_fd);
    if (s->pool_fd >= 0) close(s->pool_fd);
    free(s->index_path);
}

/* A file of a store must be a regular file of ours that nobody else may
 * open: anything else was planted (or made by another user). */
static int file_trusted(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return errno;
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077)) return EACCES;
    return 0;
}

static int flock_retry(int fd, int op) {
    while (flock(fd, op) != 0)
        if (errno != EINTR) return errno;
    return 0;
}

int ds_open(const char *index_path, const char *pool_path, int create,
            uint64_t capacity, uint64_t warm_bytes, uint32_t transit_ttl,
            ds_store **out) {
    int rc = 0;
    ds_store *s = calloc(1, sizeof *s);
    if (!s) return ENOMEM;
    s->index_fd = s->pool_fd = -1;
    s->pid = (uint32_t)getpid();
    s->index_path = strdup(index_path);
    if (!s->index_path) { free(s); return ENOMEM; }

    /* Create with O_EXCL; an existing file is opened without following
     * links and must be ours (never adopted, never truncated otherwise). */
    int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW;
    s->index_fd = create ? open(index_path, flags | O_CREAT | O_EXCL, 0600) : -1;
    if (s->index_fd < 0 && (!create || errno == EEXIST))
        s->index_fd = open(index_path, flags);
    if (s->index_fd < 0) { rc = errno == ELOOP ? EACCES : errno; goto fail; }
    if ((rc = file_trusted(s->index_fd))) goto fail;
    struct stat st;
    if ((rc = flock_retry(s->index_fd, create ? LOCK_EX : LOCK_SH))) goto fail;
    if (fstat(s->index_fd, &st) != 0) { rc = errno; goto fail_unlock; }
    if (create) {
        int fresh = (uint64_t)st.st_size < sizeof(ds_header);
        if (!fresh) {
            ds_header probe;
            if (pread(s->index_fd, &probe, sizeof probe, 0) != (ssize_t)sizeof probe) { rc = EIO; goto fail_unlock; }
            /* magic 0: a creator died before it finished (init writes the
             * magic last); any other content is not a store of ours to reuse */
            if (probe.magic != DS_MAGIC && probe.magic != 0) { rc = DS_ECORRUPT; goto fail_unlock; }
            fresh = probe.magic == 0 || probe.state != DS_ST_READY;
        }
        if (fresh) {
            if (ftruncate(s->index_fd, 0) != 0) { rc = errno; goto fail_unlock; }
            rc = init_store(s, capacity, warm_bytes, transit_ttl, pool_path);
            if (rc) {
                /* leave nothing behind (we hold LOCK_EX; there was no store) */
                if (s->ix) { munmap(s->ix, s->ix_len); s->ix = NULL; }
                unlink(index_path);
                if (rc != EACCES) unlink(pool_path);   /* a refused pool file is not ours */
                goto fail_unlock;
            }
            munmap(s->ix, s->ix_len);
            s->ix = NULL;
            close(s->pool_fd);
            s->pool_fd = -1;
            if (fstat(s->index_fd, &st) != 0) { rc = errno; goto fail_unlock; }
        }
    } else if ((uint64_t)st.st_size < sizeof(ds_header)) {
        rc = ENOENT;   /* a creator died before initialising: no store here */
        goto fail_unlock;
    }
    flock(s->index_fd, LOCK_UN);

    s->ix_len = (uint64_t)st.st_size;
    s->ix = mmap(NULL, s->ix_len, PROT_READ | PROT_WRITE, MAP_SHARED, s->index_fd, 0);
    if (s->ix == MAP_FAILED) { s->ix = NULL; rc = errno; goto fail; }
    s->hdr = (ds_header *)s->ix;
    rc = validate_header(s->hdr, s->ix_len);
    if (rc) goto fail;
    s->ix_ro = mmap(NULL, s->ix_len, PROT_READ, MAP_SHARED, s->index_fd, 0);
    if (s->ix_ro == MAP_FAILED) { s->ix_ro = NULL; rc = errno; goto fail; }

    s->pool_fd = open(pool_path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (s->pool_fd < 0) { rc = errno == ENOENT ? DS_ECORRUPT : errno == ELOOP ? EACCES : errno; goto fail; }
    if ((rc = file_trusted(s->pool_fd))) goto fail;
    if (fstat(s->pool_fd, &st) != 0) { rc = errno; goto fail; }
    s->pool_len = (uint64_t)s->hdr->cap_pages * DS_PAGE_SIZE;
    if ((uint64_t)st.st_size != s->pool_len) { rc = DS_ECORRUPT; goto fail; }
    s->pool_rw = mmap(NULL, s->pool_len, PROT_READ | PROT_WRITE, MAP_SHARED, s->pool_fd, 0);
    if (s->pool_rw == MAP_FAILED) { s->pool_rw = NULL; rc = errno; goto fail; }
    s->pool_ro = mmap(NULL, s->pool_len, PROT_READ, MAP_SHARED, s->pool_fd, 0);
    if (s->pool_ro == MAP_FAILED) { s->pool_ro = NULL; rc = errno; goto fail; }

    ds_hash_init(s);
    pthread_mutex_init(&s->pin_mu, NULL);
    s->refs = 1;
    s->fork_fd = -1;
    s->fork_slot = DS_NIL;
    rc = ds_lock(s);
    if (rc) goto fail_mu;
    rc = client_register(s);
    ds_unlock(s);
    if (rc) goto fail_mu;
    ds_refs_add(s);
    *out = s;
    return 0;

fail_mu:
    pthread_mutex_destroy(&s->pin_mu);
    goto fail;
fail_unlock:
    flock(s->index_fd, LOCK_UN);
fail:
    unmap_all(s);
    free(s);
    return rc;
}

void ds_uuid(ds_store *s, uint8_t out[16]) { memcpy(out, s->hdr->uuid, 16); }

/* Release what one chunk holds for the clients in 'dead' (a bitmap of
 * slots) -- a handle, an object it was creating, a merge record -- or, if
 * 'ttl_now' is not 0, a transit handle older than the TTL.  Lock held. */
#define DEAD(h, dead, slot) \
    ((slot) < (h)->max_clients && ((dead)[(slot) >> 6] >> ((slot) & 63) & 1))
static void release_chunk(ds_store *s, uint32_t id, const uint64_t *dead, uint64_t ttl_now,
                          ds_gcinfo *gi) {
    ds_header *h = s->hdr;
    ds_chunk *c = DS_CHUNK_RAW(s, id);
    if (c->kind == DS_K_HANDLE) {
        ds_handle *hd = (ds_handle *)c;
        int expired = ttl_now && hd->owner == DS_TRANSIT_OWNER &&
                      hd->stamp + h->transit_ttl <= ttl_now;
        if (!expired && !DEAD(h, dead, hd->owner)) return;
        uint32_t obj = hd->obj;
        if (hd->owner == DS_TRANSIT_OWNER) h->transit--;
        ds_chunk_free(s, id);
        h->handles--;
        ds_object_decref(s, obj);
        if (expired) gi->transit_expired++;
        else gi->handles_released++;
    } else if (c->kind == DS_K_OBJECT && ((ds_object *)c)->state == DS_OBJ_CREATED &&
               DEAD(h, dead, ((ds_object *)c)->owner)) {
        ds_object_free(s, id);
        gi->objects_reclaimed++;
    } else if (c->kind == DS_K_BLOB && (c->flags & DS_BF_REAP) && c->refcnt == 0 &&
               DEAD(h, dead, c->next)) {
        ds_blob_release_all(s, id);          /* its releaser died between slices */
    } else if (c->kind == DS_K_MERGE && DEAD(h, dead, ((ds_pending *)c)->owner)) {
        ds_pending *mg = (ds_pending *)c;
        for (uint32_t k = 0, n = ds_list_len(mg); k < n; k++)
            if (mg->pages[k] != DS_ZERO) ds_page_decref(s, mg->pages[k]);
        h->mergeable_pages -= h->mergeable_pages >= mg->npages ? mg->npages : h->mergeable_pages;
        ds_chunk_free(s, id);
    }
}

static void free_slots(ds_store *s, const uint64_t *dead) {
    for (uint32_t i = 0; i < s->hdr->max_clients; i++)
        if (DEAD(s->hdr, dead, i)) memset(DS_CLIENT(s, i), 0, sizeof(ds_client));
}

/* Everything 'slot' holds, in one walk of the heap; then free the slot.
 * Lock held (a fork that could not finish gives back its child's slot). */
void ds_release_slot(ds_store *s, uint32_t slot) {
    uint64_t dead[DS_MAX_CLIENTS / 64] = {0};
    ds_gcinfo gi = {0};
    if (slot >= DS_MAX_CLIENTS) return;
    dead[slot >> 6] |= 1ull << (slot & 63);
    DS_FOR_CHUNKS(s, id, c) release_chunk(s, (uint32_t)id, dead, 0, &gi);
    free_slots(s, dead);
}

/* The same for gc and close, without holding the lock for the whole walk:
 * GC_SLICE chunks per lock hold.  Chunks never move, split or merge, so a
 * chunk position stays a chunk position between two holds.  The caller
 * holds the OFD slot lock of every dead slot (ds_gc claims them; a closing
 * process holds its own): no other process reaps them, and no attach
 * takes them, until the walk is over and the slots are free.  If we die
 * mid-walk, the claims go with us and the next gc walks again (releasing
 * is idempotent: what was released is gone).  No lock held on entry or
 * exit; 0 or an error of ds_lock. */
#define GC_SLICE 8192u
static int release_sliced(ds_store *s, const uint64_t *dead, uint64_t ttl_now, ds_gcinfo *gi) {
    uint64_t id = 1;
    for (;;) {
        int rc = ds_lock(s);
        if (rc) return rc;
        for (uint32_t n = 0; n < GC_SLICE && id < s->hdr->heap_top; n++) {
            uint64_t next = ds_chunk_next(s, id);
            if (!next) { id = s->hdr->heap_top; break; }
            release_chunk(s, (uint32_t)id, dead, ttl_now, gi);
            id = next;
        }
        int done = id >= s->hdr->heap_top;
        if (done) free_slots(s, dead);
        ds_unlock(s);
        if (done) return 0;
    }
}

/* Last reference to the handle gone (refs.c): give back the slot and
 * everything it holds, then the mappings. */
void ds_teardown(ds_store *s) {
    if (!s->orphan && s->pid == (uint32_t)getpid()) {
        uint64_t self[DS_MAX_CLIENTS / 64] = {0};
        ds_gcinfo gi = {0};
        self[s->slot >> 6] |= 1ull << (s->slot & 63);
        release_sliced(s, self, 0, &gi);     /* if it fails, the next gc reaps the slot */
        slot_unlock(s->index_fd, s->slot);
    }
    unmap_all(s);
    free(s->pins);
    pthread_mutex_destroy(&s->pin_mu);
    free(s);
}

/* ---- gc ---- */

/* Reap dead clients: claim each dead slot (take its OFD lock: then it is
 * ours to reap and nobody else's), release what they held in slices,
 * free the slots, let go of the claims.  One reaping thread per process
 * (gc_busy); a gc that finds one running returns at once. */
int ds_gc(ds_store *s, ds_gcinfo *out) {
    ds_header *h = s->hdr;
    memset(out, 0, sizeof *out);
    int rc = ds_enter(s);
    if (rc) return rc;
    if (__atomic_exchange_n(&s->gc_busy, 1, __ATOMIC_ACQUIRE)) { ds_leave(s); return 0; }
    if ((rc = ds_lock(s))) goto out;
    uint64_t dead[DS_MAX_CLIENTS / 64] = {0};
    for (uint32_t i = 0; i < h->max_clients; i++) {
        ds_client *c = DS_CLIENT(s, i);
        if (c->pid == 0 || i == s->slot || ds_slot_alive(s, i)) continue;
        if (ds_slot_lock(s->index_fd, i) != 0) continue;   /* came alive, or being reaped */
        dead[i >> 6] |= 1ull << (i & 63);
        out->dead_clients++;
    }
    uint64_t now = ds_now_s();
    uint64_t every = h->transit_ttl / 8 < 60 ? h->transit_ttl / 8 : 60;
    int transit_due = h->transit && now >= h->transit_walk + every;   /* not on every gc */
    if (transit_due) h->transit_walk = now;
    h->reaped_clients += out->dead_clients;
    h->gc_runs++;
    ds_unlock(s);
    if (out->dead_clients || transit_due)
        rc = release_sliced(s, dead, transit_due ? now : 0, out);
    for (uint32_t i = 0; i < DS_MAX_CLIENTS; i++)
        if (DEAD(h, dead, i)) slot_unlock(s->index_fd, i);
out:
    __atomic_store_n(&s->gc_busy, 0, __ATOMIC_RELEASE);
    ds_leave(s);
    return rc;
}

void ds_client_self(ds_store *s, uint32_t *slot, uint64_t *attach_ns) {
    *slot = s->slot;
    *attach_ns = __atomic_load_n(&DS_CLIENT(s, s->slot)->attach_ns, __ATOMIC_RELAXED);
}

int ds_client_alive(ds_store *s, uint32_t slot, uint64_t attach_ns) {
    if (slot >= DS_MAX_CLIENTS || ds_enter(s)) return 0;
    int alive = 0;
    if (ds_lock(s) == 0) {
        ds_client *c = DS_CLIENT(s, slot);
        alive = c->pid != 0 && c->attach_ns == attach_ns && (slot == s->slot || ds_slot_alive(s, slot));
        ds_unlock(s);
    }
    ds_leave(s);
    return alive;
}

int ds_clients(ds_store *s, ds_clientinfo *out, uint32_t n, uint32_t *count) {
    int rc = ds_enter(s);
    if (rc) return rc;
    if ((rc = ds_lock(s))) { ds_leave(s); return rc; }
    uint32_t k = 0;
    for (uint32_t i = 0; i < s->hdr->max_clients && k < n; i++) {
        ds_client *c = DS_CLIENT(s, i);
        if (c->pid == 0) continue;
        out[k].slot = i;
        out[k].pid = c->pid;
        out[k].handles = c->handles;
        out[k].merged_pages = c->merged_pages;
        out[k].attach_ns = c->attach_ns;
        k++;
    }
    ds_unlock(s);
    ds_leave(s);
    *count = k;
    return 0;
}

int ds_stats_get(ds_store *s, ds_stats *o) {
    ds_header *h = s->hdr;
    int rc = ds_enter(s);
    if (rc) return rc;
    if ((rc = ds_lock(s))) { ds_leave(s); return rc; }
    o->capacity = h->capacity;
    o->objects = h->objects;
    o->keys = h->keys;
    o->logical_bytes = h->logical_bytes;
    o->physical_bytes = h->pages_used * DS_PAGE_SIZE + h->small_bytes;
    o->metadata_bytes = h->meta_bytes + (uint64_t)h->page_hwm * sizeof(ds_pmeta) +
                        4ull * (h->pages_ix.count + h->blobs_ix.count + h->keys_ix.count) / 2;
    o->pages_used = h->pages_used;
    o->pages_shared = h->pages_shared;
    o->pages_sharing = h->pages_sharing;
    o->pages_zero = h->pages_zero;
    o->pages_free_warm = h->warm_free;
    o->small_bytes = h->small_bytes;
    o->handles = h->handles;
    o->gc_runs = h->gc_runs;
    o->recoveries = h->recoveries;
    o->reaped_clients = h->reaped_clients;
    uint64_t nc = 0;
    o->pages_volatile = o->pages_unshared = o->pages_merged = 0;
    for (uint32_t i = 0; i < h->max_clients; i++) {
        ds_client *c = DS_CLIENT(s, i);
        if (!c->pid) continue;
        nc++;
        o->pages_volatile += c->volatile_pages;
        o->pages_unshared += c->unshared_pages;
        o->pages_merged += c->merged_pages;
    }
    o->clients = nc;
    o->full_scans = h->full_scans;
    o->pages_scanned = h->pages_scanned;
    o->merger_cpu_ns = h->merger_cpu_ns;
    ds_unlock(s);
    ds_leave(s);
    return 0;
}

/* ---- crash recovery ----
 * The previous lock owner died inside a critical section.  Primary
 * records (objects, blobs, pending lists, handles, clients) were written
 * in an order that leaves each one either absent or complete; everything
 * derived from them is recomputed here:
 *  1. heap free lists (walk the heap);
 *  2. object refcounts = handles + key binding; blob refcounts = objects;
 *  3. page refcounts = references from live blobs and pending lists;
 *     pages of dedup-allowed sealed blobs are (re)published by content;
 *  4. the key index, the small-blob index, the free-page bitmap, counters;
 *  5. orphans (unreferenced blobs, pending lists, dangling handles, sealed
 *     objects nobody references) are freed.
 */
static void ds_rebuild(ds_store *s) {
    ds_header *h = s->hdr;
    ds_heap_rebuild_free(s);
    uint64_t *used = (uint64_t *)(s->ix + h->used_off);
    uint64_t *backed = (uint64_t *)(s->ix + h->backed_off);
    uint32_t hwm = h->page_hwm;
    for (uint32_t p = 0; p < hwm; p++) {
        DS_PMETA(s, p)->refcnt = 0;
        DS_PMETA(s, p)->next = DS_UNHASHED;
    }
    ds_lh_reset(s, &h->pages_ix);
    ds_lh_reset(s, &h->blobs_ix);
    ds_lh_reset(s, &h->keys_ix);
    h->objects = h->keys = h->logical_bytes = h->small_bytes = h->handles = 0;
    h->pages_used = h->pages_shared = h->pages_sharing = h->pages_zero = 0;
    h->transit = 0;
    h->mergeable_pages = 0;
    for (uint32_t i = 0; i < h->max_clients; i++) DS_CLIENT(s, i)->handles = 0;

    /* pass 0: zero chunk refcounts */
    DS_FOR_CHUNKS(s, id, c) { c->refcnt = 0; }
    /* pass 1: handles and key bindings count on objects */
    DS_FOR_CHUNKS(s, id, c) {
        if (c->kind == DS_K_HANDLE) {
            ds_handle *hd = (ds_handle *)c;
            ds_object *o = ds_chunk_get(s, hd->obj, DS_K_OBJECT) ? (ds_object *)DS_CHUNK(s, hd->obj) : NULL;
            if (!o || o->gen != hd->gen || o->state != DS_OBJ_SEALED ||
                (hd->owner != DS_TRANSIT_OWNER && hd->owner >= h->max_clients)) {
                ds_chunk_free(s, (uint32_t)id);
                continue;
            }
            o->h.refcnt++;
            h->handles++;
            if (hd->owner == DS_TRANSIT_OWNER) h->transit++;
            else DS_CLIENT(s, hd->owner)->handles++;
        } else if (c->kind == DS_K_OBJECT) {
            ds_object *o = (ds_object *)c;
            if (o->state == DS_OBJ_SEALED && (o->oflags & DS_OF_KEYED)) o->h.refcnt++;
        }
    }
    /* pass 2: objects count on blobs / pending lists; keys are indexed */
    DS_FOR_CHUNKS(s, id, c) {
        if (c->kind != DS_K_OBJECT) continue;
        ds_object *o = (ds_object *)c;
        int inl = (o->oflags & DS_OF_INLINE) && !o->blob && o->size <= DS_INLINE_MAX &&
                  ds_class_bytes(c->cls) >= DS_OBJ_BYTES(o->keylen, (uint64_t)o->desclen + o->size);
        if (o->state == DS_OBJ_SEALED && (inl || ds_chunk_get(s, o->blob, DS_K_BLOB))) {
            if (inl) h->small_bytes += ds_class_bytes(c->cls);
            else DS_CHUNK(s, o->blob)->refcnt++;
            h->objects++;
            h->logical_bytes += o->size;
            if (o->oflags & DS_OF_KEYED) {
                /* a crash mid-replace may leave two bindings: keep the newer */
                uint32_t other = DS_NIL;
                for (uint32_t x = ds_lh_first(s, &h->keys_ix, o->h.fp); x != DS_NIL;
                     x = DS_CHUNK(s, x)->next) {
                    ds_object *ox = (ds_object *)DS_CHUNK(s, x);
                    if (ox->keylen == o->keylen && memcmp(ox->key, o->key, o->keylen) == 0) { other = x; break; }
                }
                if (other != DS_NIL) {
                    ds_object *ox = (ds_object *)DS_CHUNK(s, other);
                    ds_object *loser = ox->gen < o->gen ? ox : o;
                    if (loser == ox) { ds_lh_remove(s, &h->keys_ix, &ds_chunk_ops, other); h->keys--; }
                    loser->oflags &= (uint8_t)~DS_OF_KEYED;
                    loser->h.refcnt--;
                    if (loser == o) continue;
                }
                ds_lh_insert(s, &h->keys_ix, &ds_chunk_ops, (uint32_t)id);
                h->keys++;
            }
        } else if (o->state == DS_OBJ_CREATED) {
            o->oflags &= (uint8_t)~DS_OF_INLINE;
            if (o->blob && ds_chunk_get(s, o->blob, DS_K_PENDING)) DS_CHUNK(s, o->blob)->refcnt = 1;
            else o->blob = 0;
        } else {
            o->state = DS_OBJ_CREATED;   /* torn: let gc reclaim it */
            o->oflags &= (uint8_t)~DS_OF_INLINE;
            o->blob = 0;
        }
    }
    /* pass 3: blobs and pending lists count on pages */
    DS_FOR_CHUNKS(s, id, c) {
        if (c->kind == DS_K_BLOB) {
            ds_blob *b = (ds_blob *)c;
            if (b->h.refcnt == 0) { ds_chunk_free(s, (uint32_t)id); continue; }
            if (b->h.flags & DS_BF_SMALL) {
                h->small_bytes += ds_class_bytes(c->cls);
                if (b->h.flags & DS_BF_HASHED) ds_lh_insert(s, &h->blobs_ix, &ds_chunk_ops, (uint32_t)id);
                continue;
            }
            uint32_t *ext = (uint32_t *)ds_blob_payload(b), runs = ds_blob_runs(b);
            for (uint32_t e = 0; e < runs; e++) {
                uint32_t pg = ext[2 * e], np = ext[2 * e + 1];
                if (pg == DS_ZERO) { h->pages_zero += np; continue; }
                for (uint32_t k = 0; k < np && pg + k < hwm; k++) {
                    ds_pmeta *m = DS_PMETA(s, pg + k);
                    m->refcnt++;
                    if (!(b->h.flags & DS_BF_NODEDUP) && m->next == DS_UNHASHED)
                        ds_page_publish(s, pg + k, ds_hash_bytes(s, DS_POOL_RO(s, pg + k), DS_PAGE_SIZE));
                }
            }
        } else if (c->kind == DS_K_MERGE) {
            ds_pending *mg = (ds_pending *)c;
            if (mg->owner >= h->max_clients || DS_CLIENT(s, mg->owner)->pid == 0) {
                ds_chunk_free(s, (uint32_t)id);
                continue;
            }
            h->mergeable_pages += mg->npages;
            for (uint32_t k = 0, n = ds_list_len(mg); k < n; k++) {
                uint32_t pg = mg->pages[k];
                if (pg == DS_ZERO || pg >= hwm) continue;
                /* not re-published: a merger may still be filling a page it
                 * promotes; it publishes the page itself when done */
                DS_PMETA(s, pg)->refcnt++;
            }
        } else if (c->kind == DS_K_PENDING) {
            if (c->refcnt == 0) { ds_chunk_free(s, (uint32_t)id); continue; }
            ds_pending *pd = (ds_pending *)c;
            for (uint32_t k = 0, n = ds_list_len(pd); k < n; k++)
                if (pd->pages[k] != DS_ZERO && pd->pages[k] < hwm) DS_PMETA(s, pd->pages[k])->refcnt++;
        }
    }
    /* pages: bitmap and counters; free pages beyond the warm budget are punched */
    h->warm_free = 0;
    for (uint32_t p = 0; p < hwm; p++) {
        ds_pmeta *m = DS_PMETA(s, p);
        uint64_t bit = 1ull << (p & 63);
        if (m->refcnt) {
            used[p >> 6] |= bit;
            h->pages_used++;
            if (m->refcnt >= 2) { h->pages_shared++; h->pages_sharing += m->refcnt - 1; }
        } else {
            used[p >> 6] &= ~bit;
            if (backed[p >> 6] & bit) {
                /* warm: decays from now (its freed time is lost with the crash) */
                if (h->warm_free < h->warm_pages) { h->warm_free++; m->fp = ds_now_ms32(); }
                else {
                    ds_fallocate(s->pool_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 (uint64_t)p * DS_PAGE_SIZE, DS_PAGE_SIZE);
                    backed[p >> 6] &= ~bit;
                }
            }
        }
    }
    h->alloc_hint = 0;
    /* sealed objects nobody references any more */
    DS_FOR_CHUNKS(s, id, c) {
        if (c->kind == DS_K_OBJECT && ((ds_object *)c)->state == DS_OBJ_SEALED && c->refcnt == 0)
            ds_object_free(s, (uint32_t)id);
    }
}
