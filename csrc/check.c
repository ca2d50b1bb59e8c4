/*
 * check.c -- a full consistency check of a store (ds_check).
 *
 * Who may call: anyone; it changes nothing.  First, in slices of
 * CHECK_SLICE pages, it hashes every published page without the lock (a
 * mismatch is confirmed under the lock: the page may have been freed and
 * reused meanwhile); then it takes hdr->lock once for the rest (a
 * consistent snapshot of the metadata, no page contents read).  It walks the heap with the
 * one walk of layout.h (DS_FOR_CHUNKS).  It recomputes from the
 * primary records what every derived structure should be and compares:
 *   - every heap chunk has a known kind and class and ends inside the heap;
 *     every free list holds only free chunks of its class, without cycles,
 *     and every free chunk is on one;
 *   - objects: state, blob/pending, owner, key binding (and that the key
 *     index finds it), refcount == handles + binding;
 *   - blobs: refcount == objects using them; small blobs' content hash;
 *     page runs inside the pool;
 *   - handles point at live objects of their generation;
 *   - every page's refcount == references from blobs, pending lists and
 *     merge regions; "used" bit <=> referenced; no page both free and used;
 *   - every published page still hashes to its fingerprint (so the bytes
 *     of sealed objects are intact) and sits in the right index chain;
 *   - the counters stats() reports.
 * Offsets and counts read from shared memory are bounds-checked before
 * use, so a corrupt store is reported, not followed out of the mapping.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "layout.h"

typedef struct ck {
    ds_store *s;
    char *buf;
    uint64_t buflen, pos;
    uint32_t nerr;
} ck;

__attribute__((format(printf, 2, 3)))
static void err(ck *c, const char *fmt, ...) {
    c->nerr++;
    if (c->pos + 2 >= c->buflen) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(c->buf + c->pos, c->buflen - c->pos - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    c->pos += (uint64_t)n < c->buflen - c->pos - 1 ? (uint64_t)n : c->buflen - c->pos - 2;
    c->buf[c->pos++] = '\n';
    c->buf[c->pos] = 0;
}

/* the one validator (layout.h), for ids found in chunks */
static int chunk_ok(ds_store *s, uint64_t id, uint8_t kind) {
    return ds_chunk_get(s, id, kind) != NULL;
}

/* body of a chunk fits in it */
static int fits(ds_store *s, uint64_t id, uint64_t bytes) {
    return bytes <= ds_class_bytes(DS_CHUNK(s, id)->cls);
}

/* Every published page still hashes to its fingerprint (the bytes of
 * sealed objects are intact): CHECK_SLICE pages per lock hold, hashed
 * without the lock. */
#define CHECK_SLICE 4096u
static int check_contents(ds_store *s, ck *c, ds_checkinfo *out) {
    uint32_t *pg = malloc(8ull * CHECK_SLICE), *fp = pg + CHECK_SLICE;
    int rc = pg ? 0 : ENOMEM;
    for (uint32_t p0 = 0; rc == 0; p0 += CHECK_SLICE) {
        if ((rc = ds_lock(s))) break;
        ds_header *h = s->hdr;
        uint32_t hwm = h->page_hwm <= h->cap_pages ? h->page_hwm : h->cap_pages, n = 0;
        for (uint32_t p = p0; p < hwm && p - p0 < CHECK_SLICE; p++) {
            ds_pmeta *m = DS_PMETA(s, p);
            if (m->refcnt && m->next != DS_UNHASHED) { pg[n] = p; fp[n++] = m->fp; }
        }
        ds_unlock(s);
        if (p0 >= hwm) break;
        uint32_t bad = 0;
        for (uint32_t i = 0; i < n; i++) {
            out->bytes_checked += DS_PAGE_SIZE;
            if ((uint32_t)ds_hash_bytes(s, DS_POOL_RO(s, pg[i]), DS_PAGE_SIZE) != fp[i])
                pg[bad++] = pg[i];
        }
        if (!bad) continue;
        if ((rc = ds_lock(s))) break;
        for (uint32_t i = 0; i < bad; i++) {
            ds_pmeta *m = DS_PMETA(s, pg[i]);
            if (m->refcnt && m->next != DS_UNHASHED &&
                (uint32_t)ds_hash_bytes(s, DS_POOL_RO(s, pg[i]), DS_PAGE_SIZE) != m->fp)
                err(c, "page %u: bytes changed since it was published (shared by %u)", pg[i], m->refcnt);
        }
        ds_unlock(s);
    }
    free(pg);
    return rc;
}

