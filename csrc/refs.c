/*
 * refs.c -- what this process holds: its references, the cells that own
 * them, the lifetime of a handle, and fork().
 *
 * References.  A process holds at most one shared HANDLE chunk per object
 * (object.c), and counts its own uses of it in a process-private table,
 * s->pins, under s->pin_mu.  Callers own uses through cells they allocate
 * before the call: a ds_ref (an ObjectRef) or a ds_viewinfo (a view, a
 * create buffer).  Every call that gives the caller something sets the
 * cell's ownership field (ds_ref.held, ds_viewinfo.own) as its last step,
 * under pin_mu, and every release clears it under pin_mu before releasing:
 * so a reference is always named by exactly one cell or by nothing, there
 * is no moment at which the caller's code runs with a reference that no
 * cell owns, and a release is idempotent.
 *
 * Lifetime.  s->refs counts the opener plus every cell that holds
 * something; s->inflight counts calls in progress.  ds_close sets
 * s->closed (new calls get DS_ECLOSED), waits for inflight to drain and
 * drops the opener's count; the handle -- its mappings, its client slot
 * and every reference of that slot -- goes when refs reaches 0
 * (ds_teardown), so a view or ObjectRef that outlives ds_close stays
 * valid.  Release calls (ds_ref_unpin, ds_view_close) work on a closed
 * handle: the cell's own count keeps it alive.
 *
 * fork().  One pthread_atfork handler covers every open handle (the list
 * g_stores, under g_stores_mu).  In the parent, before fork: each
 * handle's merger is stopped at a batch boundary (no merge window open),
 * pin_mu is taken (the table cannot change), and under hdr->lock a client
 * slot is reserved for the child and made alive by an OFD lock on a NEW
 * open file description of the index file (fork_fd); every HANDLE the
 * table names and every MERGE record is copied for that slot.  So the
 * child holds, before it runs any code, every reference its inherited
 * views, ObjectRefs and merged pages need -- whatever the parent deletes
 * afterwards.  After fork, the parent closes its copy of fork_fd: the
 * slot lives exactly as long as the child (or, if fork failed, dies at
 * once and gc reclaims it).  The child moves onto fork_fd (dup2 over
 * index_fd, so the parent's own slot lock is not the child's business),
 * adopts the slot and the copies.  A create buffer it inherited is
 * private memory (fork copied it); the object being filled stays the
 * parent's: put.c commits or aborts only objects of the caller's slot.  A handle that could not get a
 * slot is an orphan in the child: every call fails, releases do nothing.
 *
 * Lock order: g_stores_mu -> wp.c's global lock -> merger->mu -> pin_mu
 * -> hdr->lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "layout.h"

/* One object this process holds.  Empty slot: obj == 0. */
struct ds_pin {
    uint32_t obj;
    uint32_t handle;         /* our HANDLE chunk */
    uint64_t gen;
    uint64_t count;          /* cells holding it */
    uint32_t child_handle;   /* fork: the copy made for the child */
    uint32_t pad;
};

static pthread_mutex_t g_stores_mu = PTHREAD_MUTEX_INITIALIZER;
static ds_store *g_stores;
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

/* ---- lifetime ---- */

int ds_enter(ds_store *s) {
    __atomic_add_fetch(&s->inflight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->closed, __ATOMIC_SEQ_CST)) {
        ds_leave(s);
        return DS_ECLOSED;
    }
    if (s->orphan) {
        ds_leave(s);
        return DS_ELIMIT;
    }
    return 0;
}

void ds_leave(ds_store *s) { __atomic_sub_fetch(&s->inflight, 1, __ATOMIC_RELEASE); }

static void ref_get(ds_store *s) { __atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED); }

static void ref_put(ds_store *s) {
    if (__atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0) ds_teardown(s);
}

/* ---- the pin table (pin_mu held) ---- */

static uint32_t pin_slot(const ds_store *s, uint32_t obj) {
    return (obj * 0x9E3779B1u) & (s->pin_cap - 1);
}

