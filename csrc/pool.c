/*
 * pool.c -- the pool of physical pages: allocation, reference counts,
 * the content index, backing and returning memory.
 *
 * Who may call: code holding hdr->lock, except ds_pool_reserve(), which
 * runs without the lock on pages the caller has just allocated (their
 * bits in the backed bitmap are changed with atomic operations, since
 * other pages' bits share the word).
 *
 * A page is free when its "used" bit is clear.  Free pages are either
 * still backed ("warm": already faulted in, cheap to reuse) or punched
 * out of the tmpfs file; at most hdr->warm_pages stay warm.  A page is
 * punched only when nothing references it: punching zeroes it under every
 * mapping, so it must be unreachable first (docs/ARCHITECTURE.md, measured costs).
 *
 * Decay (like jemalloc's dirty_decay_ms).  Freeing never punches a page
 * while the warm cap has room: the page stays warm and its page meta 'fp'
 * records when it was freed (layout.h).  ds_decay(), driven by a
 * background thread of each process (src/dedupshm/_decay.py), punches
 * warm pages idle longer than the decay time, one fallocate per run of
 * consecutive pages, in bounded slices under the lock.  Pages freed past
 * the cap (or lost to a publish race) are queued in a per-thread list and
 * punched in runs by ds_unlock, in slices of PUNCH_SLICE pages with the
 * lock released between them: until then they are free, backed and
 * counted warm, so warm_free == the number of free backed pages always.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include "layout.h"
#include "sysdeps.h"

#define PMETA_BACK_STEP (64u << 10)

static uint64_t *bm_used(ds_store *s) { return (uint64_t *)(s->ix + s->hdr->used_off); }
static uint64_t *bm_backed(ds_store *s) { return (uint64_t *)(s->ix + s->hdr->backed_off); }

static int bit_get(uint64_t *bm, uint32_t i) { return (int)((__atomic_load_n(&bm[i >> 6], __ATOMIC_RELAXED) >> (i & 63)) & 1); }
static void bit_set(uint64_t *bm, uint32_t i) { __atomic_fetch_or(&bm[i >> 6], 1ULL << (i & 63), __ATOMIC_RELAXED); }
static void bit_clr(uint64_t *bm, uint32_t i) { __atomic_fetch_and(&bm[i >> 6], ~(1ULL << (i & 63)), __ATOMIC_RELAXED); }

int ds_pmeta_ensure(ds_store *s, uint32_t page) {
    ds_header *h = s->hdr;
    uint64_t need = ((uint64_t)page + 1) * sizeof(ds_pmeta);
    if (need <= h->pmeta_backed) return 0;
    uint64_t want = (need + PMETA_BACK_STEP - 1) & ~(uint64_t)(PMETA_BACK_STEP - 1);
    uint64_t max = ((uint64_t)h->cap_pages * sizeof(ds_pmeta) + 4095) & ~4095ULL;
    if (want > max) want = max;
    if (ds_back(s, h->pmeta_off + h->pmeta_backed, want - h->pmeta_backed) != 0)
        return DS_EFULL;
    h->pmeta_backed = want;
    return 0;
}

/* Allocate n free pages, lowest first (keeps the files and the page meta
 * compact).  Each gets refcnt 1 and is private (DS_UNHASHED).  Counts
 * against capacity.  Returns 0 or DS_EFULL with nothing changed. */
int ds_pages_alloc(ds_store *s, uint32_t n, uint32_t *out) {
    return ds_pages_alloc_at(s, n, out, NULL);
}

/* Same, scanning from *cursor (if given and above the lowest free page),
 * and leaving *cursor after the last page taken: a caller that allocates
 * in pieces gets contiguous runs, also when two threads share a value. */
