/*
 * heap.c -- the metadata heap and the linear hash indexes.
 *
 * Who may call: code holding hdr->lock (ds_lock), in any process; except
 * ds_class_bytes/ds_chunk_bytes_for (pure; the class table is filled once
 * per process through pthread_once) and ds_fallocate (a syscall wrapper).
 * ds_chunk_get (layout.h) is the one check of a chunk id read from shared
 * memory, ds_chunk_next/DS_FOR_CHUNKS the one heap walk.
 *
 * The heap is a bump region of the index file cut into chunks of fixed
 * size classes (about four per doubling, so at most ~20% of a chunk is
 * slack).  Chunks are never split or coalesced: a freed chunk joins the
 * free list of its class and is reused for the next request of that
 * class.  Free chunks of 64 KiB or more give their pages back to the OS.
 * Because chunk headers are written before the bump pointer moves, the
 * heap can always be walked from unit 1 to heap_top; crash recovery
 * rebuilds the free lists that way.
 *
 * The hash indexes use Litwin's linear hashing: the bucket array grows
 * one bucket per split, so the memory it touches follows the number of
 * entries rather than the capacity the store was created with.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include "layout.h"
#include "sysdeps.h"

#define LH_INIT_LEVEL 6
#define LH_LOAD 2
#define PUNCH_MIN (64u * 1024u)
#define HEAP_BACK_STEP (64u << 10)

static uint64_t g_cls_units[DS_NCLASSES];
static pthread_once_t g_cls_once = PTHREAD_ONCE_INIT;
__thread uint64_t ds_dummy[DS_DUMMY_BYTES / 8] __attribute__((aligned(64)));

static void cls_fill(void) {
    uint64_t u = 2;
    for (unsigned c = 0; c < DS_NCLASSES; c++) {
        g_cls_units[c] = u;
        uint64_t n = u + u / 4;
        u = n > u ? n : u + 1;
    }
}

static void cls_init(void) { pthread_once(&g_cls_once, cls_fill); }

int ds_fallocate(int fd, int mode, uint64_t off, uint64_t len) {
    int r;
    do r = fallocate(fd, mode, (off_t)off, (off_t)len);
    while (r != 0 && errno == EINTR);
    return r;
}

uint64_t ds_class_bytes(unsigned cls) {
    cls_init();
    return cls < DS_NCLASSES ? g_cls_units[cls] * DS_UNIT : 0;
}

static int cls_for(uint64_t bytes) {
    cls_init();
    uint64_t units = (bytes + DS_UNIT - 1) / DS_UNIT;
    for (unsigned c = 0; c < DS_NCLASSES; c++)
        if (g_cls_units[c] >= units) return (int)c;
    return -1;
}

/* Bytes of the chunk a request of 'bytes' gets (0: too large). */
uint64_t ds_chunk_bytes_for(uint64_t bytes) {
    int cls = cls_for(bytes);
    return cls < 0 ? 0 : g_cls_units[cls] * DS_UNIT;
}

uint32_t ds_chunk_alloc(ds_store *s, uint64_t bytes, uint8_t kind) {
    ds_header *h = s->hdr;
    int cls = cls_for(bytes);
    if (cls < 0) return 0;
    uint64_t units = g_cls_units[cls];
    uint32_t id = h->free_head[cls];
    if (id && (!ds_chunk_get(s, id, DS_K_FREE) || DS_CHUNK(s, id)->cls != cls)) {
        h->free_head[cls] = 0;               /* corrupt list: forget it (leaks, never overlaps) */
        id = 0;
    }
    if (id) {
        ds_chunk *c = DS_CHUNK(s, id);
        if (units * DS_UNIT >= PUNCH_MIN &&
            ds_back(s, h->heap_off + (uint64_t)id * DS_UNIT, units * DS_UNIT) != 0)
            return 0;
        h->free_head[cls] = c->next;
    } else {
        uint64_t top = h->heap_top;
        if ((top + units) * DS_UNIT > h->heap_size || top + units > 0xFFFFFFFFull)
            return 0;
        uint64_t end = (top + units) * DS_UNIT;
        if (end > h->heap_backed) {
            uint64_t want = (end + HEAP_BACK_STEP - 1) & ~(uint64_t)(HEAP_BACK_STEP - 1);
            if (want > h->heap_size) want = h->heap_size;
            if (ds_back(s, h->heap_off + h->heap_backed, want - h->heap_backed) != 0)
                return 0;
            h->heap_backed = want;
        }
        id = (uint32_t)top;
        ds_chunk *c = DS_CHUNK_RAW(s, id);
        c->cls = (uint8_t)cls;
        c->kind = DS_K_FREE;
        /* header first, then the bump pointer: the heap stays walkable */
        __atomic_store_n(&h->heap_top, top + units, __ATOMIC_RELEASE);
    }
    ds_chunk *c = DS_CHUNK(s, id);
    c->cls = (uint8_t)cls;
    c->flags = 0;
    c->refcnt = 0;
    c->next = DS_NIL;
    c->fp = 0;
    c->kind = kind;
    h->meta_bytes += units * DS_UNIT;
    return id;
}

