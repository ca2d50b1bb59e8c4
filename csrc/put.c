/*
 * put.c -- the put pipeline: ds_put, and ds_create/ds_commit/ds_abort,
 * which feed the same pipeline from a buffer the caller filled in place.
 *
 * Who may call: the public functions take hdr->lock themselves, briefly
 * and many times; the heavy work -- zero checks, fingerprints, byte
 * comparisons, copying, fallocate, mmap -- runs outside it.  Objects,
 * keys, references and views are object.c's.
 *
 * A large value (ds_put, or ds_commit of a created one), step by step:
 *   1. (lock)     create an OBJECT in state CREATED owned by this client,
 *                 with a PENDING list of its pages (all DS_ZERO).
 * then for each piece of PUT_CHUNK pages (two threads for large values):
 *   1b. if the previous piece ended on pool page P, predict P+1.. for this
 *      one (lock: take references if all are published; no lock: compare
 *      bytes): a whole-piece match is done -- a duplicate of a stored
 *      value costs one read of both copies.  Else:
 *   1c. if the previous piece was all new pages, this one most likely is
 *      too: (lock) take fresh pages for all of it (if there is room: else
 *      the usual way), (no lock) fingerprint each page while copying it
 *      in -- one read of the source --, (lock) publish, or give back the
 *      fresh page of a zero page, an in-piece repeat, or a page whose
 *      bytes are already published (compared under the lock).  Else:
 *   2. (no lock)  note zero pages; fingerprint the others; find pages equal
 *                 to an earlier page of the same piece (within-value dedup).
 *   3. (lock)     for each page, take a reference on a published page with
 *                 the same fingerprint (a candidate), or note a miss.
 *   4. (no lock)  compare every candidate byte for byte.
 *   5. (lock)     give back false candidates; allocate fresh pages for the
 *                 misses -- the only step that costs capacity, so zero pages
 *                 and dedup hits never make a put fail for want of room.
 *   6. (no lock)  back the fresh pages (fallocate: a full tmpfs fails here,
 *                 cleanly) and copy the bytes in.
 *   7. (lock)     publish each fresh page -- unless a racer published the
 *                 same bytes meanwhile, then use that one and free ours --
 *                 and give the in-piece duplicates their page.
 * Finally (lock) write the BLOB (descriptor + page runs), seal, bind the
 * key, hand the caller a reference.  Every page reference taken is in the
 * PENDING list at once, so if the process dies anywhere, gc (or crash
 * recovery) knows exactly which pages to give back.
 *
 * create/commit: ds_create hands out private anonymous memory (zero
 * filled: no earlier object's bytes can show through) and reserves no
 * pool page; ds_commit zeroes the tail of the last page, runs the pipeline
 * over that memory, seals, and then remaps the caller's buffer
 * copy-on-write onto the stored pages (freeing the anonymous copy).
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

/* ---- tiny values: inline in the object chunk, after the key ---- */

static int put_inline(ds_store *s, const uint8_t *key, uint32_t keylen, int keyed,
                      const uint8_t *desc, uint32_t desclen, const ds_iov *buf,
                      uint32_t *obj, uint64_t *gen, uint32_t *handle) {
    ds_header *h = s->hdr;
    uint64_t need = ds_chunk_bytes_for(DS_OBJ_BYTES(keylen, (uint64_t)desclen + buf->len));
    int rc = ds_lock(s);
    if (rc) return rc;
    uint32_t id;
    ds_object *o = NULL;
    if (h->pages_used * DS_PAGE_SIZE + h->small_bytes + need <= h->capacity)
        o = ds_object_new(s, key, keylen, (uint64_t)desclen + buf->len, &id);
    if (!o) {
        ds_unlock(s);
        return DS_EFULL;
    }
    o->desclen = desclen;
    memcpy(DS_OBJ_INLINE_DESC(o), desc, desclen);
    if (buf->len) memcpy(DS_OBJ_INLINE_DATA(o), buf->base, buf->len);
    o->oflags |= DS_OF_INLINE;
    h->small_bytes += ds_class_bytes(o->h.cls);
    *gen = o->gen;
    *obj = id;
    rc = ds_object_seal(s, id, 0, buf->len, keyed, handle);
    ds_unlock(s);
    return rc;
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
            ds_blob *b = (ds_blob *)ds_chunk_get(s, x, DS_K_BLOB);
            if (!b) break;                       /* corrupt chain: no dedup */
            if (b->h.fp == (uint32_t)fp && b->size == size && b->desclen == desclen &&
                b->nbufs == nbufs && b->body == body &&
                ds_class_bytes(b->h.cls) >= sizeof *b + body && memcmp(b + 1, img, body) == 0) {
                bid = x;
                break;
            }
        }
    }
    uint32_t id;
    ds_object *o = ds_object_new(s, key, keylen, 0, &id);
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
    rc = ds_object_seal(s, id, bid, size, keyed, handle);