int ds_pages_alloc_at(ds_store *s, uint32_t n, uint32_t *out, uint32_t *cursor) {
    ds_header *h = s->hdr;
    if (n == 0) return 0;
    if ((h->pages_used + n) * DS_PAGE_SIZE + h->small_bytes > h->capacity ||
        h->pages_used + n > h->cap_pages)
        return DS_EFULL;
    uint64_t *used = bm_used(s);
    uint32_t got = 0, pg = h->alloc_hint;
    int from_hint = 1;
    if (cursor && *cursor > pg && *cursor < h->cap_pages) { pg = *cursor; from_hint = 0; }
    uint32_t start = pg;
    uint32_t words = (h->cap_pages + 63) / 64;
    for (uint32_t w = pg >> 6; w < words && got < n; w++) {
        uint64_t v = used[w];
        if (v == ~0ULL) continue;
        for (uint32_t b = (w == (pg >> 6)) ? (pg & 63) : 0; b < 64 && got < n; b++) {
            uint32_t p = w * 64 + b;
            if (p >= h->cap_pages) break;
            if (!((v >> b) & 1)) out[got++] = p;
        }
    }
    if (got < n && !from_hint) {            /* wrap: take what is below the cursor */
        pg = h->alloc_hint;
        for (uint32_t w = pg >> 6; w <= (start >> 6) && got < n; w++) {
            uint64_t v = used[w];
            if (v == ~0ULL) continue;
            for (uint32_t b = (w == (pg >> 6)) ? (pg & 63) : 0; b < 64 && got < n; b++) {
                uint32_t q = w * 64 + b;
                if (q >= start) break;
                if (!((v >> b) & 1)) out[got++] = q;
            }
        }
    }
    if (got < n) return DS_EFULL;  /* cannot happen if counters are right */
    uint32_t maxp = 0;
    for (uint32_t i = 0; i < n; i++) if (out[i] > maxp) maxp = out[i];
    if (ds_pmeta_ensure(s, maxp) != 0) return DS_EFULL;
    uint64_t *backed = bm_backed(s);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t p = out[i];
        bit_set(used, p);
        if (bit_get(backed, p) && h->warm_free) h->warm_free--;
        ds_pmeta *m = DS_PMETA(s, p);
        m->refcnt = 1;
        m->next = DS_UNHASHED;
        m->fp = 0;
    }
    h->pages_used += n;
    uint32_t top = 0;
    for (uint32_t i = 0; i < n; i++) if (out[i] + 1 > top) top = out[i] + 1;
    if (from_hint) h->alloc_hint = out[n - 1] + 1;   /* everything below is used */
    if (top > h->page_hwm) h->page_hwm = top;
    if (cursor) *cursor = out[n - 1] + 1;
    return 0;
}

/* Back the given (freshly allocated) pages in the pool file.  No lock.
 * Returns 0 or DS_EFULL (tmpfs full). */
int ds_pool_reserve(ds_store *s, const uint32_t *pages, uint32_t n) {
    uint64_t *backed = bm_backed(s);
    uint32_t i = 0;
    while (i < n) {
        if (pages[i] == DS_ZERO || bit_get(backed, pages[i])) { i++; continue; }
        uint32_t j = i + 1;
        while (j < n && pages[j] == pages[j - 1] + 1 && !bit_get(backed, pages[j])) j++;
        if (ds_fallocate(s->pool_fd, 0, (uint64_t)pages[i] * DS_PAGE_SIZE,
                         (uint64_t)(j - i) * DS_PAGE_SIZE) != 0)
            return errno == ENOSPC ? DS_EFULL : errno;
        /* map them into our writable view in one go (cheaper than a fault
         * per page); harmless if the kernel lacks it */
        madvise(DS_POOL_RW(s, pages[i]), (size_t)(j - i) * DS_PAGE_SIZE, MADV_POPULATE_WRITE);
        for (uint32_t k = i; k < j; k++) bit_set(backed, pages[k]);
        i = j;
    }
    return 0;
}

void ds_page_incref(ds_store *s, uint32_t page) {
    ds_header *h = s->hdr;
    ds_pmeta *m = DS_PMETA(s, page);
    if (m->refcnt == 1) h->pages_shared++;
    if (m->refcnt >= 1) h->pages_sharing++;
    m->refcnt++;
}

/* The page's last reference is gone: unindex it, free it, keep it warm or
 * return its memory. */
static void page_free(ds_store *s, uint32_t page, int keep_warm);

void ds_page_free_raw(ds_store *s, uint32_t page) { page_free(s, page, 1); }

/* Drop a reference; a page freed by it goes straight back to the OS (for
 * pages that lost a publish race: keeping them warm would only hold
 * memory that concurrent puts of the same content just duplicated). */
void ds_page_decref_cold(ds_store *s, uint32_t page) {
    ds_pmeta *m = DS_PMETA(s, page);
    if (m->refcnt == 1) {
        m->refcnt = 0;
        page_free(s, page, 0);
    } else {
        ds_page_decref(s, page);
    }
}

uint32_t ds_now_ms32(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}

/* Pages freed past the warm cap by this thread, as runs (a value's pages
 * are freed in order, so they coalesce), to be punched by ds_unlock in
 * slices of PUNCH_SLICE pages, each under one lock hold: deleting a value
 * far past the cap never holds the lock for the whole punch.  Until its
 * slice, a queued page is an ordinary warm page (a put may take it; the
 * slice then skips it).  Thread-local (and small: static TLS): only the
 * lock holder fills or flushes it.  A page that finds the queue full
 * stays warm for the decay pass. */