static struct ds_pin *pin_find(ds_store *s, uint32_t obj, uint64_t gen) {
    if (!s->pin_cap) return NULL;
    for (uint32_t i = pin_slot(s, obj);; i = (i + 1) & (s->pin_cap - 1)) {
        struct ds_pin *p = &s->pins[i];
        if (p->obj == 0) return NULL;
        if (p->obj == obj && p->gen == gen) return p;
    }
}

static struct ds_pin *pin_insert(ds_store *s, uint32_t obj, uint64_t gen) {
    if ((uint64_t)(s->pin_count + 1) * 2 > s->pin_cap) {
        uint32_t cap = s->pin_cap ? s->pin_cap * 2 : 64;
        struct ds_pin *old = s->pins, *tab = calloc(cap, sizeof *tab);
        if (!tab) return NULL;
        uint32_t ocap = s->pin_cap;
        s->pins = tab;
        s->pin_cap = cap;
        for (uint32_t i = 0; i < ocap; i++) {
            if (!old[i].obj) continue;
            uint32_t j = pin_slot(s, old[i].obj);
            while (tab[j].obj) j = (j + 1) & (cap - 1);
            tab[j] = old[i];
        }
        free(old);
    }
    uint32_t i = pin_slot(s, obj);
    while (s->pins[i].obj) i = (i + 1) & (s->pin_cap - 1);
    struct ds_pin *p = &s->pins[i];
    memset(p, 0, sizeof *p);
    p->obj = obj;
    p->gen = gen;
    s->pin_count++;
    return p;
}

/* Remove p, shifting later members of its probe run back (no tombstones). */
static void pin_remove(ds_store *s, struct ds_pin *p) {
    uint32_t mask = s->pin_cap - 1, i = (uint32_t)(p - s->pins);
    for (uint32_t j = (i + 1) & mask; s->pins[j].obj; j = (j + 1) & mask) {
        uint32_t home = pin_slot(s, s->pins[j].obj);
        /* can j move to i?  yes unless home lies cyclically in (i, j] */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            s->pins[i] = s->pins[j];
            i = j;
        }
    }
    memset(&s->pins[i], 0, sizeof s->pins[i]);
    s->pin_count--;
}

/* One more use of (obj, gen): a local count if we hold it, else a new
 * shared handle (the object must be live and not deleted). */
static int pin_take(ds_store *s, uint32_t obj, uint64_t gen) {
    struct ds_pin *p = pin_find(s, obj, gen);
    if (p) { p->count++; return 0; }
    uint32_t h;
    int rc = ds_acquire(s, obj, gen, &h);
    if (rc) return rc;
    if (!(p = pin_insert(s, obj, gen))) { ds_release(s, h); return ENOMEM; }
    p->handle = h;
    p->count = 1;
    return 0;
}

/* A fresh handle h on (obj, gen) becomes one use.  Returns a handle the
 * caller must release (we had one already), or 0; *rc = ENOMEM if the
 * table cannot grow (then h is returned to be released, and nothing held). */
static uint32_t pin_adopt(ds_store *s, uint32_t obj, uint64_t gen, uint32_t h, int *rc) {
    *rc = 0;
    struct ds_pin *p = pin_find(s, obj, gen);
    if (p) { p->count++; return h; }
    if (!(p = pin_insert(s, obj, gen))) { *rc = ENOMEM; return h; }
    p->handle = h;
    p->count = 1;
    return 0;
}

/* One use less.  Returns the handle to release when it was the last. */
static uint32_t pin_drop(ds_store *s, uint32_t obj, uint64_t gen) {
    struct ds_pin *p = pin_find(s, obj, gen);
    if (!p || --p->count > 0) return 0;
    uint32_t h = p->handle;
    pin_remove(s, p);
    return h;
}

static void release_handle(ds_store *s, uint32_t h) {
    if (h && !s->orphan) ds_release(s, h);
}