unlock:
    ds_unlock(s);
out:
    if (img != stackbuf) free(img);
    return rc;
}

/* ---- large values: pages ---- */

/* Page i of the value as a pointer: whole pages point into the caller's
 * buffer; a buffer's last partial page is copied, zero padded, to tmp. */
typedef struct srcpage { const uint8_t *p; } srcpage;

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

/* Allocate a blob with room for bufs, desc and payload bytes; fills the
 * fixed part, bufs and desc.  Lock held. */
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
    return ds_object_seal(s, id, bid, size, keyed, handle);
}

/* One thread's share of a value: pages [lo, hi), in pieces small enough
 * to stay in the core's cache between fingerprinting and copying, so the
 * value is read from memory once. */
#define PUT_CHUNK 64u
#define PUT_THREAD_MIN 4096u     /* pages; below this one thread does it all */
#define NOSAME 0xFFu

typedef struct put_job {
    ds_store *s;
    uint32_t obj;              /* the CREATED object being filled */
    uint64_t gen;
    uint32_t pend;             /* its PENDING chunk */
    int dedup;
    const srcpage *src;
    uint32_t *pages;           /* out: final page of each value page */
    uint32_t lo, hi;
    uint32_t cursor;           /* where this thread allocates next */
    int rc;
} put_job;

/* Lock held: the object's pending list, if the object is still ours,
 * CREATED, with this list, and the list has room for our pages.  Between
 * two lock holds another thread may have aborted or committed it, or gc
 * reaped it: then nothing of it may be touched again.  DS_ESTATE. */
static ds_pending *job_pending(put_job *j, int *rc) {
    ds_store *s = j->s;
    ds_object *o = ds_obj_check(s, j->obj, j->gen);
    ds_pending *pd = (ds_pending *)ds_chunk_get(s, j->pend, DS_K_PENDING);
    if (!o || o->state != DS_OBJ_CREATED || o->owner != s->slot || o->blob != j->pend ||
        !pd || ds_list_len(pd) < j->hi) {
        *rc = DS_ESTATE;
        return NULL;
    }
    return pd;
}

/* Lock held: give each listed page a fresh pool page (recorded in the
 * pending list).  0 or DS_EFULL. */
static int alloc_fresh(put_job *j, ds_pending *pd, uint32_t c, const uint32_t *idx,
                       uint32_t k, uint32_t *fresh) {
    int rc = ds_pages_alloc_at(j->s, k, fresh, &j->cursor);
    if (rc == 0)
        for (uint32_t x = 0; x < k; x++) pd->pages[c + idx[x]] = j->pages[c + idx[x]] = fresh[x];
    return rc;
}

/* Lock held: the pages of this piece that equal an earlier page of it get
 * that page's final page (one more reference each). */
static void resolve_same(put_job *j, ds_pending *pd, uint32_t c, uint32_t m, const uint8_t *same) {
    for (uint32_t i = 0; i < m; i++) {
        if (same[i] == NOSAME) continue;
        uint32_t pg = j->pages[c + same[i]];
        ds_page_incref(j->s, pg);
        pd->pages[c + i] = j->pages[c + i] = pg;
    }
}

