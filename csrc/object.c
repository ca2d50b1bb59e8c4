/*
 * object.c -- objects: put, create/commit, lookup, references, views,
 * delete, keys.
 *
 * Who may call: the public functions take hdr->lock themselves and do the
 * heavy work -- fingerprinting, copying, fallocate, mmap -- outside it.
 * ds_object_free/ds_object_decref need the lock held.
 *
 * A put of a large value, step by step:
 *   1. (no lock)  fingerprint every page of the value; note zero pages.
 *   2. (lock)     create an OBJECT in state CREATED owned by this client,
 *                 with a PENDING list of its pages.  For each page, find a
 *                 published page with equal fingerprint AND equal bytes
 *                 and take a reference; allocate fresh pages for misses.
 *   3. (no lock)  back the fresh pages (fallocate: a full tmpfs fails
 *                 here, cleanly) and copy the bytes in.
 *   4. (lock)     publish each fresh page -- unless a racer published the
 *                 same bytes meanwhile, then use that one and free ours --
 *                 write the BLOB (descriptor + page runs), seal, bind the
 *                 key, hand the caller a reference.
 * If the process dies anywhere, the CREATED object and its PENDING list
 * tell gc (or crash recovery) exactly which pages to give back.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "layout.h"

#define ALIGN16(x) (((x) + 15ull) & ~15ull)

static ds_object *obj_at(ds_store *s, uint32_t id) { return (ds_object *)DS_CHUNK(s, id); }

/* An object id from outside: must name a live object of that generation. */
static ds_object *obj_check(ds_store *s, uint32_t id, uint64_t gen) {
    ds_header *h = s->hdr;
    if (id < 1 || (uint64_t)id >= h->heap_top) return NULL;
    ds_object *o = obj_at(s, id);
    if (o->h.kind != DS_K_OBJECT || o->gen != gen) return NULL;
    return o;
}

static uint32_t key_hash(ds_store *s, const uint8_t *key, uint32_t keylen) {
    return (uint32_t)ds_hash_bytes(s, key, keylen);
}

static uint32_t key_find(ds_store *s, const uint8_t *key, uint32_t keylen) {
    uint32_t kh = key_hash(s, key, keylen);
    uint64_t guard = DS_CHAIN_MAX(&s->hdr->keys_ix);
    for (uint32_t x = ds_lh_first(s, &s->hdr->keys_ix, kh); x != DS_NIL && guard--; x = DS_CHUNK(s, x)->next) {
        ds_object *o = obj_at(s, x);
        if (o->h.fp == kh && o->keylen == keylen && memcmp(o->key, key, keylen) == 0) return x;
    }
    return DS_NIL;
}

static void key_unbind(ds_store *s, uint32_t id) {
    ds_object *o = obj_at(s, id);
    if (!(o->oflags & DS_OF_KEYED)) return;
    ds_lh_remove(s, &s->hdr->keys_ix, &ds_chunk_ops, id);
    o->oflags &= ~(uint32_t)DS_OF_KEYED;
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

static ds_object *object_new(ds_store *s, const uint8_t *key, uint32_t keylen, uint32_t *id) {
    *id = ds_chunk_alloc(s, sizeof(ds_object) + keylen, DS_K_OBJECT);
    if (!*id) return NULL;
    ds_object *o = obj_at(s, *id);
    o->gen = ++s->hdr->gen_seq;
    o->size = 0;
    o->oflags = 0;
    o->owner = s->slot;
    o->blob = 0;
    o->keylen = keylen;
    if (keylen) memcpy(o->key, key, keylen);
    o->h.fp = key_hash(s, key, keylen);
    o->state = DS_OBJ_CREATED;
    return o;
}

static void blob_decref(ds_store *s, uint32_t bid) {
    ds_blob *b = (ds_blob *)DS_CHUNK(s, bid);
    if (b->h.kind != DS_K_BLOB || --b->h.refcnt > 0) return;
    if (b->h.flags & DS_BF_SMALL) {
        if (b->h.flags & DS_BF_HASHED) ds_lh_remove(s, &s->hdr->blobs_ix, &ds_chunk_ops, bid);
        s->hdr->small_bytes -= ds_class_bytes(b->h.cls);
    } else {
        uint32_t *ext = (uint32_t *)ds_blob_payload(b), runs = ds_blob_runs(b);
        for (uint32_t e = 0; e < runs; e++) {
            uint32_t pg = ext[2 * e], np = ext[2 * e + 1];
            if (pg == DS_ZERO) { s->hdr->pages_zero -= np; continue; }
            for (uint32_t k = 0; k < np; k++) ds_page_decref(s, pg + k);
        }
    }
    ds_chunk_free(s, bid);
}

static void pending_release(ds_store *s, uint32_t pid) {
    ds_pending *pd = (ds_pending *)DS_CHUNK(s, pid);
    if (pd->h.kind != DS_K_PENDING) return;
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
        if (o->blob) blob_decref(s, o->blob);
    } else if (o->blob) {
        pending_release(s, o->blob);
    }
    ds_chunk_free(s, id);
}

