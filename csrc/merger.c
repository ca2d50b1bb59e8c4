/*
 * merger.c -- ksmd-style merging of live process memory, in user space.
 *
 * How it works.  A process asks for mergeable memory (ds_mergeable_alloc):
 * private anonymous, zero-filled pages that belong to it alone.  Its
 * merger -- a thread of its own, calling ds_merge_scan() -- walks that
 * memory a batch of up to 64 pages at a time, like ksmd:
 *
 *  1. Pages already merged are not read.  /proc/self/pagemap tells
 *     whether each is still the shared pool page (present and file-backed,
 *     or not yet faulted) or has become a private copy because the process
 *     wrote it; then the pool page's reference is released.
 *  2. Pages never written (not present) cost nothing and are skipped.
 *     Other pages are fingerprinted (salted, hash.c).  All-zero pages are
 *     dropped, inside a write-protection window: MADV_DONTNEED, or, for a
 *     page that was merged once (its mapping is the pool file's, and
 *     DONTNEED would bring the pool page back), a fresh anonymous page.
 *     Either reads as zeros and costs no memory.
 *  3. The STABLE table is the store's content index of pool pages (the
 *     same one puts use): a page whose bytes equal a pool page merges on
 *     first sight.
 *  4. Otherwise, like ksmd's unstable tree, a page must keep the same
 *     fingerprint across two looks before it can pair (pages that keep
 *     changing are "volatile" and never merged).  A stable page's
 *     fingerprint goes into the shared hint table (layout.h).  When another
 *     process's stable page finds it there, that process copies its page
 *     into a new pool page (PROMOTE) and merges onto it; the first process
 *     finds the bytes in the pool at its next look (step 3).
 *  5. SMART SCAN: a stable page that found no partner is looked at less
 *     often (every 2^age passes, age <= 5); any change resets its age.
 *
 * Merging a run of pages onto pool pages Q..Q+k happens in a merge
 * window (wp.c, which owns the write protection and says how writers
 * wait): the batch's pages are published busy and write-protected, the
 * bytes are compared again -- a match of fingerprints is only a hint --
 * and the run is replaced with one mmap(MAP_PRIVATE | MAP_FIXED) of the
 * pool file.  Reads then share the pool page; the first write makes the
 * kernel copy it (copy-on-write), so no other process ever sees the
 * write, and a write that hit the window waits and lands on the new
 * mapping.  If the window cannot be opened (mprotect's ENOMEM) the batch
 * is dropped: nothing is compared or remapped unprotected.
 *
 * References.  Each region has a MERGE chunk in the shared heap listing
 * the pool page each of its pages is mapped onto; each entry holds one
 * reference, taken under the lock BEFORE the page is mapped and dropped
 * only after pagemap shows the page is no longer mapped (COW), so counts
 * are exact or over, never under.  gc releases a dead process's chunk.
 *
 * Fork.  A child must inherit neither an open window nor references it
 * does not own.  refs.c's atfork handlers call ds_merger_fork_prepare
 * (takes merger->mu: no window is open while it is held), then
 * ds_merger_fork_dup under hdr->lock (a copy of each MERGE chunk, owned
 * by the child's slot, one reference per merged page: taken before the
 * fork, so nothing the child maps can be freed under it), and
 * ds_merger_fork_parent / ds_merger_fork_child after it (layout.h).
 *
 * Close.  ds_close calls ds_merger_close once no call is in flight.
 * Regions still alive then (the process may still read them: at exit the
 * store is closed before the buffers are collected) stay mapped, their
 * merged pages made private first, then their references are given back.
 *
 * Locking.  Shared state (pool pages, content index, hint table, MERGE
 * chunks, counters) under hdr->lock.  The process-local region list under
 * merger->mu, which ds_merge_scan holds for its whole call; allocation and
 * release of regions take it too.  Lock order: wp.c's global lock (never
 * taken under merger->mu), then merger->mu, then hdr->lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "layout.h"
#include "sysdeps.h"
#include "wp.h"

#define BATCH DS_WP_BATCH
#define MAX_AGE 5
#define PM_PRESENT (1ull << 63)
#define PM_FILE (1ull << 61)
typedef struct region {
    uint8_t *addr;
    uint32_t npages;
    uint64_t serial;         /* never reused: names the region in the pagemap cache */
    uint32_t chunk;          /* MERGE chunk in the heap */
    uint32_t fork_copy;      /* fork: the child's copy of chunk (ds_merger_fork_dup) */
    uint64_t *lastfp;        /* fingerprint at the last look (0: none) */
    uint32_t *merged;        /* pool page we are mapped onto, DS_ZERO if none */
    uint8_t *age;            /* smart scan back-off */
    uint8_t *uffd;           /* page's mapping is registered for userfaultfd WP */
    uint8_t *filemap;        /* page's mapping is (still) a MAP_PRIVATE of the pool file:
                              * it was merged once; dropping its copy would bring the
                              * pool page back, so a zero page is remapped anonymous */
    struct region *next;
} region;