/* ---- ObjectRef cells ---- */

/* *out now holds one use of (obj, gen): the last store is 'held'.  pin_mu held. */
static void ref_fill(ds_store *s, ds_ref *out, uint32_t obj, uint64_t gen) {
    out->obj = obj;
    out->gen = gen;
    out->store = s;
    ref_get(s);
    __atomic_store_n(&out->held, 1, __ATOMIC_RELEASE);
}

int ds_put_ref(ds_store *s, const uint8_t *key, uint32_t keylen,
               const uint8_t *desc, uint32_t desclen,
               const ds_iov *bufs, uint32_t nbufs, uint32_t flags, ds_ref *out) {
    int rc = ds_enter(s);
    if (rc) return rc;
    if (out->held) { ds_leave(s); return DS_EINVAL; }
    uint32_t obj, h;
    uint64_t gen;
    rc = ds_put(s, key, keylen, desc, desclen, bufs, nbufs, flags, &obj, &gen, &h);
    if (rc == 0) {
        pthread_mutex_lock(&s->pin_mu);
        h = pin_adopt(s, obj, gen, h, &rc);
        if (rc == 0) ref_fill(s, out, obj, gen);
        pthread_mutex_unlock(&s->pin_mu);
        release_handle(s, h);
    }
    ds_leave(s);
    return rc;
}

int ds_ref_pin(ds_store *s, uint32_t obj, uint64_t gen, ds_ref *out) {
    int rc = ds_enter(s);
    if (rc) return rc;
    pthread_mutex_lock(&s->pin_mu);
    if (out->held) rc = DS_EINVAL;
    else rc = pin_take(s, obj, gen);
    if (rc == 0) ref_fill(s, out, obj, gen);
    pthread_mutex_unlock(&s->pin_mu);
    ds_leave(s);
    return rc;
}

int ds_ref_unpin(ds_store *s, ds_ref *r) {
    pthread_mutex_lock(&s->pin_mu);
    if (!r->held) {
        pthread_mutex_unlock(&s->pin_mu);
        return 0;
    }
    r->held = 0;
    r->store = NULL;
    uint32_t h = pin_drop(s, r->obj, r->gen);
    pthread_mutex_unlock(&s->pin_mu);
    release_handle(s, h);
    ref_put(s);
    return 0;
}

int ds_ref_claim(ds_store *s, uint64_t token, uint32_t obj, uint64_t gen, ds_ref *out) {
    int rc = ds_enter(s);
    if (rc) return rc;
    if (out->held) { ds_leave(s); return DS_EINVAL; }
    uint32_t h = 0;
    int claimed = token != 0 && ds_claim(s, token, obj, gen, &h) == 0;
    pthread_mutex_lock(&s->pin_mu);
    if (claimed) h = pin_adopt(s, obj, gen, h, &rc);
    else rc = pin_take(s, obj, gen);
    if (rc == 0) ref_fill(s, out, obj, gen);
    pthread_mutex_unlock(&s->pin_mu);
    release_handle(s, h);
    ds_leave(s);
    return rc;
}

int ds_ref_alive(ds_store *s, uint32_t obj, uint64_t gen) {
    int rc = ds_enter(s);
    if (rc) return rc;
    rc = ds_lock(s);
    if (rc == 0) {
        rc = ds_object_alive(s, obj, gen) ? 0 : DS_ENOTFOUND;
        ds_unlock(s);
    }
    ds_leave(s);
    return rc;
}

/* ---- the other calls on a handle: entered here ---- */

#define GUARDED(call)                         \
    do {                                      \
        int rc_ = ds_enter(s);                \
        if (rc_) return rc_;                  \
        rc_ = (call);                         \
        ds_leave(s);                          \
        return rc_;                           \
    } while (0)

