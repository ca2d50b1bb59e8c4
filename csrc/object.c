/*
 * object.c -- objects once they exist: references (acquire, release,
 * transit, claim), views, lookup, delete, keys; and the object helpers
 * the put pipeline (put.c) uses to make and seal them.
 *
 * Who may call: the public functions take hdr->lock themselves; ds_view
 * needs no lock (the caller's reference keeps the object and its blob
 * immutable) and maps pages outside it.  ds_object_* and ds_obj_check
 * need the lock held; ds_map_runs, ds_reserve_va, ds_view_runs_max none.
 *
 * Every object, blob and handle id that comes from a caller or from
 * shared memory is checked with ds_chunk_get (layout.h) before use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "layout.h"

#define ALIGN16(x) (((x) + 15ull) & ~15ull)

static ds_object *obj_at(ds_store *s, uint32_t id) { return (ds_object *)DS_CHUNK(s, id); }

/* An object chunk (any generation) whose key fits in it; NULL if not. */
static ds_object *obj_valid(ds_store *s, uint32_t id) {
    ds_object *o = (ds_object *)ds_chunk_get(s, id, DS_K_OBJECT);
    if (!o || o->keylen > DS_MAX_KEY || ds_class_bytes(o->h.cls) < DS_OBJ_BYTES(o->keylen, 0))
        return NULL;
    if ((o->oflags & DS_OF_INLINE) &&
        (o->size > DS_INLINE_MAX ||
         ds_class_bytes(o->h.cls) < DS_OBJ_BYTES(o->keylen, (uint64_t)o->desclen + o->size)))
        return NULL;
    return o;
}

/* An object id from outside: must name an object of that generation.
 * Lock held (or a reference on it). */
ds_object *ds_obj_check(ds_store *s, uint32_t id, uint64_t gen) {
    ds_object *o = obj_valid(s, id);
    return o && o->gen == gen ? o : NULL;
}

static uint32_t key_hash(ds_store *s, const uint8_t *key, uint32_t keylen) {
    return (uint32_t)ds_hash_bytes(s, key, keylen);
}

static uint32_t key_find(ds_store *s, const uint8_t *key, uint32_t keylen) {
    uint32_t kh = key_hash(s, key, keylen);
    uint64_t guard = DS_CHAIN_MAX(&s->hdr->keys_ix);
    for (uint32_t x = ds_lh_first(s, &s->hdr->keys_ix, kh); x != DS_NIL && guard--; x = DS_CHUNK(s, x)->next) {
        ds_object *o = obj_valid(s, x);
        if (!o) break;                           /* corrupt chain */
        if (o->h.fp == kh && o->keylen == keylen && memcmp(o->key, key, keylen) == 0) return x;
    }
    return DS_NIL;
}

static void key_unbind(ds_store *s, uint32_t id) {
    ds_object *o = obj_at(s, id);
    if (!(o->oflags & DS_OF_KEYED)) return;
    ds_lh_remove(s, &s->hdr->keys_ix, &ds_chunk_ops, id);
    o->oflags &= (uint8_t)~DS_OF_KEYED;
    s->hdr->keys--;
    ds_object_decref(s, id);
}

/* Bind the sealed object to its key, replacing an older binding. */
static void key_bind(ds_store *s, uint32_t id) {
    ds_object *o = obj_at(s, id);
    uint32_t old = key_find(s, o->key, o->keylen);
    if (old != DS_NIL) key_unbind(s, old);
    o->h.refcnt++;
    o->oflags |= DS_OF_KEYED;
    ds_lh_insert(s, &s->hdr->keys_ix, &ds_chunk_ops, id);
    s->hdr->keys++;
}

static uint32_t handle_new(ds_store *s, uint32_t obj, uint32_t owner) {
    uint32_t hid = ds_chunk_alloc(s, sizeof(ds_handle), DS_K_HANDLE);
    if (!hid) return 0;
    ds_handle *hd = (ds_handle *)DS_CHUNK(s, hid);
    hd->obj = obj;
    hd->gen = obj_at(s, obj)->gen;
    hd->stamp = 0;
    hd->owner = owner;
    obj_at(s, obj)->h.refcnt++;
    s->hdr->handles++;
    if (owner == DS_TRANSIT_OWNER) s->hdr->transit++;
    else DS_CLIENT(s, owner)->handles++;
    return hid;
}