struct ds_merger {
    pthread_mutex_t mu;
    region *head;
    region *cur;             /* scan cursor */
    uint32_t cur_page;
    uint64_t pass;           /* completed passes */
    uint32_t vma_budget;
    uint64_t vmas;           /* mappings our merges created (estimate) */
    int pagemap_fd;
    /* pagemap entries of pages [pmc_first, pmc_first + pmc_n) of region
     * pmc_serial, read PMC_PAGES at a time (one read per 64-page batch was
     * most of a pass's cost).  A cached entry can be stale only in the
     * safe directions: a page written since (still seen as merged: its
     * reference is kept a pass longer; seen as not present: looked at next
     * pass).  Pages only become merged in their own batch, so an entry is
     * used once, for the batch that looks at its page: the cache serves
     * pages from pmc_next on only. */
    uint64_t *pmc;
    uint64_t pmc_serial, serial_seq;
    uint32_t pmc_first, pmc_n, pmc_next;
    int fork_locked;         /* mu taken by ds_merger_fork_prepare */
    int fork_waiting;        /* a fork wants mu: the scan yields it between batches */
    int fork_dup;            /* this fork: 0 no ds_merger_fork_dup call, 1 copies made, -1 it failed */
    int rereg;               /* child of fork: register the regions with our own userfaultfd */
    uint64_t wp_failures;    /* batches dropped because protecting failed */
    /* this pass's counts, published at the end of each pass */
    uint64_t pass_volatile, pass_unshared;
};

/* ---- regions ---- */

/* Lock-free (a CAS), so that no lock of ours is needed to create it and
 * a fork can never find one held. */