void ds_object_decref(ds_store *s, uint32_t id) {
    if (id < 1 || (uint64_t)id >= s->hdr->heap_top) return;
    ds_object *o = obj_at(s, id);
    if (o->h.kind != DS_K_OBJECT || o->h.refcnt == 0) return;
    if (--o->h.refcnt == 0) ds_object_free(s, id);
}

/* Seal: state, counters, key, caller's handle.  Lock held. */
static int seal(ds_store *s, uint32_t id, uint32_t blob, uint64_t size,
                int keyed, uint32_t *handle) {
    ds_object *o = obj_at(s, id);
    o->blob = blob;
    o->size = size;
    o->state = DS_OBJ_SEALED;
    s->hdr->objects++;
    s->hdr->logical_bytes += size;
    *handle = handle_new(s, id, s->slot);
    if (!*handle) {                      /* no room for a handle: undo */
        ds_object_free(s, id);
        return DS_EFULL;
    }
    if (keyed) key_bind(s, id);
    return 0;
}

/* Allocate a blob with room for bufs, desc and payload bytes; fills the
 * fixed part, bufs and desc. */
static ds_blob *blob_new(ds_store *s, uint32_t *bid, uint16_t flags, uint64_t size,
                         const uint64_t *bufs, uint32_t nbufs,
                         const uint8_t *desc, uint32_t desclen, uint64_t payload) {
    uint64_t body = ALIGN16(16ull * nbufs + desclen) + payload;
    *bid = ds_chunk_alloc(s, sizeof(ds_blob) + body, DS_K_BLOB);
    if (!*bid) return NULL;
    ds_blob *b = (ds_blob *)DS_CHUNK(s, *bid);
    b->h.flags = flags;
    b->size = size;
    b->desclen = desclen;
    b->nbufs = nbufs;
    b->nextents = 0;
    b->body = (uint32_t)body;
    memcpy(ds_blob_bufs(b), bufs, 16ull * nbufs);
    memcpy(ds_blob_desc(b), desc, desclen);
    return b;
}

/* ---- small values: packed in the heap, deduplicated whole ---- */