/* A CREATED object with room for 'extra' bytes after the key. */
ds_object *ds_object_new(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t extra,
                         uint32_t *id) {
    *id = ds_chunk_alloc(s, DS_OBJ_BYTES(keylen, extra), DS_K_OBJECT);
    if (!*id) return NULL;
    ds_object *o = obj_at(s, *id);
    o->gen = ++s->hdr->gen_seq;
    o->size = 0;
    o->oflags = 0;
    o->owner = s->slot;
    o->blob = 0;
    o->keylen = (uint16_t)keylen;
    if (keylen) memcpy(o->key, key, keylen);
    o->h.fp = key_hash(s, key, keylen);
    o->state = DS_OBJ_CREATED;
    return o;
}

/* Release up to 'budget' page references of a large blob, from the end
 * of its runs (the runs left are what it still holds).  Returns the
 * budget left; *empty when nothing is left.  Lock held. */
static uint32_t blob_release_pages(ds_store *s, ds_blob *b, uint32_t budget, int *empty) {
    uint32_t *ext = (uint32_t *)ds_blob_payload(b), runs = ds_blob_runs(b);
    while (runs && budget) {
        uint32_t *e = ext + 2 * (runs - 1), pg = e[0], np = e[1];
        if (pg == DS_ZERO) { s->hdr->pages_zero -= np; runs--; continue; }
        uint32_t take = np < budget ? np : budget;
        for (uint32_t k = np - take; k < np; k++) ds_page_decref(s, pg + k);
        e[1] = np - take;
        budget -= take;
        if (e[1] == 0) runs--;
    }
    b->nextents = runs;
    *empty = runs == 0;
    return budget;
}

/* Dropped large values whose release this thread owes, released by
 * ds_unlock in slices of REAP_SLICE pages, one lock hold each (as for
 * punching, pool.c): a delete of many GiB never holds the lock for its
 * whole size.  'epoch' is the recovery count when queued: a rebuild in
 * between has already dropped the blobs and recounted their pages. */
#define REAP_SLICE 16384u
#define REAP_MAX 8u
static __thread uint32_t reap_q[REAP_MAX], reap_n;
static __thread ds_store *reap_s;
static __thread uint64_t reap_epoch;

/* DEDUPSHM_TEST_REAP_SLICE=n: slices of n pages and a 0.2 ms pause
 * (without the lock) after each (tests: a SIGKILL then lands between two
 * slices most of the time) */
static uint32_t g_reap_slice = REAP_SLICE;
static pthread_once_t g_reap_once = PTHREAD_ONCE_INIT;
static void reap_slice_init(void) {
    const char *e = getenv("DEDUPSHM_TEST_REAP_SLICE");
    long v = e ? strtol(e, NULL, 10) : 0;
    if (v > 0 && v < (long)REAP_SLICE) g_reap_slice = (uint32_t)v;
}

static uint64_t blob_pages(ds_blob *b) {
    const uint32_t *ext = (const uint32_t *)ds_blob_payload(b);
    uint64_t n = 0;
    for (uint32_t e = 0, runs = ds_blob_runs(b); e < runs; e++)
        if (ext[2 * e] != DS_ZERO) n += ext[2 * e + 1];
    return n;
}

void ds_blob_release_all(ds_store *s, uint32_t bid) {
    ds_blob *b = (ds_blob *)ds_chunk_get(s, bid, DS_K_BLOB);
    if (!b || (b->h.flags & DS_BF_SMALL)) return;
    int empty;
    while (blob_release_pages(s, b, 1u << 30, &empty) == 0 && !empty) {}
    ds_chunk_free(s, bid);
}

void ds_reap_pause(void) {
    if (g_reap_slice != REAP_SLICE) usleep(200);
}

int ds_reap_flush(ds_store *s) {
    if (!reap_n) return 0;
    if (reap_s != s || reap_epoch != s->hdr->recoveries) { reap_n = 0; return 0; }
    uint32_t budget = g_reap_slice;
    while (reap_n && budget) {
        uint32_t bid = reap_q[0];
        ds_blob *b = (ds_blob *)ds_chunk_get(s, bid, DS_K_BLOB);
        int empty = 1;
        if (b && (b->h.flags & DS_BF_REAP) && b->h.next == s->slot && b->h.refcnt == 0) {
            budget = blob_release_pages(s, b, budget, &empty);
            if (empty) ds_chunk_free(s, bid);
        }
        if (!empty) break;
        memmove(reap_q, reap_q + 1, 4ull * --reap_n);
    }
    return reap_n != 0;
}