/* Free a chunk.  An id that names no allocated chunk (outside the heap,
 * unknown class, already free) is ignored: freeing it would put a bad or
 * duplicate entry on a free list. */
void ds_chunk_free(ds_store *s, uint32_t id) {
    ds_header *h = s->hdr;
    ds_chunk *c = ds_chunk_get(s, id, 0);
    if (!c || c->kind == DS_K_FREE) return;
    uint64_t bytes = ds_class_bytes(c->cls);
    h->meta_bytes -= bytes;
    c->kind = DS_K_FREE;
    c->next = h->free_head[c->cls];
    h->free_head[c->cls] = id;
    if (bytes >= PUNCH_MIN) {
        /* keep the first page (header); return the rest */
        uint64_t start = h->heap_off + (uint64_t)id * DS_UNIT;
        uint64_t lo = (start + DS_PAGE_SIZE) & ~(uint64_t)(DS_PAGE_SIZE - 1);
        uint64_t hi = (start + bytes) & ~(uint64_t)(DS_PAGE_SIZE - 1);
        if (hi > lo)
            ds_fallocate(s->index_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, lo, hi - lo);
    }
}

/* Rebuild the free lists by walking the heap.  Returns with meta_bytes
 * recomputed.  Chunks of unknown kind are left alone (reported by check). */
void ds_heap_rebuild_free(ds_store *s) {
    ds_header *h = s->hdr;
    cls_init();
    memset(h->free_head, 0, sizeof h->free_head);
    h->meta_bytes = 0;
    uint64_t end = 1;
    DS_FOR_CHUNKS(s, id, c) {
        uint64_t units = g_cls_units[c->cls];
        if (c->kind == DS_K_FREE) {
            c->next = h->free_head[c->cls];
            h->free_head[c->cls] = (uint32_t)id;
        } else {
            h->meta_bytes += units * DS_UNIT;
        }
        end = id + units;
    }
    if (end < h->heap_top) h->heap_top = end;       /* torn tail */
}

uint64_t ds_chunk_next(ds_store *s, uint64_t id) {
    uint64_t top = s->hdr->heap_top;
    if (id < 1 || id >= top) return 0;
    uint64_t units = ds_class_bytes(DS_CHUNK_RAW(s, id)->cls) / DS_UNIT;
    return units && id + units <= top ? id + units : 0;
}

/* ---- linear hashing ---- */

static uint32_t *lh_buckets(ds_store *s, ds_lhash *t) {
    return (uint32_t *)(s->ix + t->buckets_off);
}

static uint32_t lh_nil = DS_NIL;   /* stand-in bucket for a corrupt level/split */

static uint32_t lh_nbuckets(ds_lhash *t) { return (1u << t->level) + t->split; }

static uint32_t lh_slot(ds_lhash *t, uint32_t h) {
    uint32_t b = h & ((1u << t->level) - 1);
    if (b < t->split) b = h & ((2u << t->level) - 1);
    return b;
}