int ds_put_key(ds_store *s, const uint8_t *key, uint32_t keylen,
               const uint8_t *desc, uint32_t desclen,
               const char *data, uint64_t len, uint32_t flags) {
    if (!key) return DS_EINVAL;
    ds_iov iov = {data, len};
    uint32_t obj;
    uint64_t gen;
    GUARDED(ds_put(s, key, keylen, desc, desclen, &iov, 1, flags, &obj, &gen, NULL));
}

int ds_lookup(ds_store *s, const uint8_t *key, uint32_t keylen, uint32_t *obj, uint64_t *gen) {
    GUARDED(ds_lookup_in(s, key, keylen, obj, gen));
}
int ds_transit(ds_store *s, uint32_t obj, uint64_t gen, uint64_t *token) {
    GUARDED(ds_transit_in(s, obj, gen, token));
}
int ds_delete_key(ds_store *s, const uint8_t *key, uint32_t keylen) {
    GUARDED(ds_delete_key_in(s, key, keylen));
}
int ds_delete_obj(ds_store *s, uint32_t obj, uint64_t gen) {
    GUARDED(ds_delete_obj_in(s, obj, gen));
}
int ds_count(ds_store *s, uint64_t *n) { GUARDED(ds_count_in(s, n)); }
int ds_keys_next(ds_store *s, uint64_t *cursor, uint8_t *keys, uint64_t keycap,
                 uint32_t *lens, uint64_t *sizes, uint32_t maxn,
                 uint64_t *used, uint32_t *count) {
    GUARDED(ds_keys_next_in(s, cursor, keys, keycap, lens, sizes, maxn, used, count));
}
int ds_check(ds_store *s, char *buf, uint64_t buflen, ds_checkinfo *out) {
    GUARDED(ds_check_in(s, buf, buflen, out));
}

int ds_decay(ds_store *s, uint32_t decay_ms, uint32_t *cursor, uint64_t *returned,
             uint64_t *warm_left) {
    GUARDED(ds_decay_in(s, decay_ms, cursor, returned, warm_left));
}
int ds_merge_scan(ds_store *s, uint64_t max_pages, ds_scaninfo *out) {
    GUARDED(ds_merge_scan_in(s, max_pages, out));
}
int ds_merger_config(ds_store *s, uint32_t vma_budget) {
    GUARDED(ds_merger_config_in(s, vma_budget));
}

/* A mergeable region counts as a cell: the handle outlives it (its free
 * after ds_close must find the handle, and the pages it maps stay ours). */
int ds_mergeable_alloc(ds_store *s, uint64_t nbytes, uint8_t **addr) {
    int rc = ds_enter(s);
    if (rc) return rc;
    rc = ds_mergeable_alloc_in(s, nbytes, addr);
    if (rc == 0) ref_get(s);
    ds_leave(s);
    return rc;
}

int ds_mergeable_free(ds_store *s, uint8_t *addr) {
    __atomic_add_fetch(&s->inflight, 1, __ATOMIC_SEQ_CST);
    /* closed: ds_merger_close already made the region private and gave
     * its references back; the mapping stays until the process exits */
    int gone = __atomic_load_n(&s->closed, __ATOMIC_SEQ_CST) || s->orphan;
    int rc = gone ? 0 : ds_mergeable_free_in(s, addr);
    ds_leave(s);
    if (rc == 0) ref_put(s);
    return rc;
}

/* ---- view cells ---- */