/* The prediction: a value that matched pool page P at its page i most
 * likely goes on as P+1, P+2, ... (a duplicate of a stored value, or of
 * a stored prefix).  Lock: take a reference on each of the m predicted
 * pages if all are published; no lock: compare them byte for byte with
 * the piece (stopping at the first difference).  1 if the whole piece is
 * so resolved -- no zero checks, no fingerprints, no index lookups: a
 * duplicate put reads both copies once, which is the floor.  0 if not:
 * the references are given back and the piece goes the usual way. */
static int put_predicted(put_job *j, uint32_t c, uint32_t m, uint32_t pred, int *rc) {
    ds_store *s = j->s;
    if (pred == DS_NIL || (uint64_t)pred + m > s->hdr->page_hwm) return 0;
    if ((*rc = ds_lock(s))) return 0;
    ds_pending *pd = job_pending(j, rc);
    uint32_t k = 0;
    if (pd)
        for (; k < m; k++) {
            ds_pmeta *pm = DS_PMETA(s, pred + k);
            if (pm->refcnt == 0 || pm->next == DS_UNHASHED) break;   /* free, or not published */
        }
    if (!pd || k < m) {
        ds_unlock(s);
        return 0;
    }
    for (k = 0; k < m; k++) {
        ds_page_incref(s, pred + k);
        pd->pages[c + k] = j->pages[c + k] = pred + k;
    }
    ds_unlock(s);
    /* published pages we hold references on never change: compare freely */
    for (k = 0; k < m; k++)
        if (memcmp(DS_POOL_RO(s, pred + k), j->src[c + k].p, DS_PAGE_SIZE) != 0) break;
    if (k == m) return 1;
    if ((*rc = ds_lock(s))) return 0;
    if ((pd = job_pending(j, rc)))
        for (k = 0; k < m; k++) {
            ds_page_decref(s, pred + k);
            pd->pages[c + k] = j->pages[c + k] = DS_ZERO;
        }
    ds_unlock(s);
    return 0;
}

/* An earlier page of this piece with the same fingerprint and bytes as
 * page i (in-piece dedup), through the open-addressed table 'seen'; else
 * NOSAME, and page i goes into the table.  No lock: the caller's bytes. */
static uint8_t same_in_piece(put_job *j, uint32_t c, const uint64_t *fps, uint8_t *seen,
                             uint32_t i) {
    const uint8_t *p = j->src[c + i].p;
    uint32_t h = (uint32_t)fps[i] & (2 * PUT_CHUNK - 1);
    for (; seen[h] != NOSAME; h = (h + 1) & (2 * PUT_CHUNK - 1)) {
        uint32_t k = seen[h];
        if (fps[k] == fps[i] && memcmp(j->src[c + k].p, p, DS_PAGE_SIZE) == 0) return (uint8_t)k;
    }
    seen[h] = (uint8_t)i;
    return NOSAME;
}

/* A piece of a value that has been all new so far (the last piece found
 * nothing to share): most likely this one is new too, so take fresh
 * pages first and fingerprint while copying -- one read of the source
 * instead of two -- then publish, or, for a page that turns out to be
 * zero, a repeat within the piece, or already stored (compared byte for
 * byte under the lock), give the fresh page back.  1 if done (*rc 0),
 * 0 if not tried: no room for optimism (the usual path counts only new
 * pages against capacity).  *shared: pages that were not new. */