static int put_small(ds_store *s, const uint8_t *key, uint32_t keylen, int keyed,
                     const uint8_t *desc, uint32_t desclen,
                     const ds_iov *bufs, uint32_t nbufs, uint32_t flags,
                     uint64_t size, uint32_t *obj, uint64_t *gen, uint32_t *handle) {
    /* image of the blob body, for hashing and comparing */
    uint64_t hdrlen = ALIGN16(16ull * nbufs + desclen);
    uint64_t body = hdrlen + size;
    uint8_t stackbuf[DS_SMALL_MAX + 64];
    uint8_t *img = body <= sizeof stackbuf ? stackbuf : malloc(body);
    if (!img) return ENOMEM;
    memset(img, 0, body);
    uint64_t *tab = (uint64_t *)img, off = 0;
    for (uint32_t i = 0; i < nbufs; i++) {
        tab[2 * i] = off;
        tab[2 * i + 1] = bufs[i].len;
        if (bufs[i].len) memcpy(img + hdrlen + off, bufs[i].base, bufs[i].len);
        off = ALIGN16(off + bufs[i].len);
    }
    memcpy(img + 16ull * nbufs, desc, desclen);
    uint64_t fp = ds_hash_bytes(s, img, body);
    int dedup = !(flags & DS_NODEDUP);

    ds_header *h = s->hdr;
    int rc = ds_lock(s);
    if (rc) goto out;
    uint32_t bid = DS_NIL;
    if (dedup) {
        uint64_t guard = DS_CHAIN_MAX(&h->blobs_ix);
        for (uint32_t x = ds_lh_first(s, &h->blobs_ix, (uint32_t)fp); x != DS_NIL && guard--;
             x = DS_CHUNK(s, x)->next) {
            ds_blob *b = (ds_blob *)DS_CHUNK(s, x);
            if (b->h.fp == (uint32_t)fp && b->size == size && b->desclen == desclen &&
                b->nbufs == nbufs && b->body == body && memcmp(b + 1, img, body) == 0) {
                bid = x;
                break;
            }
        }
    }
    uint32_t id;
    ds_object *o = object_new(s, key, keylen, &id);
    if (!o) { rc = DS_EFULL; goto unlock; }
    if (bid != DS_NIL) {
        DS_CHUNK(s, bid)->refcnt++;
    } else {
        uint64_t need = ds_chunk_bytes_for(sizeof(ds_blob) + body);
        if (h->pages_used * DS_PAGE_SIZE + h->small_bytes + need > h->capacity) {
            ds_chunk_free(s, id);
            rc = DS_EFULL;
            goto unlock;
        }
        bid = ds_chunk_alloc(s, sizeof(ds_blob) + body, DS_K_BLOB);
        if (!bid) { ds_chunk_free(s, id); rc = DS_EFULL; goto unlock; }
        ds_blob *b = (ds_blob *)DS_CHUNK(s, bid);
        b->size = size;
        b->desclen = desclen;
        b->nbufs = nbufs;
        b->nextents = 0;
        b->body = (uint32_t)body;
        memcpy(b + 1, img, body);
        b->h.fp = (uint32_t)fp;
        b->h.refcnt = 1;
        b->h.flags = DS_BF_SMALL | (dedup ? DS_BF_HASHED : DS_BF_NODEDUP);
        h->small_bytes += ds_class_bytes(b->h.cls);
        if (dedup) ds_lh_insert(s, &h->blobs_ix, &ds_chunk_ops, bid);
    }
    *gen = o->gen;
    *obj = id;
    rc = seal(s, id, bid, size, keyed, handle);
unlock:
    ds_unlock(s);
out:
    if (img != stackbuf) free(img);
    return rc;
}

/* ---- large values: pages ---- */

/* Page i of the value as a pointer: whole pages point into the caller's
 * buffer; a buffer's last partial page is copied, zero padded, to tmp. */
typedef struct srcpage { const uint8_t *p; uint32_t partial; } srcpage;

/* Build page runs from a page list; returns the number of runs. */
static uint32_t runs_of(const uint32_t *pages, uint32_t n, uint32_t *ext) {
    uint32_t r = 0;
    for (uint32_t i = 0; i < n;) {
        uint32_t j = i + 1;
        if (pages[i] == DS_ZERO) {
            while (j < n && pages[j] == DS_ZERO) j++;
        } else {
            while (j < n && pages[j] == pages[j - 1] + 1) j++;
        }
        if (ext) { ext[2 * r] = pages[i]; ext[2 * r + 1] = j - i; }
        r++;
        i = j;
    }
    return r;
}

/* Write the final blob for pages[0..n) and seal.  Lock held; the page
 * references move from the pending list to the blob. */
static int seal_pages(ds_store *s, uint32_t id, uint32_t *pages, uint32_t n, uint64_t size,
                      const uint64_t *tab, uint32_t nbufs,
                      const uint8_t *desc, uint32_t desclen, uint16_t bflags,
                      int keyed, uint32_t *handle) {
    uint32_t nruns = runs_of(pages, n, NULL);
    uint32_t bid;
    ds_blob *b = blob_new(s, &bid, bflags, size, tab, nbufs, desc, desclen, 8ull * nruns);
    if (!b) return DS_EFULL;
    b->nextents = runs_of(pages, n, (uint32_t *)ds_blob_payload(b));
    b->h.refcnt = 1;
    uint32_t zeros = 0;
    for (uint32_t i = 0; i < n; i++) zeros += pages[i] == DS_ZERO;
    s->hdr->pages_zero += zeros;
    ds_object *o = obj_at(s, id);
    uint32_t pend = o->blob;
    o->blob = 0;
    ds_chunk_free(s, pend);              /* references now held by the blob */
    return seal(s, id, bid, size, keyed, handle);
}

/* One thread's share of a large put: pages [lo, hi), in chunks small
 * enough to stay in the core's cache between fingerprinting and copying,
 * so the value is read from memory once. */
#define PUT_CHUNK 64u
#define PUT_THREAD_MIN 4096u     /* pages; below this one thread does it all */