static struct ds_merger *merger_get(ds_store *s) {
    struct ds_merger *m = __atomic_load_n(&s->merger, __ATOMIC_ACQUIRE);
    if (m) return m;
    m = calloc(1, sizeof *m);
    if (!m) return NULL;
    pthread_mutex_init(&m->mu, NULL);
    m->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    m->vma_budget = 16384;
    struct ds_merger *none = NULL;
    if (!__atomic_compare_exchange_n(&s->merger, &none, m, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        if (m->pagemap_fd >= 0) close(m->pagemap_fd);       /* another thread won */
        pthread_mutex_destroy(&m->mu);
        free(m);
        return none;
    }
    return m;
}

static void region_free_mem(region *r) {
    free(r->lastfp); free(r->merged); free(r->age); free(r->uffd); free(r->filemap); free(r);
}

int ds_mergeable_alloc_in(ds_store *s, uint64_t nbytes, uint8_t **addr) {
    if (nbytes == 0 || nbytes > (1ull << 44)) return DS_EINVAL;
    struct ds_merger *m = merger_get(s);
    if (!m) return ENOMEM;
    uint64_t n64 = (nbytes + DS_PAGE_SIZE - 1) / DS_PAGE_SIZE;
    if (n64 > 0xFFFFFFF0ull) return DS_EINVAL;
    uint32_t n = (uint32_t)n64;
    int rc = ds_wp_setup();
    if (rc) return rc;
    region *r = calloc(1, sizeof *r);
    if (!r) return ENOMEM;
    r->npages = n;
    r->lastfp = calloc(n, 8);
    r->merged = malloc(4ull * n);
    r->age = calloc(n, 1);
    r->uffd = calloc(n, 1);
    r->filemap = calloc(n, 1);
    void *va = mmap(NULL, n64 * DS_PAGE_SIZE, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!r->lastfp || !r->merged || !r->age || !r->uffd || !r->filemap || va == MAP_FAILED) {
        rc = va == MAP_FAILED ? errno : ENOMEM;
        goto fail;
    }
    r->addr = va;
    /* merging works page by page: a transparent huge page would only be
     * split lazily, keeping its memory after its pages were merged */
    madvise(va, n64 * DS_PAGE_SIZE, MADV_NOHUGEPAGE);
    memset(r->uffd, ds_wp_uffd_register(va, n64 * DS_PAGE_SIZE), n);
    for (uint32_t i = 0; i < n; i++) r->merged[i] = DS_ZERO;
    rc = ds_lock(s);
    if (rc) goto fail;
    ds_header *h = s->hdr;
    /* the hint table costs memory only with mergers, in proportion to
     * their memory: one entry per two mergeable pages (a lossy table, so
     * growing it just forgets some hints) */
    uint64_t want = 4096;
    while (want < (h->mergeable_pages + n) / 2 && want <= h->hints_mask) want <<= 1;
    if (want > (uint64_t)h->hints_mask + 1) want = (uint64_t)h->hints_mask + 1;
    if (want > (uint64_t)h->hints_active + 1 || h->mergeable_pages == 0) {
        uint64_t len = (want * sizeof(ds_hint) + 4095) & ~4095ull;
        if (ds_back(s, h->hints_off, len) != 0) { ds_unlock(s); rc = DS_EFULL; goto fail; }
        if (want - 1 > h->hints_active) h->hints_active = (uint32_t)(want - 1);
    }
    r->chunk = ds_chunk_alloc(s, sizeof(ds_pending) + 4ull * n, DS_K_MERGE);
    if (r->chunk) {
        h->mergeable_pages += n;
        ds_pending *mg = (ds_pending *)DS_CHUNK(s, r->chunk);
        mg->npages = n;
        mg->size = nbytes;
        mg->owner = s->slot;
        for (uint32_t i = 0; i < n; i++) mg->pages[i] = DS_ZERO;
    }
    ds_unlock(s);
    if (!r->chunk) { rc = DS_EFULL; goto fail; }
    rc = ds_wp_region_add(va, n64 * DS_PAGE_SIZE);
    if (rc) {
        if (ds_lock(s) == 0) {
            h->mergeable_pages -= h->mergeable_pages >= n ? n : h->mergeable_pages;
            ds_chunk_free(s, r->chunk);
            ds_unlock(s);
        }
        goto fail;
    }
    pthread_mutex_lock(&m->mu);
    r->serial = ++m->serial_seq;
    r->next = m->head;
    m->head = r;
    pthread_mutex_unlock(&m->mu);
    *addr = va;
    return 0;
fail:
    if (va != MAP_FAILED && va) munmap(va, n64 * DS_PAGE_SIZE);
    region_free_mem(r);
    return rc;
}

/* Give r's pool references back (if mine: the MERGE chunk is ours) and
 * take it out of the fault handler's table.  Caller holds m->mu. */
static void region_release(ds_store *s, struct ds_merger *m, region *r, int mine) {
    uint64_t merged = 0;
    if (mine && r->chunk && ds_lock(s) == 0) {
        ds_pending *mg = (ds_pending *)DS_CHUNK(s, r->chunk);
        if (mg->h.kind == DS_K_MERGE && mg->owner == s->slot) {
            for (uint32_t k = 0, n = ds_list_len(mg); k < n; k++)
                if (mg->pages[k] != DS_ZERO) { ds_page_decref(s, mg->pages[k]); merged++; }
            s->hdr->mergeable_pages -= s->hdr->mergeable_pages >= mg->npages ? mg->npages : s->hdr->mergeable_pages;
            ds_chunk_free(s, r->chunk);
        }
        ds_client *c = DS_CLIENT(s, s->slot);
        c->merged_pages = c->merged_pages >= merged ? c->merged_pages - merged : 0;
        ds_unlock(s);
    }
    r->chunk = 0;
    if (m->cur == r) { m->cur = r->next; m->cur_page = 0; }
    ds_wp_region_del(r->addr);
}

int ds_mergeable_free_in(ds_store *s, uint8_t *addr) {
    struct ds_merger *m = s->merger;
    if (!m) return DS_ENOTFOUND;
    pthread_mutex_lock(&m->mu);
    for (region **pp = &m->head; *pp; pp = &(*pp)->next) {
        region *r = *pp;
        if (r->addr == addr) {
            *pp = r->next;
            region_release(s, m, r, 1);
            munmap(r->addr, (uint64_t)r->npages * DS_PAGE_SIZE);
            region_free_mem(r);
            pthread_mutex_unlock(&m->mu);
            return 0;
        }
    }
    pthread_mutex_unlock(&m->mu);
    return DS_ENOTFOUND;
}

/* Closing the store with regions still alive (the process may still read
 * them: at exit the store is closed before the buffers are collected).
 * Their memory stays mapped and keeps its bytes: each merged page is
 * first made private (MADV_POPULATE_WRITE breaks copy-on-write as a
 * write would, without writing, so a concurrent writer loses nothing),
 * and only then is its pool reference given back -- a pool page freed
 * and reused while still mapped would change under the reader.  The
 * mapping is never unmapped: ds_mergeable_free after close finds no
 * merger and leaves it; the process's exit returns it.
 * Called by ds_close once no call is in flight (no scan, no alloc/free). */
void ds_merger_close(ds_store *s) {
    struct ds_merger *m = s->merger;
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    int mine = s->pid == (uint32_t)getpid();
    while (m->head) {
        region *r = m->head;
        m->head = r->next;
        for (uint32_t i = 0; i < r->npages;) {
            if (r->merged[i] == DS_ZERO) { i++; continue; }
            uint32_t j = i + 1;
            while (j < r->npages && r->merged[j] != DS_ZERO) j++;
            /* Known gap: a page the caller made read-only itself cannot
             * be made private (the advice fails); its reference is given
             * back all the same, so once the pool page is reused such a
             * page could read another value's bytes. */
            madvise(r->addr + (uint64_t)i * DS_PAGE_SIZE, (uint64_t)(j - i) * DS_PAGE_SIZE,
                    MADV_POPULATE_WRITE);
            i = j;
        }
        region_release(s, m, r, mine);
        region_free_mem(r);                 /* the mapping stays */
    }
    pthread_mutex_unlock(&m->mu);
    if (m->pagemap_fd >= 0) close(m->pagemap_fd);
    pthread_mutex_destroy(&m->mu);
    s->merger = NULL;
    free(m->pmc);
    free(m);
}

/* ---- fork (called by refs.c's atfork handlers; order and locks in layout.h) ---- */

void ds_merger_fork_prepare(ds_store *s) {
    struct ds_merger *m = __atomic_load_n(&s->merger, __ATOMIC_ACQUIRE);
    if (!m) return;
    __atomic_store_n(&m->fork_waiting, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&m->mu);              /* windows open only under mu */
    m->fork_locked = 1;
}

/* Caller holds hdr->lock (and, since fork_prepare, m->mu). */
int ds_merger_fork_dup(ds_store *s, uint32_t child_slot) {
    struct ds_merger *m = s->merger;
    if (!m || !m->fork_locked) return 0;
    m->fork_dup = -1;
    uint64_t merged = 0;
    for (region *r = m->head; r; r = r->next) {
        r->fork_copy = 0;
        if (!r->chunk) continue;
        uint32_t id = ds_chunk_alloc(s, sizeof(ds_pending) + 4ull * r->npages, DS_K_MERGE);
        if (!id) {
            for (region *q = m->head; q != r; q = q->next) {     /* undo */
                if (!q->fork_copy) continue;
                ds_pending *mg = (ds_pending *)DS_CHUNK(s, q->fork_copy);
                for (uint32_t i = 0; i < q->npages; i++)
                    if (mg->pages[i] != DS_ZERO) ds_page_decref(s, mg->pages[i]);
                s->hdr->mergeable_pages -= s->hdr->mergeable_pages >= q->npages ? q->npages : s->hdr->mergeable_pages;
                ds_chunk_free(s, q->fork_copy);
                q->fork_copy = 0;
            }
            return DS_EFULL;
        }
        ds_pending *mg = (ds_pending *)DS_CHUNK(s, id);
        mg->npages = r->npages;
        mg->size = (uint64_t)r->npages * DS_PAGE_SIZE;
        mg->owner = child_slot;
        /* r->merged, not the chunk: process memory that no other process
         * can corrupt, and equal to it whenever no window is open */
        for (uint32_t i = 0; i < r->npages; i++) {
            mg->pages[i] = r->merged[i];
            if (r->merged[i] != DS_ZERO) { ds_page_incref(s, r->merged[i]); merged++; }
        }
        s->hdr->mergeable_pages += r->npages;
        r->fork_copy = id;
    }
    DS_CLIENT(s, child_slot)->merged_pages = merged;
    m->fork_dup = 1;
    return 0;
}

void ds_merger_fork_parent(ds_store *s) {
    struct ds_merger *m = s->merger;
    if (!m || !m->fork_locked) return;
    for (region *r = m->head; r; r = r->next) r->fork_copy = 0;
    m->fork_dup = 0;
    m->fork_locked = 0;
    __atomic_store_n(&m->fork_waiting, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&m->mu);
}

void ds_merger_fork_child(ds_store *s) {
    struct ds_merger *m = s->merger;
    if (!m) return;
    for (region *r = m->head; r; r = r->next) {
        /* the parent's chunk is never ours: adopt our copy, or (no copy:
         * the dup failed, or no slot -- then refs.c makes us an orphan)
         * forget the merges: the scan skips the region */
        r->chunk = r->fork_copy;
        r->fork_copy = 0;
        memset(r->uffd, 0, r->npages);   /* registration stayed with the parent's address space */
    }
    m->rereg = 1;                        /* with our own userfaultfd, at the next scan */
    if (m->pagemap_fd >= 0) close(m->pagemap_fd);
    m->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    m->pmc_serial = 0;                   /* entries of the parent's address space */
    m->fork_dup = 0;
    __atomic_store_n(&m->fork_waiting, 0, __ATOMIC_RELEASE);
    if (m->fork_locked) {
        m->fork_locked = 0;
        pthread_mutex_unlock(&m->mu);    /* this thread took it in fork_prepare */
    } else {
        pthread_mutex_init(&m->mu, NULL);   /* created during the fork: not held */
    }
}


int ds_merger_config_in(ds_store *s, uint32_t vma_budget) {
    struct ds_merger *m = merger_get(s);
    if (!m) return ENOMEM;
    m->vma_budget = vma_budget;
    return 0;
}

/* ---- scanning ---- */

enum { A_NONE, A_MERGE, A_PROMOTE, A_ZERO };

typedef struct batchstat {
    uint64_t scanned, merged, unmerged, promoted, zeroed, skipped;
} batchstat;

static uint64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void age_up(region *r, uint32_t p) {
    if (r->age[p] < MAX_AGE) r->age[p]++;
}

/* The pagemap entries of pages [first, first+n) of r, from the cache
 * (struct ds_merger); NULL (errno set) if they cannot be read. */
#define PMC_PAGES 2048u
static const uint64_t *pagemap_of(struct ds_merger *m, region *r, uint32_t first, uint32_t n) {
    if (m->pmc_serial == r->serial && first >= m->pmc_next &&
        first + n <= m->pmc_first + m->pmc_n) {
        m->pmc_next = first + n;
        return m->pmc + (first - m->pmc_first);
    }
    if (!m->pmc && !(m->pmc = malloc(8ull * PMC_PAGES))) return NULL;
    uint32_t k = r->npages - first < PMC_PAGES ? r->npages - first : PMC_PAGES;
    m->pmc_serial = 0;
    if (k < n || m->pagemap_fd < 0) { errno = EIO; return NULL; }
    uint8_t *base = r->addr + (uint64_t)first * DS_PAGE_SIZE;
    if (pread(m->pagemap_fd, m->pmc, 8ull * k, (off_t)(((uintptr_t)base / DS_PAGE_SIZE) * 8)) !=
        (ssize_t)(8ull * k)) {
        if (!errno) errno = EIO;
        return NULL;
    }
    m->pmc_serial = r->serial;
    m->pmc_first = first;
    m->pmc_n = k;
    m->pmc_next = first + n;
    return m->pmc;
}

/* Look at pages [first, first+n) of r (n <= BATCH).  m->mu held. */
static int scan_batch(ds_store *s, struct ds_merger *m, region *r, uint32_t first, uint32_t n,
                      batchstat *st) {
    ds_header *h = s->hdr;
    uint64_t fps[BATCH];
    uint32_t target[BATCH];
    uint8_t act[BATCH], hashed[BATCH];
    uint8_t *base = r->addr + (uint64_t)first * DS_PAGE_SIZE;
    errno = 0;
    const uint64_t *pm = pagemap_of(m, r, first, n);
    if (!pm) return errno ? errno : EIO;

    int todo = 0;
    uint32_t cow[BATCH], ncow = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t p = first + i;
        act[i] = A_NONE;
        hashed[i] = 0;
        if (r->merged[p] != DS_ZERO) {
            if ((pm[i] & PM_PRESENT) && !(pm[i] & PM_FILE)) cow[ncow++] = i;   /* written: private now */
            continue;
        }
        if (!(pm[i] & PM_PRESENT)) { r->lastfp[p] = 0; continue; }        /* never written */
        if (r->age[p] && (m->pass & ((1u << r->age[p]) - 1)) != 0) { st->skipped++; continue; }
        const uint8_t *pg = base + (uint64_t)i * DS_PAGE_SIZE;
        st->scanned++;
        if (ds_page_is_zero(pg)) { act[i] = A_ZERO; todo++; continue; }
        fps[i] = ds_hash_bytes(s, pg, DS_PAGE_SIZE);
        hashed[i] = 1;
    }