/* make sure bucket b is backed and initialised */
static int lh_ensure(ds_store *s, ds_lhash *t, uint32_t b) {
    uint64_t need = ((uint64_t)b + 1) * 4;
    if (need <= t->backed) return 0;
    uint64_t want = (need + 65535) & ~(uint64_t)65535;
    uint64_t max = (uint64_t)t->max_buckets * 4;
    if (want > max) want = max;
    if (ds_back(s, t->buckets_off + t->backed, want - t->backed) != 0) return DS_EFULL;
    memset(s->ix + t->buckets_off + t->backed, 0xFF, want - t->backed);
    t->backed = want;
    return 0;
}

void ds_lh_reset(ds_store *s, ds_lhash *t) {
    t->level = LH_INIT_LEVEL;
    t->split = 0;
    t->count = 0;
    if (t->backed) memset(s->ix + t->buckets_off, 0xFF, t->backed);
    lh_ensure(s, t, (1u << LH_INIT_LEVEL) - 1);
}

static void lh_split(ds_store *s, ds_lhash *t, const ds_lhops *ops) {
    uint32_t nb = lh_nbuckets(t);
    if (nb >= t->max_buckets) return;
    uint32_t old = t->split, hi = old + (1u << t->level);
    if ((uint64_t)old * 4 + 4 > t->backed) return;   /* corrupt split: do not grow */
    if (lh_ensure(s, t, hi) != 0) return;   /* stay at this size: chains grow */
    uint32_t *bk = lh_buckets(s, t);
    uint32_t id = bk[old];
    bk[old] = DS_NIL;
    bk[hi] = DS_NIL;
    uint32_t mask = (2u << t->level) - 1;
    uint64_t guard = DS_CHAIN_MAX(t);
    while (id != DS_NIL && guard--) {
        uint32_t *np = ops->next(s, id);
        uint32_t nx = *np;
        uint32_t dst = (ops->hash(s, id) & mask) == old ? old : hi;
        *np = bk[dst];
        bk[dst] = id;
        id = nx;
    }
    if (++t->split == (1u << t->level)) { t->level++; t->split = 0; }
}

int ds_lh_insert(ds_store *s, ds_lhash *t, const ds_lhops *ops, uint32_t id) {
    uint32_t *bk = lh_buckets(s, t);
    uint32_t b = lh_slot(t, ops->hash(s, id));
    if ((uint64_t)b * 4 + 4 > t->backed) return DS_ECORRUPT;
    *ops->next(s, id) = bk[b];
    bk[b] = id;
    t->count++;
    if (t->count > (uint64_t)lh_nbuckets(t) * LH_LOAD) lh_split(s, t, ops);
    return 0;
}

void ds_lh_remove(ds_store *s, ds_lhash *t, const ds_lhops *ops, uint32_t id) {
    uint32_t b = lh_slot(t, ops->hash(s, id));
    uint32_t *p = (uint64_t)b * 4 + 4 > t->backed ? &lh_nil : &lh_buckets(s, t)[b];
    uint64_t guard = DS_CHAIN_MAX(t);
    while (*p != DS_NIL && guard--) {
        if (*p == id) {
            *p = *ops->next(s, id);
            t->count--;
            return;
        }
        p = ops->next(s, *p);
    }
}

uint32_t ds_lh_first(ds_store *s, ds_lhash *t, uint32_t hash) {
    uint32_t b = lh_slot(t, hash);
    if ((uint64_t)b * 4 + 4 > t->backed) return DS_NIL;   /* corrupt level/split */
    return lh_buckets(s, t)[b];
}

static uint32_t *page_next(ds_store *s, uint32_t pg) { return &DS_PMETA(s, pg)->next; }
static uint32_t page_hash(ds_store *s, uint32_t pg) { return DS_PMETA(s, pg)->fp; }
static uint32_t *chunk_next(ds_store *s, uint32_t id) { return &DS_CHUNK(s, id)->next; }
static uint32_t chunk_hash(ds_store *s, uint32_t id) { return DS_CHUNK(s, id)->fp; }

const ds_lhops ds_pages_ops = {page_next, page_hash};
const ds_lhops ds_chunk_ops = {chunk_next, chunk_hash};