#define PUNCH_SLICE 2048u
#define PUNCH_RUNS 24u
static __thread uint32_t punch_p[PUNCH_RUNS], punch_len[PUNCH_RUNS];
static __thread uint32_t punch_n;
static __thread ds_store *punch_s;

/* The freed-at stamp, read once per lock hold (a clock read per page
 * was half of a 256 MiB delete); ds_punch_flush, at unlock, forgets it. */
static __thread uint32_t stamp_ms;
static __thread int stamp_ok;

/* Punch one run of free pages [p, p+n) and mark them unbacked.  Lock held.
 * The bits go first: a crash in between leaves pages marked unbacked that
 * are still backed (reserved again, harmlessly, on reuse), never pages
 * marked backed that are holes (their first write could SIGBUS on a full
 * tmpfs). */
static void punch_run(ds_store *s, uint32_t p, uint32_t n) {
    ds_header *h = s->hdr;
    uint64_t *backed = bm_backed(s);
    for (uint32_t k = p; k < p + n; k++) bit_clr(backed, k);
    h->warm_free = h->warm_free >= n ? h->warm_free - n : 0;
    ds_fallocate(s->pool_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 (uint64_t)p * DS_PAGE_SIZE, (uint64_t)n * DS_PAGE_SIZE);
}

/* Punch up to PUNCH_SLICE queued pages that are still free and backed (a
 * put may have taken some back), one fallocate per run.  Lock held;
 * ds_unlock calls it until the queue is empty.  1 if pages are left. */
int ds_punch_flush(ds_store *s) {
    stamp_ok = 0;
    if (!punch_n) return 0;
    if (punch_s != s) { punch_n = 0; return 0; }   /* cannot happen: flushed at unlock */
    uint64_t *used = bm_used(s), *backed = bm_backed(s);
    uint32_t budget = PUNCH_SLICE, r = 0;
    for (; r < punch_n && budget; r++) {
        uint32_t p = punch_p[r], take = punch_len[r] < budget ? punch_len[r] : budget;
        uint32_t end = p + take;
        budget -= take;
        while (p < end) {
            if (bit_get(used, p) || !bit_get(backed, p)) { p++; continue; }
            uint32_t q = p + 1;
            while (q < end && !bit_get(used, q) && bit_get(backed, q)) q++;
            punch_run(s, p, q - p);
            p = q;
        }
        if (take < punch_len[r]) {                 /* the rest of this run: next slice */
            punch_p[r] += take;
            punch_len[r] -= take;
            break;
        }
    }
    memmove(punch_p, punch_p + r, 4ull * (punch_n - r));
    memmove(punch_len, punch_len + r, 4ull * (punch_n - r));
    punch_n -= r;
    return punch_n != 0;
}

/* After the lock is released: nothing queued (another store's queue
 * cannot be: each unlock drains its own). */
void ds_punch_forget(void) { punch_n = 0; }

static void punch_later(ds_store *s, uint32_t page) {
    if (punch_n && punch_s != s) punch_n = 0;      /* cannot happen */
    punch_s = s;
    if (punch_n) {
        uint32_t r = punch_n - 1;
        if (punch_p[r] + punch_len[r] == page) { punch_len[r]++; return; }
        if (page + 1 == punch_p[r]) { punch_p[r]--; punch_len[r]++; return; }
    }
    if (punch_n == PUNCH_RUNS) return;            /* stays warm: decay punches it */
    punch_p[punch_n] = page;
    punch_len[punch_n++] = 1;
}

static void page_free(ds_store *s, uint32_t page, int keep_warm) {
    ds_header *h = s->hdr;
    ds_pmeta *m = DS_PMETA(s, page);
    if (m->next != DS_UNHASHED) ds_lh_remove(s, &h->pages_ix, &ds_pages_ops, page);
    m->next = DS_UNHASHED;
    m->refcnt = 0;
    bit_clr(bm_used(s), page);
    h->pages_used--;
    if (page < h->alloc_hint) h->alloc_hint = page;
    if (!bit_get(bm_backed(s), page)) return;      /* never backed: nothing to return */
    /* warm: stays backed; 'fp' of a free page is when it was freed */
    if (!stamp_ok) { stamp_ms = ds_now_ms32(); stamp_ok = 1; }
    m->fp = stamp_ms;
    int over = !keep_warm || h->warm_free >= h->warm_pages;
    h->warm_free++;
    if (!over) return;
    punch_later(s, page);
}