typedef struct put_job {
    ds_store *s;
    uint32_t pend;             /* the object's PENDING chunk */
    int dedup;
    const srcpage *src;
    uint32_t *pages;           /* out: final page of each value page */
    uint32_t lo, hi;
    uint32_t cursor;           /* where this thread allocates next */
    int rc;
} put_job;

/* Lock held: give each listed page a fresh pool page (recorded in the
 * pending list).  0 or DS_EFULL. */
static int alloc_fresh(put_job *j, ds_pending *pd, uint32_t c, const uint32_t *idx,
                       uint32_t k, uint32_t *fresh) {
    int rc = ds_pages_alloc_at(j->s, k, fresh, &j->cursor);
    if (rc == 0)
        for (uint32_t x = 0; x < k; x++) pd->pages[c + idx[x]] = j->pages[c + idx[x]] = fresh[x];
    return rc;
}

static void *put_range(void *arg) {
    put_job *j = arg;
    ds_store *s = j->s;
    uint64_t fps[PUT_CHUNK];
    uint32_t fresh[PUT_CHUNK], missidx[PUT_CHUNK], candidx[PUT_CHUNK], falseidx[PUT_CHUNK];
    uint8_t zero[PUT_CHUNK];
    for (uint32_t c = j->lo; c < j->hi; c += PUT_CHUNK) {
        uint32_t e = c + PUT_CHUNK < j->hi ? c + PUT_CHUNK : j->hi, m = e - c;
        for (uint32_t i = 0; i < m; i++) {
            const uint8_t *p = j->src[c + i].p;
            zero[i] = (uint8_t)ds_page_is_zero(p);
            if (!zero[i]) fps[i] = ds_hash_bytes(s, p, DS_PAGE_SIZE);
        }
        /* lock: take a reference on each fingerprint match; fresh pages for the rest */
        int rc = ds_lock(s);
        if (rc) { j->rc = rc; return NULL; }
        ds_pending *pd = (ds_pending *)DS_CHUNK(s, j->pend);
        uint32_t nmiss = 0, ncand = 0;
        for (uint32_t i = 0; i < m; i++) {
            if (zero[i]) { j->pages[c + i] = DS_ZERO; continue; }
            uint32_t cand = j->dedup ? ds_page_candidate(s, fps[i]) : DS_NIL;
            if (cand != DS_NIL) {
                ds_page_incref(s, cand);
                pd->pages[c + i] = j->pages[c + i] = cand;
                candidx[ncand++] = i;
            } else {
                missidx[nmiss++] = i;
            }
        }
        if (ncand == 0) rc = alloc_fresh(j, pd, c, missidx, nmiss, fresh);
        ds_unlock(s);
        if (rc) { j->rc = rc; return NULL; }
        if (ncand) {
            /* no lock: verify every match byte for byte (the pages are ours
             * to read: we hold references, published pages never change) */
            uint32_t nfalse = 0;
            for (uint32_t k = 0; k < ncand; k++) {
                uint32_t i = candidx[k];
                if (memcmp(DS_POOL_RO(s, j->pages[c + i]), j->src[c + i].p, DS_PAGE_SIZE) != 0)
                    falseidx[nfalse++] = i;
            }
            /* lock: give back fingerprint collisions, then allocate fresh
             * pages for everything else in value order (one run, not bits) */
            rc = ds_lock(s);
            if (rc) { j->rc = rc; return NULL; }
            pd = (ds_pending *)DS_CHUNK(s, j->pend);
            for (uint32_t k = 0; k < nfalse; k++) {
                uint32_t i = falseidx[k];
                ds_page_decref(s, j->pages[c + i]);
                pd->pages[c + i] = j->pages[c + i] = DS_ZERO;
            }
            uint32_t a = 0, b = 0, nall = 0, all[PUT_CHUNK];
            while (a < nmiss || b < nfalse)      /* merge two ascending lists */
                all[nall++] = (b >= nfalse || (a < nmiss && missidx[a] < falseidx[b])) ? missidx[a++] : falseidx[b++];
            rc = alloc_fresh(j, pd, c, all, nall, fresh);
            ds_unlock(s);
            if (rc) { j->rc = rc; return NULL; }
            memcpy(missidx, all, 4ull * nall);
            nmiss = nall;
        }
        rc = ds_pool_reserve(s, fresh, nmiss);
        if (rc) { j->rc = rc; return NULL; }
        for (uint32_t k = 0; k < nmiss; k++)
            ds_copy_page(DS_POOL_RW(s, fresh[k]), j->src[c + missidx[k]].p);
        ds_copy_done();
        if (!j->dedup || nmiss == 0) continue;
        /* lock: publish, unless a racer (or an earlier page of this value)
         * published the same bytes meanwhile */
        rc = ds_lock(s);
        if (rc) { j->rc = rc; return NULL; }
        pd = (ds_pending *)DS_CHUNK(s, j->pend);
        for (uint32_t k = 0; k < nmiss; k++) {
            uint32_t i = missidx[k];
            uint32_t other = ds_page_find(s, fps[i], j->src[c + i].p);
            if (other != DS_NIL) {
                ds_page_incref(s, other);
                pd->pages[c + i] = j->pages[c + i] = other;
                ds_page_decref_cold(s, fresh[k]);
            } else {
                ds_page_publish(s, fresh[k], fps[i]);
            }
        }
        ds_unlock(s);
    }
    return NULL;
}