    int rc = ds_lock(s);
    if (rc) return rc;
    ds_pending *mg = (ds_pending *)DS_CHUNK(s, r->chunk);
    ds_client *me = DS_CLIENT(s, s->slot);
    ds_hint *hints = (ds_hint *)(s->ix + h->hints_off);
    for (uint32_t k = 0; k < ncow; k++) {
        uint32_t p = first + cow[k];
        ds_page_decref(s, r->merged[p]);
        mg->pages[p] = DS_ZERO;
        r->merged[p] = DS_ZERO;
        r->lastfp[p] = 0;
        r->age[p] = 0;
        if (me->merged_pages) me->merged_pages--;
        st->unmerged++;
    }
    uint32_t promote[BATCH], npromote = 0, lonely[BATCH], nlonely = 0;
    int room = m->vmas + 2 <= m->vma_budget;      /* may we still make new mappings? */
    for (uint32_t i = 0; i < n; i++) {
        if (!hashed[i]) continue;
        uint32_t p = first + i;
        /* the stable table: a fingerprint match is compared byte for byte
         * once the page is write-protected, below */
        uint32_t q = ds_page_candidate(s, fps[i]);
        if (q != DS_NIL) {
            ds_page_incref(s, q);            /* held before we map it */
            mg->pages[p] = q;
            target[i] = q;
            act[i] = A_MERGE;
            todo++;
            continue;
        }
        if (fps[i] != r->lastfp[p]) {        /* changed since the last look */
            r->lastfp[p] = fps[i];
            r->age[p] = 0;
            m->pass_volatile++;
            continue;
        }
        /* stable and not in the pool: the hint table, 4-way associative */
        ds_hint *set = &hints[fps[i] & h->hints_active & ~3u];
        uint32_t tag = (uint32_t)(fps[i] >> 32), me = s->slot + 1;
        int hit = -1, empty = -1, own = -1;
        for (int w = 0; w < 4; w++) {
            if (set[w].owner && set[w].tag == tag) hit = w;
            else if (!set[w].owner) empty = w;
            else if (set[w].owner == me) own = w;
        }
        if (hit >= 0 && set[hit].owner != me && room) {
            set[hit].owner = 0;              /* a partner: promote ours */
            promote[npromote++] = i;
            continue;
        }
        if (hit < 0) {                       /* keep others' hints: replace ours first */
            int w = empty >= 0 ? empty : own >= 0 ? own : (int)(tag & 3);
            set[w].tag = tag;
            set[w].owner = me;
        } else {
            age_up(r, p);                    /* waited a pass already: look less often */
        }
        lonely[nlonely++] = i;
        m->pass_unshared++;
    }
    /* a partner for part of a batch usually has the rest too (same data,
     * same layout): promote the batch's other stable pages with it, so the
     * pool pages -- and everyone's mappings of them -- stay in runs */
    if (npromote) {
        for (uint32_t k = 0; k < nlonely; k++) promote[npromote++] = lonely[k];
        m->pass_unshared -= nlonely;
    }
    uint32_t fresh[BATCH];
    if (npromote && ds_pages_alloc(s, npromote, fresh) == 0) {
        for (uint32_t k = 0; k < npromote; k++) {
            uint32_t i = promote[k];
            mg->pages[first + i] = fresh[k];
            target[i] = fresh[k];
            act[i] = A_PROMOTE;
            todo++;
        }
    } else {
        npromote = 0;                        /* store full: just don't promote */
    }
    ds_unlock(s);
    if (!todo) return 0;