int ds_check_in(ds_store *s, char *buf, uint64_t buflen, ds_checkinfo *out) {
    memset(out, 0, sizeof *out);
    if (buflen) buf[0] = 0;
    ck c = {s, buf, buflen, 0, 0};
    int rc = check_contents(s, &c, out);
    if (rc) return rc;
    if ((rc = ds_lock(s))) return rc;
    ds_header *h = s->hdr;
    uint32_t hwm = h->page_hwm <= h->cap_pages ? h->page_hwm : h->cap_pages;
    uint32_t *pref = calloc((size_t)hwm + 1, 4);         /* expected page refcounts */
    uint64_t top = h->heap_top;
    uint32_t *cref = calloc(top + 1, 4);                 /* expected chunk refcounts */
    if (!pref || !cref) { ds_unlock(s); free(pref); free(cref); return ENOMEM; }

    /* 1. walk the heap */
    uint64_t nfree = 0, objects = 0, keys = 0, logical = 0, small = 0, handles = 0, zero = 0;
    uint64_t walked = 1;                                 /* where the walk got to */
    DS_FOR_CHUNKS(s, id, ch) {
        walked = ds_chunk_next(s, id);
        switch (ch->kind) {
        case DS_K_FREE: nfree++; break;
        case DS_K_HANDLE: {
            ds_handle *hd = (ds_handle *)ch;
            handles++;
            if (!chunk_ok(s, hd->obj, DS_K_OBJECT) || ((ds_object *)DS_CHUNK(s, hd->obj))->gen != hd->gen)
                err(&c, "handle %llu: points at no live object", (unsigned long long)id);
            else cref[hd->obj]++;
            if (hd->owner != DS_TRANSIT_OWNER &&
                (hd->owner >= h->max_clients || DS_CLIENT(s, hd->owner)->pid == 0))
                err(&c, "handle %llu: owner slot %u is not attached", (unsigned long long)id, hd->owner);
            break;
        }
        case DS_K_OBJECT: {
            ds_object *o = (ds_object *)ch;
            if (!fits(s, id, DS_OBJ_BYTES(0, 0)) || !fits(s, id, DS_OBJ_BYTES(o->keylen, 0)) || o->keylen > DS_MAX_KEY) {
                err(&c, "object %llu: key does not fit", (unsigned long long)id);
                break;
            }
            if (o->state == DS_OBJ_SEALED) {
                objects++;
                logical += o->size;
                if (o->oflags & DS_OF_INLINE) {
                    if (o->blob || o->size > DS_INLINE_MAX ||
                        !fits(s, id, DS_OBJ_BYTES(o->keylen, (uint64_t)o->desclen + o->size)))
                        err(&c, "object %llu: inline value does not fit", (unsigned long long)id);
                    small += ds_class_bytes(ch->cls);
                } else if (!chunk_ok(s, o->blob, DS_K_BLOB)) {
                    err(&c, "object %llu: sealed without a blob", (unsigned long long)id);
                } else {
                    cref[o->blob]++;
                }
                if (o->oflags & DS_OF_KEYED) {
                    keys++;
                    cref[id]++;
                    uint32_t found = DS_NIL;
                    for (uint32_t x = ds_lh_first(s, &h->keys_ix, o->h.fp), guard = 0;
                         x != DS_NIL && guard < 1000000; x = DS_CHUNK(s, x)->next, guard++) {
                        if (x >= top) { err(&c, "key index: node %u outside the heap", x); break; }
                        if (x == id) { found = x; break; }
                    }
                    if (found == DS_NIL) err(&c, "object %llu: keyed but not in the key index", (unsigned long long)id);
                }
            } else if (o->state == DS_OBJ_CREATED) {
                if (o->owner >= h->max_clients || DS_CLIENT(s, o->owner)->pid == 0)
                    err(&c, "object %llu: being created by a client that is gone (run gc)", (unsigned long long)id);
                if (o->blob && !chunk_ok(s, o->blob, DS_K_PENDING))
                    err(&c, "object %llu: pending list missing", (unsigned long long)id);
                else if (o->blob) cref[o->blob]++;
            } else {
                err(&c, "object %llu: bad state %u", (unsigned long long)id, o->state);
            }
            break;
        }
        case DS_K_BLOB: {
            ds_blob *b = (ds_blob *)ch;
            uint64_t head = 16ull * b->nbufs + b->desclen;
            if (!fits(s, id, sizeof *b + (uint64_t)b->body) || head > b->body) {
                err(&c, "blob %llu: body does not fit", (unsigned long long)id);
                break;
            }
            if (b->h.flags & DS_BF_SMALL) {
                small += ds_class_bytes(ch->cls);
                if ((b->h.flags & DS_BF_HASHED) &&
                    (uint32_t)ds_hash_bytes(s, b + 1, b->body) != b->h.fp)
                    err(&c, "blob %llu: small value bytes changed since it was stored", (unsigned long long)id);
                out->bytes_checked += b->body;
            } else {
                uint64_t need = ((head + 15) & ~15ull) + 8ull * b->nextents;
                if (need > b->body) { err(&c, "blob %llu: page runs do not fit", (unsigned long long)id); break; }
                uint32_t *ext = (uint32_t *)ds_blob_payload(b);
                for (uint32_t e = 0; e < b->nextents; e++) {
                    uint32_t pg = ext[2 * e], np = ext[2 * e + 1];
                    if (pg == DS_ZERO) { zero += np; continue; }
                    if ((uint64_t)pg + np > hwm) { err(&c, "blob %llu: pages %u+%u outside the pool", (unsigned long long)id, pg, np); break; }
                }
            }
            break;
        }
        case DS_K_PENDING:
        case DS_K_MERGE: {
            ds_pending *pd = (ds_pending *)ch;
            if (!fits(s, id, sizeof *pd + 4ull * pd->npages)) { err(&c, "list %llu: does not fit", (unsigned long long)id); break; }
            if (ch->kind == DS_K_MERGE && (pd->owner >= h->max_clients || DS_CLIENT(s, pd->owner)->pid == 0))
                err(&c, "merge region %llu: owner is gone (run gc)", (unsigned long long)id);
            for (uint32_t k = 0; k < pd->npages; k++) {
                uint32_t pg = pd->pages[k];
                if (pg == DS_ZERO) continue;
                if (pg >= hwm) { err(&c, "list %llu: page %u outside the pool", (unsigned long long)id, pg); break; }
                pref[pg]++;
            }
            break;
        }
        default:
            err(&c, "heap: chunk %llu has unknown kind 0x%x", (unsigned long long)id, ch->kind);
        }
    }
    if (walked < top)
        err(&c, "heap: chunk %llu has bad class %u", (unsigned long long)walked,
            DS_CHUNK_RAW(s, walked)->cls);

    /* 2. references: objects, blobs (and pages through live blobs) */
    DS_FOR_CHUNKS(s, id, ch) {
        if (ch->kind == DS_K_OBJECT && ((ds_object *)ch)->state == DS_OBJ_SEALED && ch->refcnt != cref[id])
            err(&c, "object %llu: refcount %u, but %u references exist", (unsigned long long)id, ch->refcnt, cref[id]);
        if (ch->kind == DS_K_BLOB) {
            if (ch->refcnt != cref[id])
                err(&c, "blob %llu: refcount %u, but %u objects use it", (unsigned long long)id, ch->refcnt, cref[id]);
            ds_blob *b = (ds_blob *)ch;
            uint64_t head = 16ull * b->nbufs + b->desclen;
            if (!(b->h.flags & DS_BF_SMALL) && (cref[id] || (b->h.flags & DS_BF_REAP)) &&
                ((head + 15) & ~15ull) + 8ull * b->nextents <= b->body && fits(s, id, sizeof *b + (uint64_t)b->body)) {
                uint32_t *ext = (uint32_t *)ds_blob_payload(b);
                for (uint32_t e = 0; e < b->nextents; e++) {
                    uint32_t pg = ext[2 * e], np = ext[2 * e + 1];
                    if (pg == DS_ZERO || (uint64_t)pg + np > hwm) continue;
                    for (uint32_t k = 0; k < np; k++) pref[pg + k]++;
                }
            }
        }
    }

    /* 3. free lists */
    uint64_t listed = 0;
    for (unsigned cl = 0; cl < DS_NCLASSES; cl++) {
        uint64_t guard = 0;
        for (uint32_t x = h->free_head[cl]; x; x = DS_CHUNK(s, x)->next) {
            if (x >= top || DS_CHUNK(s, x)->kind != DS_K_FREE || DS_CHUNK(s, x)->cls != cl) {
                err(&c, "free list %u: entry %u is not a free chunk of that class", cl, x);
                break;
            }
            if (++guard > nfree) { err(&c, "free list %u: cycle", cl); break; }
            listed++;
            if (DS_CHUNK(s, x)->next == DS_NIL) break;
        }
    }
    if (listed != nfree) err(&c, "heap: %llu free chunks, %llu on free lists", (unsigned long long)nfree, (unsigned long long)listed);

    /* 4. pages */
    const uint64_t *used = (const uint64_t *)(s->ix + h->used_off);
    const uint64_t *backed = (const uint64_t *)(s->ix + h->backed_off);
    uint64_t pages_used = 0, shared = 0, sharing = 0, hashed = 0, warm = 0;
    for (uint32_t p = 0; p < hwm; p++) {
        ds_pmeta *m = DS_PMETA(s, p);
        int u = (int)((used[p >> 6] >> (p & 63)) & 1);
        if (m->refcnt != pref[p])
            err(&c, "page %u: refcount %u, but %u references exist", p, m->refcnt, pref[p]);
        if (u != (m->refcnt > 0))
            err(&c, "page %u: %s but refcount %u", p, u ? "marked used" : "marked free", m->refcnt);
        if (m->refcnt) {
            pages_used++;
            if (m->refcnt >= 2) { shared++; sharing += m->refcnt - 1; }
        } else if (!u && ((backed[p >> 6] >> (p & 63)) & 1)) {
            warm++;                               /* free and still backed */
        }
        if (m->next != DS_UNHASHED && m->refcnt) {
            hashed++;
            uint32_t x = ds_lh_first(s, &h->pages_ix, m->fp), guard = 0;
            while (x != DS_NIL && x != p && x < h->cap_pages && guard++ < 1000000) x = DS_PMETA(s, x)->next;
            if (x != p) err(&c, "page %u: published but not in the content index", p);
        }
    }
    if (hashed != h->pages_ix.count)
        err(&c, "content index: holds %u pages, %llu are published", h->pages_ix.count, (unsigned long long)hashed);

    /* 5. counters */
#define CMP(field, val) \
    if (h->field != (val)) err(&c, "counter " #field ": %llu, should be %llu", \
                               (unsigned long long)h->field, (unsigned long long)(val))
    CMP(objects, objects);
    CMP(keys, keys);
    CMP(logical_bytes, logical);
    CMP(small_bytes, small);
    CMP(handles, handles);
    CMP(pages_used, pages_used);
    CMP(pages_shared, shared);
    CMP(pages_sharing, sharing);
    CMP(pages_zero, zero);
    CMP(warm_free, warm);
#undef CMP
    out->objects = objects;
    out->pages = pages_used;
    out->errors = c.nerr;
    ds_unlock(s);
    free(pref);
    free(cref);
    return 0;
}