static void blob_decref(ds_store *s, uint32_t bid) {
    ds_blob *b = (ds_blob *)ds_chunk_get(s, bid, DS_K_BLOB);
    if (!b || b->h.refcnt == 0 || --b->h.refcnt > 0) return;
    if (b->h.flags & DS_BF_SMALL) {
        if (b->h.flags & DS_BF_HASHED) ds_lh_remove(s, &s->hdr->blobs_ix, &ds_chunk_ops, bid);
        s->hdr->small_bytes -= ds_class_bytes(b->h.cls);
        ds_chunk_free(s, bid);
        return;
    }
    if (reap_n && (reap_s != s || reap_epoch != s->hdr->recoveries)) reap_n = 0;
    pthread_once(&g_reap_once, reap_slice_init);
    if (reap_n < REAP_MAX && blob_pages(b) > g_reap_slice) {
        b->h.flags |= DS_BF_REAP;
        b->h.next = s->slot;
        if (!reap_n) { reap_s = s; reap_epoch = s->hdr->recoveries; }
        reap_q[reap_n++] = bid;
        return;
    }
    ds_blob_release_all(s, bid);
}

static void pending_release(ds_store *s, uint32_t pid) {
    ds_pending *pd = (ds_pending *)ds_chunk_get(s, pid, DS_K_PENDING);
    if (!pd) return;
    for (uint32_t k = 0, n = ds_list_len(pd); k < n; k++)
        if (pd->pages[k] != DS_ZERO) ds_page_decref(s, pd->pages[k]);
    ds_chunk_free(s, pid);
}

void ds_object_free(ds_store *s, uint32_t id) {
    ds_object *o = obj_at(s, id);
    if (o->oflags & DS_OF_KEYED) {
        ds_lh_remove(s, &s->hdr->keys_ix, &ds_chunk_ops, id);
        s->hdr->keys--;
    }
    if (o->state == DS_OBJ_SEALED) {
        s->hdr->objects--;
        s->hdr->logical_bytes -= o->size;
        if (o->oflags & DS_OF_INLINE) s->hdr->small_bytes -= ds_class_bytes(o->h.cls);
        else if (o->blob) blob_decref(s, o->blob);
    } else if (o->blob) {
        pending_release(s, o->blob);
    }
    ds_chunk_free(s, id);
}

void ds_object_decref(ds_store *s, uint32_t id) {
    ds_object *o = (ds_object *)ds_chunk_get(s, id, DS_K_OBJECT);
    if (!o || o->h.refcnt == 0) return;
    if (--o->h.refcnt == 0) ds_object_free(s, id);
}

/* Seal: state, counters, key, caller's handle.  Lock held. */
int ds_object_seal(ds_store *s, uint32_t id, uint32_t blob, uint64_t size,
                int keyed, uint32_t *handle) {
    ds_object *o = obj_at(s, id);
    o->blob = blob;
    o->size = size;
    o->state = DS_OBJ_SEALED;
    s->hdr->objects++;
    s->hdr->logical_bytes += size;
    if (handle && !(*handle = handle_new(s, id, s->slot))) {   /* no room: undo */
        ds_object_free(s, id);
        return DS_EFULL;
    }
    if (keyed) key_bind(s, id);
    return 0;
}

/* ---- lookup, references ---- */

int ds_lookup_in(ds_store *s, const uint8_t *key, uint32_t keylen, uint32_t *obj, uint64_t *gen) {
    if (keylen > DS_MAX_KEY) return DS_EINVAL;
    int rc = ds_lock(s);
    if (rc) return rc;
    uint32_t id = key_find(s, key, keylen);
    if (id == DS_NIL) rc = DS_ENOTFOUND;
    else { *obj = id; *gen = obj_at(s, id)->gen; }
    ds_unlock(s);
    return rc;
}

static ds_object *live(ds_store *s, uint32_t obj, uint64_t gen) {
    ds_object *o = ds_obj_check(s, obj, gen);
    if (!o || o->state != DS_OBJ_SEALED || (o->oflags & DS_OF_DELETED) || o->h.refcnt == 0) return NULL;
    return o;
}

int ds_acquire(ds_store *s, uint32_t obj, uint64_t gen, uint32_t *handle) {
    int rc = ds_lock(s);
    if (rc) return rc;
    if (!live(s, obj, gen)) rc = DS_ENOTFOUND;
    else if (!(*handle = handle_new(s, obj, s->slot))) rc = DS_EFULL;
    ds_unlock(s);
    return rc;
}

static ds_handle *handle_check(ds_store *s, uint32_t hid) {
    return (ds_handle *)ds_chunk_get(s, hid, DS_K_HANDLE);
}