    int reserved = npromote == 0 || ds_pool_reserve(s, fresh, npromote) == 0;

    /* the merge window: from here until ds_wp_close no write lands in a
     * selected page (wp.c); if it cannot be opened, the batch is dropped */
    uint8_t sel[BATCH], ok[BATCH];
    for (uint32_t i = 0; i < n; i++) {
        sel[i] = act[i] != A_NONE;
        ok[i] = 0;
    }
    ds_wp_window w;
    if (ds_wp_open(&w, base, n, sel, r->uffd + first) != 0) {
        m->wp_failures++;
        goto bookkeeping;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *pg = base + (uint64_t)i * DS_PAGE_SIZE;
        if (act[i] == A_MERGE) {
            ok[i] = memcmp(pg, DS_POOL_RO(s, target[i]), DS_PAGE_SIZE) == 0;
        } else if (act[i] == A_PROMOTE && reserved) {
            ds_copy_page(DS_POOL_RW(s, target[i]), pg);
            ok[i] = 1;
        } else if (act[i] == A_ZERO && ds_page_is_zero(pg)) {
            uint32_t p = first + i;
            if (!r->filemap[p]) {
                if (madvise(pg, DS_PAGE_SIZE, MADV_DONTNEED) == 0) st->zeroed++;
            } else if (mmap(pg, DS_PAGE_SIZE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
                /* once merged, the mapping is the pool file's: DONTNEED
                 * would bring back the (since released) pool page instead
                 * of the zeros just written.  A fresh anonymous page reads
                 * zeros and costs nothing until written. */
                madvise(pg, DS_PAGE_SIZE, MADV_NOHUGEPAGE);
                r->filemap[p] = 0;
                r->uffd[p] = (uint8_t)ds_wp_uffd_register(pg, DS_PAGE_SIZE);
                sel[i] = 0;                  /* a fresh writable mapping now */
                m->vmas += 2;
                st->zeroed++;
            }
        }
    }
    ds_copy_done();
    /* promoted pages go public; a page someone published meanwhile wins */
    if (npromote && reserved && ds_lock(s) == 0) {
        for (uint32_t i = 0; i < n; i++) {
            if (act[i] != A_PROMOTE || !ok[i]) continue;
            uint32_t other = ds_page_find(s, fps[i], DS_POOL_RO(s, target[i]));
            if (other != DS_NIL) {
                ds_page_incref(s, other);
                mg->pages[first + i] = other;
                ds_page_decref_cold(s, target[i]);
                target[i] = other;
                act[i] = A_MERGE;
            } else {
                ds_page_publish(s, target[i], fps[i]);
            }
        }
        ds_unlock(s);
    }
    /* map runs of consecutive pool pages */
    for (uint32_t i = 0; i < n;) {
        if (!ok[i]) { i++; continue; }
        uint32_t j = i + 1;
        while (j < n && ok[j] && target[j] == target[j - 1] + 1) j++;
        uint32_t p = first + i;
        int extends = p > 0 && r->merged[p - 1] != DS_ZERO && r->merged[p - 1] + 1 == target[i];
        if (!extends && m->vmas + 2 > m->vma_budget && j - i < 16) {
            for (uint32_t k = i; k < j; k++) {               /* budget spent: no fragments */
                ok[k] = 0;
                age_up(r, first + k);                        /* and look less often */
            }
        } else if (mmap(base + (uint64_t)i * DS_PAGE_SIZE, (uint64_t)(j - i) * DS_PAGE_SIZE,
                        PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, s->pool_fd,
                        (off_t)target[i] * DS_PAGE_SIZE) == MAP_FAILED) {
            for (uint32_t k = i; k < j; k++) ok[k] = 0;
        } else {
            if (!extends) m->vmas += 2;
            uint8_t reg = (uint8_t)ds_wp_uffd_register(base + (uint64_t)i * DS_PAGE_SIZE,
                                                       (uint64_t)(j - i) * DS_PAGE_SIZE);
            for (uint32_t k = i; k < j; k++) {
                sel[k] = 0;                  /* a fresh writable mapping now */
                r->uffd[first + k] = reg;
                r->filemap[first + k] = 1;
            }
        }
        i = j;
    }
    ds_wp_close(&w, sel);

bookkeeping:   /* failed merges give their reference back */
    rc = ds_lock(s);
    if (rc) return rc;
    mg = (ds_pending *)DS_CHUNK(s, r->chunk);
    me = DS_CLIENT(s, s->slot);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t p = first + i;
        if (act[i] != A_MERGE && act[i] != A_PROMOTE) continue;
        if (ok[i]) {
            r->merged[p] = target[i];
            r->age[p] = 0;
            me->merged_pages++;
            st->merged++;
            if (act[i] == A_PROMOTE) st->promoted++;
        } else {
            mg->pages[p] = DS_ZERO;
            ds_page_decref(s, target[i]);
        }
    }
    ds_unlock(s);
    return 0;
}