/* Pin (obj, gen) and map it into *vi.  Entered. */
static int view_open(ds_store *s, uint32_t obj, uint64_t gen, int writable, ds_viewinfo *vi) {
    pthread_mutex_lock(&s->pin_mu);
    int rc = vi->own ? DS_EINVAL : pin_take(s, obj, gen);
    pthread_mutex_unlock(&s->pin_mu);
    if (rc) return rc;
    rc = ds_view(s, obj, gen, writable, vi);     /* reads the blob under our pin */
    pthread_mutex_lock(&s->pin_mu);
    uint32_t h = 0;
    if (rc) {
        h = pin_drop(s, obj, gen);
    } else {
        vi->obj = obj;
        vi->gen = gen;
        vi->store = s;
        ref_get(s);
        __atomic_store_n(&vi->own, DS_OWN_PIN | (vi->map_len ? DS_OWN_MAP : 0), __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&s->pin_mu);
    release_handle(s, h);
    return rc;
}

int ds_view_open(ds_store *s, uint32_t obj, uint64_t gen, int writable, ds_viewinfo *vi) {
    int rc = ds_enter(s);
    if (rc) return rc;
    rc = view_open(s, obj, gen, writable, vi);
    ds_leave(s);
    return rc;
}

int ds_view_key(ds_store *s, const uint8_t *key, uint32_t keylen, int writable,
                ds_viewinfo *vi) {
    int rc = ds_enter(s);
    if (rc) return rc;
    for (int tries = 0; tries < 1000; tries++) {
        uint32_t obj;
        uint64_t gen;
        rc = ds_lookup_in(s, key, keylen, &obj, &gen);
        if (rc) break;
        rc = view_open(s, obj, gen, writable, vi);
        if (rc != DS_ENOTFOUND) break;   /* else: replaced meanwhile, look again */
    }
    ds_leave(s);
    return rc;
}

int ds_view_close(ds_store *s, ds_viewinfo *vi) {
    pthread_mutex_lock(&s->pin_mu);
    uint32_t own = vi->own;
    if (!own) {
        pthread_mutex_unlock(&s->pin_mu);
        return 0;
    }
    vi->own = 0;
    vi->store = NULL;
    uint32_t h = (own & DS_OWN_PIN) ? pin_drop(s, vi->obj, vi->gen) : 0;
    pthread_mutex_unlock(&s->pin_mu);
    if ((own & DS_OWN_CREATE) && !s->orphan) ds_abort(s, vi->obj, vi->gen, NULL);
    if ((own & DS_OWN_MAP) && vi->map_len) munmap(vi->data, vi->map_len);
    release_handle(s, h);
    ref_put(s);
    return 0;
}

void ds_ref_drop(ds_ref *r) {
    if (r->store) ds_ref_unpin(r->store, r);
}

void ds_view_drop(ds_viewinfo *vi) {
    if (vi->store) ds_view_close(vi->store, vi);
}

void ds_view_drop_at(ds_viewinfo *vi, void *addr) { (void)addr; ds_view_drop(vi); }

/* ---- create cells ---- */

int ds_create_open(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t nbytes,
                   ds_viewinfo *vi) {
    int rc = ds_enter(s);
    if (rc) return rc;
    if (vi->own) { ds_leave(s); return DS_EINVAL; }
    uint32_t obj;
    uint64_t gen;
    uint8_t *data;
    rc = ds_create(s, key, keylen, nbytes, &obj, &gen, &data);
    if (rc == 0) {
        pthread_mutex_lock(&s->pin_mu);
        memset(vi, 0, sizeof *vi);
        vi->data = data;
        vi->size = nbytes;
        vi->map_len = (nbytes + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE * DS_PAGE_SIZE;
        vi->obj = obj;
        vi->gen = gen;
        vi->store = s;
        ref_get(s);
        vi->own = DS_OWN_MAP | DS_OWN_CREATE;
        pthread_mutex_unlock(&s->pin_mu);
    }
    ds_leave(s);
    return rc;
}

/* Take the CREATE ownership off the cell (pin_mu not held).  0 if it had it. */
static int create_take(ds_store *s, ds_viewinfo *vi) {
    pthread_mutex_lock(&s->pin_mu);
    int had = (vi->own & DS_OWN_CREATE) != 0;
    if (had) vi->own &= ~(uint32_t)DS_OWN_CREATE;
    pthread_mutex_unlock(&s->pin_mu);
    return had ? 0 : DS_ESTATE;
}

int ds_create_commit(ds_store *s, ds_viewinfo *vi, const uint8_t *desc, uint32_t desclen) {
    int rc = ds_enter(s);
    if (rc) return rc;
    rc = create_take(s, vi);
    if (rc) { ds_leave(s); return rc; }
    uint32_t h = 0;
    rc = ds_commit(s, vi->obj, vi->gen, desc, desclen, vi->data, &h);
    if (rc) {
        ds_abort(s, vi->obj, vi->gen, vi->data);   /* DS_ESTATE if commit discarded it */
    } else {
        pthread_mutex_lock(&s->pin_mu);
        h = pin_adopt(s, vi->obj, vi->gen, h, &rc);
        if (rc == 0) vi->own |= DS_OWN_PIN;
        pthread_mutex_unlock(&s->pin_mu);
    }
    release_handle(s, h);
    ds_leave(s);
    return rc;
}

int ds_create_abort(ds_store *s, ds_viewinfo *vi) {
    int rc = create_take(s, vi);
    if (rc == 0) ds_abort(s, vi->obj, vi->gen, vi->data);
    return rc;
}

/* ---- the list of open handles, fork ---- */

static void atfork_prepare(void);
static void atfork_parent(void);
static void atfork_child(void);

static void atfork_register(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

void ds_refs_add(ds_store *s) {
    pthread_once(&g_atfork_once, atfork_register);
    pthread_mutex_lock(&g_stores_mu);
    s->next_store = g_stores;
    g_stores = s;
    pthread_mutex_unlock(&g_stores_mu);
}

void ds_close(ds_store *s) {
    if (!s) return;
    if (__atomic_exchange_n(&s->closed, 1, __ATOMIC_SEQ_CST)) return;
    struct timespec ts = {0, 50000};
    while (__atomic_load_n(&s->inflight, __ATOMIC_ACQUIRE)) nanosleep(&ts, NULL);
    pthread_mutex_lock(&g_stores_mu);
    for (ds_store **pp = &g_stores; *pp; pp = &(*pp)->next_store)
        if (*pp == s) { *pp = s->next_store; break; }
    pthread_mutex_unlock(&g_stores_mu);
    ds_merger_close(s);
    ref_put(s);
}

void ds_close_at(ds_store **cell) {
    ds_store *s = __atomic_exchange_n(cell, NULL, __ATOMIC_ACQ_REL);
    if (s) ds_close(s);
}

/* A new open file description of the index file (its OFD locks are its
 * own): through /proc/self/fd, else by path, checked to be the same file. */
static int reopen_index(ds_store *s) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", s->index_fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0 && s->index_path) fd = open(s->index_path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return -1;
    struct stat a, b;
    if (fstat(fd, &a) != 0 || fstat(s->index_fd, &b) != 0 || a.st_ino != b.st_ino ||
        a.st_dev != b.st_dev) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Parent, before fork, pin_mu and the merger held: a slot for the child,
 * holding copies of all our handles and merge records.  On any failure
 * nothing is left reserved (fork_slot stays DS_NIL). */
static void reserve_child(ds_store *s) {
    s->fork_slot = DS_NIL;
    s->fork_fd = reopen_index(s);
    if (s->fork_fd < 0) return;
    if (ds_lock(s) != 0) goto fail_fd;
    ds_header *h = s->hdr;
    uint32_t slot = DS_NIL;
    for (uint32_t i = 0; i < h->max_clients; i++) {
        ds_client *c = DS_CLIENT(s, i);
        if (c->pid == 0 && ds_slot_lock(s->fork_fd, i) == 0) { slot = i; break; }
    }
    if (slot == DS_NIL) goto fail_unlock;
    ds_client *c = DS_CLIENT(s, slot);
    memset(c, 0, sizeof *c);
    c->attach_ns = ds_now_ns();
    c->pid = s->pid;                 /* the child writes its own pid */
    uint32_t i = 0;
    for (; i < s->pin_cap; i++) {
        struct ds_pin *p = &s->pins[i];
        if (!p->obj) continue;
        if (!(p->child_handle = ds_handle_new(s, p->obj, slot))) break;
    }
    if (i < s->pin_cap || ds_merger_fork_dup(s, slot) != 0) {
        ds_release_slot(s, slot);    /* frees the copies made so far */
        goto fail_unlock;
    }
    s->fork_slot = slot;
    ds_unlock(s);
    return;
fail_unlock:
    ds_unlock(s);
fail_fd:
    close(s->fork_fd);               /* drops the slot lock, if taken */
    s->fork_fd = -1;
}

static void atfork_prepare(void) {
    pthread_mutex_lock(&g_stores_mu);
    ds_wp_atfork_prepare();
    for (ds_store *s = g_stores; s; s = s->next_store) {
        s->fork_slot = DS_NIL;
        s->fork_fd = -2;             /* -2: not prepared (the child gets an orphan) */
        if (s->closed || s->orphan || s->pid != (uint32_t)getpid()) continue;
        ds_merger_fork_prepare(s);
        pthread_mutex_lock(&s->pin_mu);
        reserve_child(s);
    }
}

static void atfork_parent(void) {
    for (ds_store *s = g_stores; s; s = s->next_store) {
        if (s->fork_fd == -2) continue;
        if (s->fork_fd >= 0) close(s->fork_fd);   /* the slot now lives with the child */
        s->fork_fd = -1;
        s->fork_slot = DS_NIL;
        pthread_mutex_unlock(&s->pin_mu);
        ds_merger_fork_parent(s);
    }
    ds_wp_atfork_parent();
    pthread_mutex_unlock(&g_stores_mu);
}

/* Child: map the index again through our own open file description.  A
 * mapping holds its file description -- and so the parent's slot lock --
 * for as long as it exists: the inherited ones would keep the parent
 * "alive" until we exit. */
static void remap_index(ds_store *s) {
    uint8_t **maps[2] = {&s->ix, &s->ix_ro};
    int prots[2] = {PROT_READ | PROT_WRITE, PROT_READ};
    for (int i = 0; i < 2; i++) {
        void *fresh = mmap(NULL, s->ix_len, prots[i], MAP_SHARED, s->index_fd, 0);
        if (fresh == MAP_FAILED) continue;     /* keep the old one: a slower reap, no harm */
        if (mremap(fresh, s->ix_len, s->ix_len, MREMAP_MAYMOVE | MREMAP_FIXED, *maps[i]) == MAP_FAILED)
            munmap(fresh, s->ix_len);
    }
}

static void atfork_child(void) {
    uint32_t pid = (uint32_t)getpid();
    ds_wp_atfork_child();
    for (ds_store *s = g_stores; s; s = s->next_store) {
        /* threads of the parent that were inside calls do not exist here */
        __atomic_store_n(&s->inflight, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->gc_busy, 0, __ATOMIC_RELAXED);
        int prepared = s->fork_fd != -2;
        if (s->fork_slot == DS_NIL) {
            s->orphan = 1;           /* no slot: hold nothing, do nothing */
            free(s->pins);
            s->pins = NULL;
            s->pin_cap = s->pin_count = 0;
        } else {
            dup2(s->fork_fd, s->index_fd);   /* our slot lock, not the parent's */
            close(s->fork_fd);
            remap_index(s);
            s->slot = s->fork_slot;
            __atomic_store_n(&DS_CLIENT(s, s->slot)->pid, pid, __ATOMIC_RELAXED);
            for (uint32_t i = 0; i < s->pin_cap; i++)
                if (s->pins[i].obj) s->pins[i].handle = s->pins[i].child_handle;
        }
        s->pid = pid;
        s->fork_fd = -1;
        s->fork_slot = DS_NIL;
        if (!prepared) continue;
        pthread_mutex_unlock(&s->pin_mu);
        ds_merger_fork_child(s);
    }
    pthread_mutex_unlock(&g_stores_mu);
}