static void handle_drop(ds_store *s, uint32_t hid) {
    ds_handle *hd = (ds_handle *)DS_CHUNK(s, hid);
    uint32_t obj = hd->obj;
    if (hd->owner == DS_TRANSIT_OWNER) s->hdr->transit--;
    else if (hd->owner < s->hdr->max_clients) DS_CLIENT(s, hd->owner)->handles--;
    s->hdr->handles--;
    ds_chunk_free(s, hid);
    ds_object_decref(s, obj);
}

int ds_release(ds_store *s, uint32_t hid) {
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_handle *hd = handle_check(s, hid);
    if (!hd || hd->owner != s->slot) rc = DS_ENOTFOUND;
    else handle_drop(s, hid);
    ds_unlock(s);
    return rc;
}

int ds_transit_in(ds_store *s, uint32_t obj, uint64_t gen, uint64_t *token) {
    int rc = ds_lock(s);
    if (rc) return rc;
    uint32_t hid;
    if (!live(s, obj, gen)) rc = DS_ENOTFOUND;
    else if (!(hid = handle_new(s, obj, DS_TRANSIT_OWNER))) rc = DS_EFULL;
    else {
        ds_handle *hd = (ds_handle *)DS_CHUNK(s, hid);
        hd->stamp = ds_now_s();
        hd->h.fp = ++s->hdr->nonce_seq;
        *token = ((uint64_t)hid << 32) | hd->h.fp;
    }
    ds_unlock(s);
    return rc;
}

int ds_claim(ds_store *s, uint64_t token, uint32_t obj, uint64_t gen, uint32_t *handle) {
    int rc = ds_lock(s);
    if (rc) return rc;
    uint32_t hid = (uint32_t)(token >> 32);
    ds_handle *hd = handle_check(s, hid);
    if (!hd || hd->owner != DS_TRANSIT_OWNER || hd->h.fp != (uint32_t)token ||
        hd->obj != obj || hd->gen != gen) {
        rc = DS_ENOTFOUND;
    } else {
        hd->owner = s->slot;
        s->hdr->transit--;
        DS_CLIENT(s, s->slot)->handles++;
        *handle = hid;
    }
    ds_unlock(s);
    return rc;
}

/* ---- views ---- */

/* Map page runs at addr (MAP_FIXED).  shared: MAP_SHARED (writers), else
 * MAP_PRIVATE (copy-on-write).  Zero runs map anonymous zero pages.
 * Each run costs one VMA of the process (vm.max_map_count). */
int ds_map_runs(ds_store *s, uint8_t *addr, const uint32_t *ext, uint32_t nruns,
                int prot, int shared) {
    uint64_t off = 0;
    for (uint32_t e = 0; e < nruns; e++) {
        uint32_t pg = ext[2 * e];
        uint64_t len = (uint64_t)ext[2 * e + 1] * DS_PAGE_SIZE;
        void *r;
        if (pg == DS_ZERO)
            r = mmap(addr + off, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        else
            r = mmap(addr + off, len, prot, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED,
                     s->pool_fd, (off_t)pg * DS_PAGE_SIZE);
        if (r == MAP_FAILED) return errno;
        off += len;
    }
    return 0;
}

uint8_t *ds_reserve_va(uint64_t len) {
    void *r = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return r == MAP_FAILED ? NULL : r;
}

/* Most runs one view maps page run by page run: min(8192, max_map_count/8),
 * so that no value -- however fragmented -- is stored but unreadable, and
 * a few views cannot use up the process's mappings.  Read once per
 * process; DEDUPSHM_VIEW_RUNS overrides it (tests). */
static uint32_t g_runs_max;
static pthread_once_t g_runs_once = PTHREAD_ONCE_INIT;

static void runs_max_init(void) {
    uint64_t v = 8192, maps = 65530;
    FILE *f = fopen("/proc/sys/vm/max_map_count", "re");
    if (f) {
        unsigned long long x;
        if (fscanf(f, "%llu", &x) == 1 && x > 0) maps = x;
        fclose(f);
    }
    if (maps / 8 < v) v = maps / 8;
    const char *env = getenv("DEDUPSHM_VIEW_RUNS");
    if (env && *env) {
        char *end;
        unsigned long long x = strtoull(env, &end, 10);
        if (*end == 0 && x < v) v = x;         /* may only lower it */
    }
    g_runs_max = (uint32_t)v;
}

uint32_t ds_view_runs_max(void) {
    pthread_once(&g_runs_once, runs_max_init);
    return g_runs_max;
}

/* A view of too many runs to map one by one: one private anonymous
 * mapping holding a copy of the bytes (read-only unless writable). */
static uint8_t *copy_view(ds_store *s, const uint32_t *ext, uint32_t nruns, uint64_t len,
                          int writable, int *rc) {
    void *r = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) { *rc = errno; return NULL; }
    uint8_t *va = r;
    uint64_t off = 0;
    for (uint32_t e = 0; e < nruns; e++) {
        uint64_t n = (uint64_t)ext[2 * e + 1] * DS_PAGE_SIZE;
        if (ext[2 * e] != DS_ZERO) memcpy(va + off, DS_POOL_RO(s, ext[2 * e]), n);
        off += n;
    }
    if (!writable && mprotect(va, len, PROT_READ) != 0) {
        *rc = errno;
        munmap(va, len);
        return NULL;
    }
    *rc = 0;
    return va;
}