static int put_optimistic(put_job *j, uint32_t c, uint32_t m, uint32_t *shared, int *rc) {
    ds_store *s = j->s;
    uint64_t fps[PUT_CHUNK];
    uint32_t fresh[PUT_CHUNK], all[PUT_CHUNK];
    uint8_t zero[PUT_CHUNK], same[PUT_CHUNK], seen[2 * PUT_CHUNK];
    for (uint32_t i = 0; i < m; i++) all[i] = i;
    if ((*rc = ds_lock(s))) return 0;
    ds_pending *pd = job_pending(j, rc);
    if (pd && alloc_fresh(j, pd, c, all, m, fresh) != 0) pd = NULL;   /* full: the usual way */
    ds_unlock(s);
    if (!pd) return 0;
    if ((*rc = ds_pool_reserve(s, fresh, m))) return 1;
    memset(seen, NOSAME, sizeof seen);
    uint32_t nsame = 0;
    for (uint32_t i = 0; i < m; i++) {
        const uint8_t *p = j->src[c + i].p;
        same[i] = NOSAME;
        if ((zero[i] = (uint8_t)ds_page_is_zero(p))) continue;
        fps[i] = ds_hash_copy_page(s, DS_POOL_RW(s, fresh[i]), p);
        if ((same[i] = same_in_piece(j, c, fps, seen, i)) != NOSAME) nsame++;
    }
    ds_copy_done();
    if ((*rc = ds_lock(s))) return 1;
    if (!(pd = job_pending(j, rc))) { ds_unlock(s); return 1; }
    uint32_t n = 0;
    for (uint32_t i = 0; i < m; i++) {
        uint32_t other = DS_NIL;
        if (zero[i] || same[i] != NOSAME ||
            (other = ds_page_find(s, fps[i], j->src[c + i].p)) != DS_NIL) {
            /* ours is not needed: a zero page or an in-piece repeat stays
             * warm for the next put; a page another put published meanwhile
             * (concurrent puts of the same value) goes back to the OS, as
             * the usual path's publish race does */
            if (other != DS_NIL) {
                ds_page_incref(s, other);
                ds_page_decref_cold(s, fresh[i]);
            } else {
                ds_page_decref(s, fresh[i]);
            }
            pd->pages[c + i] = j->pages[c + i] = other != DS_NIL ? other : DS_ZERO;
            n++;
        } else {
            ds_page_publish(s, fresh[i], fps[i]);
        }
    }
    if (nsame) resolve_same(j, pd, c, m, same);
    ds_unlock(s);
    *shared = n;
    return 1;
}

static void *put_range(void *arg) {
    put_job *j = arg;
    ds_store *s = j->s;
    uint64_t fps[PUT_CHUNK];
    uint32_t fresh[PUT_CHUNK], missidx[PUT_CHUNK], candidx[PUT_CHUNK], falseidx[PUT_CHUNK];
    uint8_t zero[PUT_CHUNK], same[PUT_CHUNK];
    uint32_t pred = DS_NIL;                      /* pool page predicted for page c */
    int all_new = 0;                             /* the last piece was all new pages */
    for (uint32_t c = j->lo; c < j->hi; c += PUT_CHUNK) {
        uint32_t e = c + PUT_CHUNK < j->hi ? c + PUT_CHUNK : j->hi, m = e - c;
        uint32_t nsame = 0;
        if (j->dedup) {
            int rc = 0;
            if (put_predicted(j, c, m, pred, &rc)) { pred += m; all_new = 0; continue; }
            if (rc) { j->rc = rc; return NULL; }
            uint32_t shared = 0;
            if (all_new && put_optimistic(j, c, m, &shared, &rc)) {
                if (rc) { j->rc = rc; return NULL; }
                all_new = shared == 0;
                uint32_t last = j->pages[e - 1];
                pred = last != DS_ZERO ? last + 1 : DS_NIL;
                continue;
            }
            if (rc) { j->rc = rc; return NULL; }
            /* next piece: predict from where this one ends (set below) */
            pred = DS_NIL;
        }
        uint8_t seen[2 * PUT_CHUNK];             /* open addressing on fingerprints */
        memset(seen, NOSAME, sizeof seen);
        for (uint32_t i = 0; i < m; i++) {
            const uint8_t *p = j->src[c + i].p;
            same[i] = NOSAME;
            zero[i] = (uint8_t)ds_page_is_zero(p);
            if (zero[i]) continue;
            fps[i] = ds_hash_bytes(s, p, DS_PAGE_SIZE);
            if (!j->dedup) continue;
            if ((same[i] = same_in_piece(j, c, fps, seen, i)) != NOSAME) nsame++;
        }
        /* lock: take a reference on each fingerprint match; fresh pages for the rest */
        int rc = ds_lock(s);
        if (rc) { j->rc = rc; return NULL; }
        ds_pending *pd = job_pending(j, &rc);
        if (!pd) { ds_unlock(s); j->rc = rc; return NULL; }
        uint32_t nmiss = 0, ncand = 0;
        for (uint32_t i = 0; i < m; i++) {
            if (zero[i]) { j->pages[c + i] = DS_ZERO; continue; }
            if (same[i] != NOSAME) continue;
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
        if (rc == 0 && ncand == 0 && nmiss == 0 && nsame) resolve_same(j, pd, c, m, same);
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
            if (!(pd = job_pending(j, &rc))) { ds_unlock(s); j->rc = rc; return NULL; }
            for (uint32_t k = 0; k < nfalse; k++) {
                uint32_t i = falseidx[k];
                ds_page_decref(s, j->pages[c + i]);
                pd->pages[c + i] = j->pages[c + i] = DS_ZERO;
            }
            uint32_t a = 0, b = 0, nall = 0, all[PUT_CHUNK];
            while (a < nmiss || b < nfalse)      /* merge two ascending lists */
                all[nall++] = (b >= nfalse || (a < nmiss && missidx[a] < falseidx[b])) ? missidx[a++] : falseidx[b++];
            rc = alloc_fresh(j, pd, c, all, nall, fresh);
            if (rc == 0 && nall == 0 && nsame) resolve_same(j, pd, c, m, same);
            ds_unlock(s);
            if (rc) { j->rc = rc; return NULL; }
            memcpy(missidx, all, 4ull * nall);
            nmiss = nall;
        }
        pred = j->pages[e - 1] != DS_ZERO ? j->pages[e - 1] + 1 : DS_NIL;
        all_new = nmiss == m;
        if (nmiss == 0) continue;                /* in-piece duplicates resolved above */
        rc = ds_pool_reserve(s, fresh, nmiss);
        if (rc) { j->rc = rc; return NULL; }
        for (uint32_t k = 0; k < nmiss; k++)
            ds_copy_page(DS_POOL_RW(s, fresh[k]), j->src[c + missidx[k]].p);
        ds_copy_done();
        if (!j->dedup) continue;
        /* lock: publish, unless a racer (or an earlier page of this value)
         * published the same bytes meanwhile */
        rc = ds_lock(s);
        if (rc) { j->rc = rc; return NULL; }
        if (!(pd = job_pending(j, &rc))) { ds_unlock(s); j->rc = rc; return NULL; }
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
        if (nsame) resolve_same(j, pd, c, m, same);
        uint32_t last = j->pages[e - 1];
        ds_unlock(s);
        pred = last != DS_ZERO ? last + 1 : DS_NIL;
    }
    return NULL;
}