/* One pass (at most) over the pool from *cursor: punch every warm page
 * freed at least decay_ms ago, in runs, in slices of at most SLICE_WORDS
 * bitmap words and SLICE_PAGES punched pages per lock hold.  Called
 * without the lock, by any thread (refs.c's guard around it).  Returns
 * the pages returned and the warm pages left. */
#define SLICE_WORDS 512u
#define SLICE_PAGES 4096u
int ds_decay_in(ds_store *s, uint32_t decay_ms, uint32_t *cursor, uint64_t *returned,
                uint64_t *warm_left) {
    uint64_t done = 0;
    uint32_t pos = *cursor, scanned = 0;
    int rc = 0;
    for (;;) {
        if ((rc = ds_lock(s)) != 0) break;
        ds_header *h = s->hdr;
        uint32_t hwm = h->page_hwm;
        if (hwm > h->cap_pages) hwm = h->cap_pages;
        if (h->warm_free == 0 || hwm == 0 || scanned >= hwm) {
            *warm_left = h->warm_free;
            ds_unlock(s);
            break;
        }
        if (pos >= hwm) pos = 0;
        pos &= ~63u;
        uint64_t *used = bm_used(s), *backed = bm_backed(s);
        uint32_t now = ds_now_ms32(), punched = 0, words = 0;
        uint32_t run0 = 0, runn = 0;
        while (words < SLICE_WORDS && punched < SLICE_PAGES && pos < hwm && scanned < hwm) {
            uint64_t warm = __atomic_load_n(&backed[pos >> 6], __ATOMIC_RELAXED) & ~used[pos >> 6];
            for (uint32_t b = 0; warm && b < 64; b++) {
                uint32_t p = pos + b;
                if (!((warm >> b) & 1) || p >= hwm) continue;
                if ((uint32_t)(now - DS_PMETA(s, p)->fp) < decay_ms) continue;
                if (runn && run0 + runn == p) { runn++; continue; }
                if (runn) punch_run(s, run0, runn);
                punched += runn;
                run0 = p;
                runn = 1;
            }
            pos += 64;
            scanned += 64;
            words++;
        }
        if (runn) { punch_run(s, run0, runn); punched += runn; }
        done += punched;
        *warm_left = h->warm_free;
        ds_unlock(s);
        if (__atomic_load_n(&s->closed, __ATOMIC_RELAXED)) break;
    }
    *cursor = pos;
    *returned = done;
    return rc;
}

void ds_page_decref(ds_store *s, uint32_t page) {
    ds_header *h = s->hdr;
    ds_pmeta *m = DS_PMETA(s, page);
    if (m->refcnt == 0) return;            /* never under zero */
    if (m->refcnt == 2) h->pages_shared--;
    if (m->refcnt >= 2) h->pages_sharing--;
    if (--m->refcnt == 0) ds_page_free_raw(s, page);
}

/* Find a published page with these exact bytes; DS_NIL if none. */
uint32_t ds_page_find(ds_store *s, uint64_t fp, const void *bytes) {
    uint32_t fp32 = (uint32_t)fp;
    uint64_t guard = DS_CHAIN_MAX(&s->hdr->pages_ix);
    for (uint32_t p = ds_lh_first(s, &s->hdr->pages_ix, fp32); p != DS_NIL && guard--;
         p = DS_PMETA(s, p)->next) {
        ds_pmeta *m = DS_PMETA(s, p);
        if (m->fp == fp32 && m->refcnt > 0 && p < s->hdr->cap_pages &&
            memcmp(DS_POOL_RO(s, p), bytes, DS_PAGE_SIZE) == 0)
            return p;
    }
    return DS_NIL;
}

/* A published page with this fingerprint, bytes NOT compared: the caller
 * takes a reference, compares outside the lock and gives it back if the
 * bytes differ.  DS_NIL if none. */
uint32_t ds_page_candidate(ds_store *s, uint64_t fp) {
    uint32_t fp32 = (uint32_t)fp;
    uint64_t guard = DS_CHAIN_MAX(&s->hdr->pages_ix);
    for (uint32_t p = ds_lh_first(s, &s->hdr->pages_ix, fp32); p != DS_NIL && guard--;
         p = DS_PMETA(s, p)->next) {
        ds_pmeta *m = DS_PMETA(s, p);
        if (m->fp == fp32 && m->refcnt > 0 && p < s->hdr->cap_pages) return p;
    }
    return DS_NIL;
}

/* Make a filled private page shareable: it is immutable from now on. */
int ds_page_publish(ds_store *s, uint32_t page, uint64_t fp) {
    ds_pmeta *m = DS_PMETA(s, page);
    m->fp = (uint32_t)fp;
    return ds_lh_insert(s, &s->hdr->pages_ix, &ds_pages_ops, page);
}