int ds_view(ds_store *s, uint32_t obj, uint64_t gen, int writable, ds_viewinfo *out) {
    /* The caller holds a reference: the object and its blob are immutable,
     * so no lock is needed to read them. */
    ds_object *o = ds_obj_check(s, obj, gen);
    if (!o || o->state != DS_OBJ_SEALED || (o->oflags & DS_OF_DELETED) ||
        (!o->blob && !(o->oflags & DS_OF_INLINE)))
        return DS_ENOTFOUND;
    if (o->oflags & DS_OF_INLINE) {        /* obj_valid checked that it fits */
        const ds_object *oro = (const ds_object *)(s->ix_ro + ((uint8_t *)o - s->ix));
        memset(out, 0, sizeof *out);
        out->size = o->size;
        out->desc = DS_OBJ_INLINE_DESC(oro);
        out->desclen = o->desclen;
        out->nbufs = 1;
        out->tab1[0] = 0;
        out->tab1[1] = o->size;
        out->bufs = out->tab1;
        out->small = 1;
        out->data = (uint8_t *)DS_OBJ_INLINE_DATA(oro);
        return 0;
    }
    ds_blob *b = (ds_blob *)ds_chunk_get(s, o->blob, DS_K_BLOB);
    if (!b) return DS_ECORRUPT;
    /* every size we hand out must stay inside the chunk */
    uint64_t room = ds_class_bytes(b->h.cls);
    uint64_t head = ALIGN16(16ull * b->nbufs + b->desclen);
    if (room < sizeof *b || b->body > room - sizeof *b || head > b->body)
        return DS_ECORRUPT;
    if ((b->h.flags & DS_BF_SMALL) ? b->size > b->body - head : 8ull * b->nextents > b->body - head)
        return DS_ECORRUPT;
    const uint64_t *tab = ds_blob_bufs(b);
    for (uint32_t i = 0; i < b->nbufs; i++)
        if (tab[2 * i] > b->size || tab[2 * i + 1] > b->size - tab[2 * i]) return DS_ECORRUPT;
    uint64_t boff = (uint64_t)((uint8_t *)b - s->ix);
    ds_blob *bro = (ds_blob *)(s->ix_ro + boff);
    memset(out, 0, sizeof *out);
    out->size = b->size;
    out->desc = ds_blob_desc(bro);
    out->desclen = b->desclen;
    out->nbufs = b->nbufs;
    out->bufs = ds_blob_bufs(bro);
    if (b->h.flags & DS_BF_SMALL) {
        out->small = 1;
        out->data = ds_blob_payload(bro);
        return 0;
    }
    const uint32_t *ext = (const uint32_t *)ds_blob_payload(b);
    out->extents = b->nextents;
    uint64_t npages = 0;
    for (uint32_t e = 0; e < b->nextents; e++) {
        if (ext[2 * e] != DS_ZERO && (uint64_t)ext[2 * e] + ext[2 * e + 1] > s->hdr->cap_pages)
            return DS_ECORRUPT;
        npages += ext[2 * e + 1];
    }
    if (npages * DS_PAGE_SIZE < b->size) return DS_ECORRUPT;
    if (!writable && b->nextents == 1 && ext[0] != DS_ZERO) {
        out->data = DS_POOL_RO(s, ext[0]);
        return 0;
    }
    uint64_t len = npages * DS_PAGE_SIZE;
    uint8_t *va;
    int rc;
    if (b->nextents > ds_view_runs_max()) {
        va = copy_view(s, ext, b->nextents, len, writable, &rc);
        if (!va) return rc;
    } else {
        va = ds_reserve_va(len);
        if (!va) return ENOMEM;
        rc = ds_map_runs(s, va, ext, b->nextents, writable ? PROT_READ | PROT_WRITE : PROT_READ, 0);
        if (rc) { munmap(va, len); return rc; }
    }
    out->data = va;
    out->map_len = len;
    return 0;
}