/* Lock held: a CREATED object with an empty pending list of n pages.
 * NULL (nothing allocated) if the heap is full. */
static ds_pending *created_new(ds_store *s, const uint8_t *key, uint32_t keylen,
                               uint32_t n, uint64_t size, uint32_t *id) {
    ds_object *o = object_new(s, key, keylen, id);
    uint32_t pend = o ? ds_chunk_alloc(s, sizeof(ds_pending) + 4ull * n, DS_K_PENDING) : 0;
    if (!pend) {
        if (o) ds_chunk_free(s, *id);
        return NULL;
    }
    ds_pending *pd = (ds_pending *)DS_CHUNK(s, pend);
    pd->npages = n;
    pd->size = size;
    pd->h.refcnt = 1;
    for (uint32_t i = 0; i < n; i++) pd->pages[i] = DS_ZERO;
    o->blob = pend;
    o->size = size;
    return pd;
}

static int put_large(ds_store *s, const uint8_t *key, uint32_t keylen, int keyed,
                     const uint8_t *desc, uint32_t desclen,
                     const ds_iov *bufs, uint32_t nbufs, uint32_t flags,
                     uint32_t *obj, uint64_t *gen, uint32_t *handle) {
    ds_header *h = s->hdr;
    int dedup = !(flags & DS_NODEDUP);
    uint64_t npages64 = 0;
    for (uint32_t i = 0; i < nbufs; i++) npages64 += (bufs[i].len + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE;
    if (npages64 == 0 || npages64 > h->cap_pages) return npages64 ? DS_EFULL : DS_EINVAL;
    uint32_t n = (uint32_t)npages64;

    uint64_t *tab = malloc(16ull * nbufs);
    srcpage *src = malloc(sizeof(srcpage) * n);
    uint32_t *pages = malloc(4ull * n);
    uint8_t *tails = malloc((uint64_t)nbufs * DS_PAGE_SIZE);
    int rc = 0;
    if (!tab || !src || !pages || !tails) { rc = ENOMEM; goto out; }

    uint64_t off = 0, size = 0;
    uint32_t k = 0;
    for (uint32_t i = 0; i < nbufs; i++) {
        tab[2 * i] = off;
        tab[2 * i + 1] = bufs[i].len;
        const uint8_t *p = bufs[i].base;
        uint64_t len = bufs[i].len;
        for (uint64_t o = 0; o < len; o += DS_PAGE_SIZE, k++) {
            src[k].partial = len - o < DS_PAGE_SIZE;
            src[k].p = p + o;
            if (src[k].partial) {          /* last partial page: zero padded copy */
                uint8_t *t = tails + (uint64_t)i * DS_PAGE_SIZE;
                memset(t, 0, DS_PAGE_SIZE);
                memcpy(t, p + o, len - o);
                src[k].p = t;
            }
        }
        off += (len + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE * DS_PAGE_SIZE;
        size = tab[2 * i] + len;
    }

    rc = ds_lock(s);
    if (rc) goto out;
    uint32_t id;
    ds_pending *pd = created_new(s, key, keylen, n, size, &id);
    if (!pd) {
        ds_unlock(s);
        rc = DS_EFULL;
        goto out;
    }
    ds_object *o = obj_at(s, id);
    uint32_t pend = o->blob;
    uint64_t mygen = o->gen;
    uint32_t hint = h->alloc_hint;
    ds_unlock(s);

    /* fingerprint, look up, copy: two threads for large values, each
     * allocating from its own part of the pool so the value stays one run */
    put_job jobs[2] = {{s, pend, dedup, src, pages, 0, n, hint, 0},
                       {s, pend, dedup, src, pages, n, n, hint, 0}};
    pthread_t th;
    int threaded = 0;
    if (n >= PUT_THREAD_MIN) {
        uint32_t mid = (n / 2 + PUT_CHUNK - 1) / PUT_CHUNK * PUT_CHUNK;
        jobs[0].hi = mid;
        jobs[1].lo = mid;
        jobs[1].cursor = hint + mid;
        threaded = pthread_create(&th, NULL, put_range, &jobs[1]) == 0;
        if (!threaded) jobs[0].hi = n;
    }
    put_range(&jobs[0]);
    if (threaded) pthread_join(th, NULL);
    rc = jobs[0].rc ? jobs[0].rc : jobs[1].rc;

    int lrc = ds_lock(s);
    if (lrc) { rc = lrc; goto out; }
    if (rc == 0) {
        rc = seal_pages(s, id, pages, n, size, tab, nbufs, desc, desclen,
                        dedup ? 0 : DS_BF_NODEDUP, keyed, handle);
        if (rc == 0) {
            *obj = id;
            *gen = mygen;
        }
    }
    if (rc && obj_check(s, id, mygen)) ds_object_free(s, id);
    ds_unlock(s);
out:
    free(tab); free(src); free(pages); free(tails);
    return rc;
}

int ds_put(ds_store *s, const uint8_t *key, uint32_t keylen,
           const uint8_t *desc, uint32_t desclen,
           const ds_iov *bufs, uint32_t nbufs, uint32_t flags,
           uint32_t *obj, uint64_t *gen, uint32_t *handle) {
    if (keylen > DS_MAX_KEY || desclen > (16u << 20) || nbufs > 65536 || (nbufs && !bufs))
        return DS_EINVAL;
    int keyed = key != NULL;
    uint64_t packed = ALIGN16(16ull * nbufs + desclen);
    for (uint32_t i = 0; i < nbufs; i++) {
        if (bufs[i].len && !bufs[i].base) return DS_EINVAL;
        if (bufs[i].len > (1ull << 46)) return DS_EFULL;
        packed += ALIGN16(bufs[i].len);
    }
    uint64_t size = 0;
    for (uint32_t i = 0; i < nbufs; i++) size = ALIGN16(size) + bufs[i].len;
    if (packed <= DS_SMALL_MAX)
        return put_small(s, key, keylen, keyed, desc, desclen, bufs, nbufs, flags,
                         size, obj, gen, handle);
    return put_large(s, key, keylen, keyed, desc, desclen, bufs, nbufs, flags, obj, gen, handle);
}

/* ---- create / commit ---- */

/* Map page runs at addr (MAP_FIXED).  shared: MAP_SHARED (writers), else
 * MAP_PRIVATE (copy-on-write).  Zero runs map anonymous zero pages. */
static int map_runs(ds_store *s, uint8_t *addr, const uint32_t *ext, uint32_t nruns,
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

/* Replace a caller's mapping with zero pages: whatever still points at it
 * reads zeros instead of faulting, until the owner unmaps it. */
static void scrub(uint8_t *addr, uint64_t len) {
    if (addr && len)
        mmap(addr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
}

static uint8_t *reserve_va(uint64_t len) {
    void *r = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return r == MAP_FAILED ? NULL : r;
}

int ds_create(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t nbytes,
              uint32_t *obj, uint64_t *gen, uint8_t **data) {
    ds_header *h = s->hdr;
    if (nbytes == 0 || keylen > DS_MAX_KEY) return DS_EINVAL;
    uint64_t n64 = (nbytes + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE;
    if (n64 > h->cap_pages) return DS_EFULL;
    uint32_t n = (uint32_t)n64;
    uint32_t *pages = malloc(4ull * n), *ext = malloc(8ull * n);
    if (!pages || !ext) { free(pages); free(ext); return ENOMEM; }
    int rc = ds_lock(s);
    if (rc) goto out;
    uint32_t id;
    ds_pending *pd = created_new(s, key, keylen, n, nbytes, &id);
    if (!pd) {
        ds_unlock(s);
        rc = DS_EFULL;
        goto out;
    }
    ds_object *o = obj_at(s, id);
    rc = ds_pages_alloc(s, n, pages);
    if (rc) { ds_object_free(s, id); ds_unlock(s); goto out; }
    memcpy(pd->pages, pages, 4ull * n);
    *obj = id;
    *gen = o->gen;
    ds_unlock(s);

    rc = ds_pool_reserve(s, pages, n);
    uint8_t *va = rc ? NULL : reserve_va(n64 * DS_PAGE_SIZE);
    if (!rc && !va) rc = ENOMEM;
    if (!rc) rc = map_runs(s, va, ext, runs_of(pages, n, ext), PROT_READ | PROT_WRITE, 1);
    if (rc) {
        if (va) munmap(va, n64 * DS_PAGE_SIZE);
        if (ds_lock(s) == 0) { ds_object_free(s, id); ds_unlock(s); }
        goto out;
    }
    /* fresh pages may hold a previous object's bytes: start from zero */
    memset(va, 0, nbytes);
    *data = va;
out:
    free(pages);
    free(ext);
    return rc;
}

static ds_object *created_by_me(ds_store *s, uint32_t obj, uint64_t gen) {
    ds_object *o = obj_check(s, obj, gen);
    if (!o || o->state != DS_OBJ_CREATED || o->owner != s->slot || !o->blob) return NULL;
    return o;
}

int ds_commit(ds_store *s, uint32_t obj, uint64_t gen,
              const uint8_t *desc, uint32_t desclen, uint8_t *data,
              uint32_t *handle) {
    if (desclen > (16u << 20)) return DS_EINVAL;
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_object *o = created_by_me(s, obj, gen);
    if (!o) { ds_unlock(s); return DS_ESTATE; }
    uint64_t size = o->size;
    uint32_t n = ds_list_len((ds_pending *)DS_CHUNK(s, o->blob));
    ds_unlock(s);

    uint64_t *fps = malloc(8ull * n);
    uint32_t *pages = malloc(4ull * n), *mine = malloc(4ull * n), *ext = malloc(8ull * n);
    if (!fps || !pages || !mine || !ext) { rc = ENOMEM; goto out; }
    for (uint32_t i = 0; i < n; i++)
        fps[i] = ds_hash_bytes(s, data + (uint64_t)i * DS_PAGE_SIZE, DS_PAGE_SIZE);

    rc = ds_lock(s);
    if (rc) goto out;
    o = created_by_me(s, obj, gen);
    if (!o) { ds_unlock(s); rc = DS_ESTATE; goto out; }
    ds_pending *pd = (ds_pending *)DS_CHUNK(s, o->blob);
    memcpy(mine, pd->pages, 4ull * n);
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p = data + (uint64_t)i * DS_PAGE_SIZE;
        if (ds_page_is_zero(p)) { pages[i] = DS_ZERO; continue; }
        uint32_t hit = ds_page_find(s, fps[i], p);   /* DS_NIL: none */
        if (hit != DS_NIL) ds_page_incref(s, hit);
        pages[i] = hit == DS_NIL ? mine[i] : hit;
    }
    /* remap the caller's buffer copy-on-write over the final pages before
     * the pages it replaces are freed (and maybe punched) */
    rc = map_runs(s, data, ext, runs_of(pages, n, ext), PROT_READ | PROT_WRITE, 0);
    if (rc) {
        for (uint32_t i = 0; i < n; i++)
            if (pages[i] != mine[i] && pages[i] != DS_ZERO) ds_page_decref(s, pages[i]);
        ds_object_free(s, obj);
        ds_unlock(s);
        scrub(data, (uint64_t)n * DS_PAGE_SIZE);
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (pages[i] == mine[i]) {
            ds_page_publish(s, mine[i], fps[i]);
        } else {
            pd->pages[i] = pages[i];
            ds_page_decref(s, mine[i]);
        }
    }
    uint64_t tab[2] = {0, size};
    rc = seal_pages(s, obj, pages, n, size, tab, 1, desc, desclen, 0,
                    o->keylen > 0, handle);
    ds_unlock(s);
out:
    free(fps); free(pages); free(mine); free(ext);
    return rc;
}

int ds_abort(ds_store *s, uint32_t obj, uint64_t gen, uint8_t *data) {
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_object *o = created_by_me(s, obj, gen);
    uint64_t n = o ? ds_list_len((ds_pending *)DS_CHUNK(s, o->blob)) : 0;
    if (o) ds_object_free(s, obj);
    ds_unlock(s);
    scrub(data, n * DS_PAGE_SIZE);
    return o ? 0 : DS_ESTATE;
}

/* ---- lookup, references ---- */

int ds_lookup(ds_store *s, const uint8_t *key, uint32_t keylen, uint32_t *obj, uint64_t *gen) {
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
    ds_object *o = obj_check(s, obj, gen);
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
    if (hid < 1 || (uint64_t)hid >= s->hdr->heap_top) return NULL;
    ds_handle *hd = (ds_handle *)DS_CHUNK(s, hid);
    return hd->h.kind == DS_K_HANDLE ? hd : NULL;
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

int ds_transit(ds_store *s, uint32_t obj, uint64_t gen, uint64_t *token) {
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

int ds_view(ds_store *s, uint32_t obj, uint64_t gen, int writable, ds_viewinfo *out) {
    /* The caller holds a reference: the object and its blob are immutable,
     * so no lock is needed to read them. */
    ds_object *o = obj_check(s, obj, gen);
    if (!o || o->state != DS_OBJ_SEALED || !o->blob || (o->oflags & DS_OF_DELETED))
        return DS_ENOTFOUND;
    if ((uint64_t)o->blob >= s->hdr->heap_top) return DS_ECORRUPT;
    ds_blob *b = (ds_blob *)DS_CHUNK(s, o->blob);
    if (b->h.kind != DS_K_BLOB) return DS_ECORRUPT;
    /* every size we hand out must stay inside the chunk */
    uint64_t room = ds_class_bytes(b->h.cls);
    uint64_t head = ALIGN16(16ull * b->nbufs + b->desclen);
    if (room < sizeof *b || b->body > room - sizeof *b || head > b->body ||
        (uint64_t)o->blob + room / DS_UNIT > s->hdr->heap_top)
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
    uint8_t *va = reserve_va(len);
    if (!va) return ENOMEM;
    int rc = map_runs(s, va, ext, b->nextents, writable ? PROT_READ | PROT_WRITE : PROT_READ, 0);
    if (rc) { munmap(va, len); return rc; }
    out->data = va;
    out->map_len = len;
    return 0;
}

int ds_unmap(void *addr, uint64_t len) {
    return munmap(addr, len) == 0 ? 0 : errno;
}

/* ---- delete, keys ---- */

int ds_delete_key(ds_store *s, const uint8_t *key, uint32_t keylen) {
    if (keylen > DS_MAX_KEY) return DS_EINVAL;
    int rc = ds_lock(s);
    if (rc) return rc;
    uint32_t id = key_find(s, key, keylen);
    if (id == DS_NIL) rc = DS_ENOTFOUND;
    else key_unbind(s, id);
    ds_unlock(s);
    return rc;
}

int ds_delete_obj(ds_store *s, uint32_t obj, uint64_t gen) {
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

int ds_count(ds_store *s, uint64_t *n) {
    int rc = ds_lock(s);
    if (rc) return rc;
    *n = s->hdr->keys;
    ds_unlock(s);
    return 0;
}

int ds_keys(ds_store *s, uint8_t *buf, uint64_t buflen, uint64_t *needed) {
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_lhash *t = &s->hdr->keys_ix;
    uint32_t nb = (1u << t->level) + t->split;
    const uint32_t *bk = (const uint32_t *)(s->ix + t->buckets_off);
    uint64_t pos = 0;
    uint64_t guard = DS_CHAIN_MAX(t) * 2;
    for (uint32_t b = 0; b < nb && b < t->max_buckets; b++) {
        for (uint32_t x = bk[b]; x != DS_NIL && guard; x = DS_CHUNK(s, x)->next, guard--) {
            if (DS_CHUNK(s, x)->kind != DS_K_OBJECT || obj_at(s, x)->keylen > DS_MAX_KEY) break;
            ds_object *o = obj_at(s, x);
            if (pos + 12 + o->keylen <= buflen) {
                memcpy(buf + pos, &o->keylen, 4);
                memcpy(buf + pos + 4, &o->size, 8);
                memcpy(buf + pos + 12, o->key, o->keylen);
            }
            pos += 12 + o->keylen;
        }
    }
    *needed = pos;
    ds_unlock(s);
    return pos > buflen ? ERANGE : 0;
}

/* ---- for refs.c (lock held) ---- */

uint32_t ds_handle_new(ds_store *s, uint32_t obj, uint32_t owner) {
    return handle_new(s, obj, owner);
}

int ds_object_alive(ds_store *s, uint32_t obj, uint64_t gen) {
    return live(s, obj, gen) != NULL;
}