/* Add this call's CPU time and pages walked since the last report to the
 * store's counters (ksmd's meaning of pages_scanned: pages walked), so
 * stats() follows a long scan as it goes.  hdr->lock held. */
static void publish_progress(ds_store *s, uint64_t t0, uint64_t visited, uint64_t *pub_cpu,
                             uint64_t *pub_visited) {
    uint64_t cpu = thread_cpu_ns() - t0;
    s->hdr->merger_cpu_ns += cpu - *pub_cpu;
    s->hdr->pages_scanned += visited - *pub_visited;
    *pub_cpu = cpu;
    *pub_visited = visited;
}

int ds_merge_scan_in(ds_store *s, uint64_t max_pages, ds_scaninfo *out) {
    memset(out, 0, sizeof *out);
    struct ds_merger *m = s->merger;
    if (!m) return 0;
    uint64_t t0 = thread_cpu_ns();
    batchstat st = {0};
    int rc = ds_wp_setup();                  /* a child of fork sets up its own uffd; not under mu */
    if (rc) return rc;
    pthread_mutex_lock(&m->mu);
    if (m->rereg && ds_wp_uffd_ready()) {    /* child of fork: register with our userfaultfd */
        for (region *r = m->head; r; r = r->next)
            memset(r->uffd, ds_wp_uffd_register(r->addr, (uint64_t)r->npages * DS_PAGE_SIZE), r->npages);
        m->rereg = 0;
    }
    uint64_t total = 0;
    for (region *r = m->head; r; r = r->next) total += r->npages;
    out->total_pages = total;
    if (max_pages == 0) max_pages = total;   /* one full pass */
    uint64_t budget = max_pages;
    uint64_t pub_cpu = 0, pub_visited = 0;   /* already added to the store's counters */
    uint32_t batches = 0;
    while (budget > 0 && m->head) {
        if (!m->cur) {
            m->cur = m->head;
            m->cur_page = 0;
        }
        region *r = m->cur;
        if (r->chunk && m->cur_page < r->npages) {
            uint32_t n = r->npages - m->cur_page;
            if (n > BATCH) n = BATCH;
            if (n > budget) n = (uint32_t)budget;
            rc = scan_batch(s, m, r, m->cur_page, n, &st);
            if (rc) break;
            m->cur_page += n;
            budget -= n;
            out->visited += n;
            if (++batches % 16 == 0 && ds_lock(s) == 0) {   /* keep stats() current */
                publish_progress(s, t0, out->visited, &pub_cpu, &pub_visited);
                ds_unlock(s);
            }
            if (__atomic_load_n(&m->fork_waiting, __ATOMIC_ACQUIRE)) {
                /* a fork waits for mu: let it have it between two batches
                 * (no window open), so a fork waits one batch, not a pass */
                pthread_mutex_unlock(&m->mu);
                while (__atomic_load_n(&m->fork_waiting, __ATOMIC_ACQUIRE)) sched_yield();
                pthread_mutex_lock(&m->mu);
                if (m->cur != r) continue;   /* r released meanwhile: the cursor moved on */
            }
        }
        if (m->cur_page >= r->npages || !r->chunk) {
            m->cur = r->next;
            m->cur_page = 0;
            if (!m->cur) {                   /* end of a pass */
                m->pass++;
                out->passes++;
                if (ds_lock(s) == 0) {
                    ds_client *me = DS_CLIENT(s, s->slot);
                    me->volatile_pages = m->pass_volatile;
                    me->unshared_pages = m->pass_unshared;
                    s->hdr->full_scans++;
                    publish_progress(s, t0, out->visited, &pub_cpu, &pub_visited);
                    ds_unlock(s);
                }
                m->pass_volatile = m->pass_unshared = 0;
            }
        }
    }
    pthread_mutex_unlock(&m->mu);
    out->scanned = st.scanned;
    out->merged = st.merged;
    out->unmerged = st.unmerged;
    out->promoted = st.promoted;
    out->zeroed = st.zeroed;
    out->skipped = st.skipped;
    uint64_t cpu = thread_cpu_ns() - t0;
    out->cpu_ns = cpu;
    out->wp_failed = m->wp_failures;
    if (ds_lock(s) == 0) {
        publish_progress(s, t0, out->visited, &pub_cpu, &pub_visited);
        ds_unlock(s);
    }
    return rc;
}