/* ---- delete, keys ---- */

int ds_delete_key_in(ds_store *s, const uint8_t *key, uint32_t keylen) {
    if (keylen > DS_MAX_KEY) return DS_EINVAL;
    int rc = ds_lock(s);
    if (rc) return rc;
    uint32_t id = key_find(s, key, keylen);
    if (id == DS_NIL) rc = DS_ENOTFOUND;
    else key_unbind(s, id);
    ds_unlock(s);
    return rc;
}

int ds_delete_obj_in(ds_store *s, uint32_t obj, uint64_t gen) {
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_object *o = live(s, obj, gen);
    if (!o) rc = DS_ENOTFOUND;
    else {
        o->h.refcnt++;                   /* keep it while we unbind */
        o->oflags |= DS_OF_DELETED;
        key_unbind(s, obj);
        ds_object_decref(s, obj);
    }
    ds_unlock(s);
    return rc;
}

int ds_count_in(ds_store *s, uint64_t *n) {
    int rc = ds_lock(s);
    if (rc) return rc;
    *n = s->hdr->keys;
    ds_unlock(s);
    return 0;
}

/* Key walk in bounded batches.  The cursor runs over the 32-bit key
 * hashes in bit-reversed order: a bucket of the linear hash table at
 * resolution k holds exactly the keys whose low k hash bits are its
 * index, i.e. one aligned range of 2^(32-k) reversed hashes.  So a batch
 * takes whole buckets (at most KEYS_BUCKETS) and the cursor moves past
 * their ranges; a split between batches only refines ranges still ahead.
 * A key bound for the whole walk is returned exactly once; one bound or
 * unbound meanwhile may or may not be.  The lock is held for one batch. */
#define KEYS_BUCKETS 1024u

static uint32_t rev32(uint32_t x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    return __builtin_bswap32(x);
}

int ds_keys_next_in(ds_store *s, uint64_t *cursor, uint8_t *keys, uint64_t keycap,
                    uint32_t *lens, uint64_t *sizes, uint32_t maxn,
                    uint64_t *used, uint32_t *count) {
    uint64_t r = *cursor, pos = 0;
    uint32_t n = 0;
    *used = 0;
    *count = 0;
    if (r >= DS_KEYS_END) return 0;
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_lhash *t = &s->hdr->keys_ix;
    for (uint32_t visited = 0; r < DS_KEYS_END && visited < KEYS_BUCKETS; visited++) {
        uint32_t low = rev32((uint32_t)r);
        uint32_t level = t->level < 31 ? t->level : 31;
        uint32_t k = (low & ((1u << level) - 1)) < t->split ? level + 1 : level;
        uint64_t width = 1ull << (32 - k);
        uint64_t end = (r & ~(width - 1)) + width;
        uint64_t p = pos, guard = DS_CHAIN_MAX(t);
        uint32_t m = n;
        for (uint32_t x = ds_lh_first(s, t, low); x != DS_NIL && guard--; x = DS_CHUNK(s, x)->next) {
            ds_object *o = obj_valid(s, x);
            if (!o) break;                           /* corrupt chain */
            uint64_t rv = rev32(o->h.fp);
            if (rv < r || rv >= end) continue;
            if (p + o->keylen <= keycap && m < maxn) {
                memcpy(keys + p, o->key, o->keylen);
                lens[m] = o->keylen;
                sizes[m] = o->size;
            }
            p += o->keylen;
            m++;
        }
        if (p > keycap || m > maxn) {               /* this bucket does not fit */
            if (n == 0) {                            /* not even alone: say what it needs */
                *used = p;
                *count = m;
                rc = ERANGE;
            }
            break;
        }
        pos = p;
        n = m;
        r = end;
    }
    ds_unlock(s);
    if (rc) return rc;
    *cursor = r;
    *used = pos;
    *count = n;
    return 0;
}

/* ---- for refs.c (lock held) ---- */

uint32_t ds_handle_new(ds_store *s, uint32_t obj, uint32_t owner) {
    return handle_new(s, obj, owner);
}

int ds_object_alive(ds_store *s, uint32_t obj, uint64_t gen) {
    return live(s, obj, gen) != NULL;
}