/* Run the pipeline over src[0..n): two threads for large values, each
 * allocating from its own part of the pool so the value stays one run.
 * pages[] receives the final page of each value page.  No lock held. */
static int pipeline(ds_store *s, uint32_t obj, uint64_t gen, uint32_t pend, int dedup,
                    const srcpage *src, uint32_t n, uint32_t *pages, uint32_t hint) {
    put_job jobs[2] = {{s, obj, gen, pend, dedup, src, pages, 0, n, hint, 0},
                       {s, obj, gen, pend, dedup, src, pages, n, n, hint, 0}};
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
    return jobs[0].rc ? jobs[0].rc : jobs[1].rc;
}

/* Lock held: a CREATED object with an empty pending list of n pages.
 * NULL (nothing allocated) if the heap is full. */
static ds_pending *created_new(ds_store *s, const uint8_t *key, uint32_t keylen,
                               uint32_t n, uint64_t size, uint32_t *id) {
    ds_object *o = ds_object_new(s, key, keylen, 0, id);
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

/* Lock held: the CREATED object of ours, if it still is (and, pend != 0,
 * still has that pending list); NULL once it was committed, aborted or
 * reaped. */
static ds_object *created_by_me(ds_store *s, uint32_t obj, uint64_t gen, uint32_t pend) {
    ds_object *o = ds_obj_check(s, obj, gen);
    if (!o || o->state != DS_OBJ_CREATED || o->owner != s->slot ||
        !ds_chunk_get(s, o->blob, DS_K_PENDING) || (pend && o->blob != pend))
        return NULL;
    return o;
}

/* Most pages one value may have: its page list must fit in a chunk of
 * the heap (larger ones fail there with DS_EFULL anyway). */
#define MAX_VALUE_PAGES (1ull << 30)

static int put_large(ds_store *s, const uint8_t *key, uint32_t keylen, int keyed,
                     const uint8_t *desc, uint32_t desclen,
                     const ds_iov *bufs, uint32_t nbufs, uint32_t flags,
                     uint32_t *obj, uint64_t *gen, uint32_t *handle) {
    int dedup = !(flags & DS_NODEDUP);
    uint64_t npages64 = 0;
    for (uint32_t i = 0; i < nbufs; i++) npages64 += (bufs[i].len + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE;
    /* no comparison with the capacity here: zero pages and dedup hits
     * cost none, so only the pipeline's allocations can say "full" */
    if (npages64 == 0 || npages64 > MAX_VALUE_PAGES) return npages64 ? DS_EFULL : DS_EINVAL;
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
            src[k].p = p + o;
            if (len - o < DS_PAGE_SIZE) {  /* last partial page: zero padded copy */
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
    uint32_t hint = s->hdr->alloc_hint;
    ds_unlock(s);

    rc = pipeline(s, id, mygen, pend, dedup, src, n, pages, hint);

    int lrc = ds_lock(s);
    if (lrc) { rc = lrc; goto out; }
    if (rc == 0 && !created_by_me(s, id, mygen, pend)) rc = DS_ESTATE;
    if (rc == 0) {
        rc = seal_pages(s, id, pages, n, size, tab, nbufs, desc, desclen,
                        dedup ? 0 : DS_BF_NODEDUP, keyed, handle);
        if (rc == 0) {
            *obj = id;
            *gen = mygen;
        }
    }
    if (rc && created_by_me(s, id, mygen, pend)) ds_object_free(s, id);
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
    if (!handle && !keyed) return DS_EINVAL;       /* it would be unreachable */
    if (nbufs == 1 && size <= DS_INLINE_MAX && desclen <= 4 * DS_INLINE_MAX)
        return put_inline(s, key, keylen, keyed, desc, desclen, bufs, obj, gen, handle);
    if (packed <= DS_SMALL_MAX)
        return put_small(s, key, keylen, keyed, desc, desclen, bufs, nbufs, flags,
                         size, obj, gen, handle);
    return put_large(s, key, keylen, keyed, desc, desclen, bufs, nbufs, flags, obj, gen, handle);
}

/* ---- create / commit ---- */

/* Replace a caller's mapping with zero pages: whatever still points at it
 * reads zeros instead of faulting, until the owner unmaps it. */
static void scrub(uint8_t *addr, uint64_t len) {
    if (addr && len)
        mmap(addr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
}

int ds_create(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t nbytes,
              uint32_t *obj, uint64_t *gen, uint8_t **data) {
    if (nbytes == 0 || keylen > DS_MAX_KEY) return DS_EINVAL;
    uint64_t n64 = (nbytes + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE;
    if (n64 > MAX_VALUE_PAGES) return DS_EFULL;
    uint32_t n = (uint32_t)n64;
    /* the pending list is made now, so a heap too small for it fails here;
     * pool pages are taken (and capacity counted) only at commit */
    int rc = ds_lock(s);
    if (rc) return rc;
    uint32_t id;
    ds_pending *pd = created_new(s, key, keylen, n, nbytes, &id);
    uint64_t mygen = pd ? obj_at(s, id)->gen : 0;
    ds_unlock(s);
    if (!pd) return DS_EFULL;
    /* private, zero-filled memory: nothing of an earlier object shows */
    void *va = mmap(NULL, n64 * DS_PAGE_SIZE, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (va == MAP_FAILED) {
        rc = errno;
        if (ds_lock(s) == 0) {
            if (ds_obj_check(s, id, mygen)) ds_object_free(s, id);
            ds_unlock(s);
        }
        return rc;
    }
    *obj = id;
    *gen = mygen;
    *data = va;
    return 0;
}


/* After a commit: make the caller's buffer a copy-on-write view of the
 * stored pages (its anonymous copy is freed).  The caller holds a
 * reference, so the pages stay.  A value of more runs than a view may map
 * keeps its anonymous copy (same bytes).  If a remap fails part way, the
 * whole buffer becomes one anonymous mapping refilled from the pool.
 * No lock.  0, or errno if even that failed. */
static int remap_committed(ds_store *s, uint8_t *data, const uint32_t *pages, uint32_t n) {
    uint32_t nruns = runs_of(pages, n, NULL);
    if (nruns > ds_view_runs_max()) return 0;
    uint32_t *ext = malloc(8ull * nruns);
    if (!ext) return 0;                      /* keep the anonymous copy */
    runs_of(pages, n, ext);
    int rc = ds_map_runs(s, data, ext, nruns, PROT_READ | PROT_WRITE, 0);
    free(ext);
    if (rc == 0) return 0;
    uint64_t len = (uint64_t)n * DS_PAGE_SIZE;
    if (mmap(data, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
             -1, 0) == MAP_FAILED)
        return errno;
    for (uint32_t i = 0; i < n; i++)
        if (pages[i] != DS_ZERO)
            memcpy(data + (uint64_t)i * DS_PAGE_SIZE, DS_POOL_RO(s, pages[i]), DS_PAGE_SIZE);
    return 0;
}

int ds_commit(ds_store *s, uint32_t obj, uint64_t gen,
              const uint8_t *desc, uint32_t desclen, uint8_t *data,
              uint32_t *handle) {
    if (desclen > (16u << 20) || !data) return DS_EINVAL;
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_object *o = created_by_me(s, obj, gen, 0);
    if (!o) { ds_unlock(s); return DS_ESTATE; }
    uint64_t size = o->size;
    uint32_t pend = o->blob, n = ds_list_len((ds_pending *)DS_CHUNK(s, pend));
    int keyed = o->keylen > 0;
    uint32_t hint = s->hdr->alloc_hint;
    ds_unlock(s);
    if ((uint64_t)n * DS_PAGE_SIZE < size) return DS_ECORRUPT;

    srcpage *src = malloc(sizeof(srcpage) * (n ? n : 1));
    uint32_t *pages = malloc(4ull * (n ? n : 1));
    if (!src || !pages) { rc = ENOMEM; goto fail; }
    /* the last page's tail is not the caller's: zero, so that a put of the
     * same bytes finds this page */
    if (size % DS_PAGE_SIZE) memset(data + size, 0, DS_PAGE_SIZE - size % DS_PAGE_SIZE);
    for (uint32_t i = 0; i < n; i++) src[i].p = data + (uint64_t)i * DS_PAGE_SIZE;

    rc = pipeline(s, obj, gen, pend, 1, src, n, pages, hint);

    int lrc = ds_lock(s);
    if (lrc) { rc = lrc; goto fail; }
    if (rc == 0) {
        uint64_t tab[2] = {0, size};
        rc = created_by_me(s, obj, gen, pend)
                 ? seal_pages(s, obj, pages, n, size, tab, 1, desc, desclen, 0, keyed, handle)
                 : DS_ESTATE;
    }
    ds_unlock(s);
    if (rc) goto fail;

    rc = remap_committed(s, data, pages, n);
    if (rc) {                                /* the buffer is gone: undo the commit */
        ds_delete_obj_in(s, obj, gen);
        ds_release(s, *handle);
        scrub(data, (uint64_t)n * DS_PAGE_SIZE);
    }
    free(src); free(pages);
    return rc;
fail:
    /* discarded (ds_abort's state): its pages go back, the buffer reads zeros */
    if (ds_lock(s) == 0) {
        if (created_by_me(s, obj, gen, 0)) ds_object_free(s, obj);
        ds_unlock(s);
    }
    scrub(data, (uint64_t)n * DS_PAGE_SIZE);
    free(src); free(pages);
    return rc;
}

int ds_abort(ds_store *s, uint32_t obj, uint64_t gen, uint8_t *data) {
    int rc = ds_lock(s);
    if (rc) return rc;
    ds_object *o = created_by_me(s, obj, gen, 0);
    uint64_t n = o ? ds_list_len((ds_pending *)DS_CHUNK(s, o->blob)) : 0;
    if (o) ds_object_free(s, obj);
    ds_unlock(s);
    scrub(data, n * DS_PAGE_SIZE);
    return o ? 0 : DS_ESTATE;
}
