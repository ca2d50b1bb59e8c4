/*
 * dedupshm.h -- the whole C ABI of the dedupshm core.
 *
 * dedupshm keeps values of many processes in shared memory and stores
 * identical 4 KiB pages once.  A store is two files in a directory (by
 * default /dev/shm):
 *
 *   dedupshm.NAME.index   metadata: header, robust lock, client table,
 *                         page table, content index, heap of objects
 *   dedupshm.NAME.pool    the physical pages, addressed by page number
 *
 * Every process attaches directly (ds_open); there is no server.  All
 * shared structures and the one lock that protects them are described in
 * layout.h.  This header is what the Python package (through cffi) and
 * any other caller may use.
 *
 * Return values: 0 on success; a positive errno value for a failed system
 * call; a negative DS_E* code for library conditions.  ds_strerror()
 * describes any of them.
 *
 * Caveats
 *  - Handles are per process.  After fork() the child must call
 *    ds_after_fork() on every handle it wants to keep using; it then is a
 *    client of its own and must re-acquire the references it holds.
 *  - Object references (handles, ds_acquire) held by a process that dies
 *    are released by the next ds_gc() of any process.
 *  - Views returned by ds_view() stay valid only while the caller holds a
 *    reference to the object (ds_acquire / ds_put's handle).
 *  - A store lives on one machine: the files must be on a local tmpfs or
 *    local filesystem, never on a network filesystem.
 *  - Page dedup is a timing side channel between the processes of one
 *    store: a write to a merged page is slower.  Pass DS_NODEDUP for values
 *    that must not share pages.
 */
#ifndef DEDUPSHM_H
#define DEDUPSHM_H

#include <stddef.h>
#include <stdint.h>

/* ---- cffi:begin (cffi reads the declarations between these marks) ---- */

#define DS_PAGE_SIZE 4096
#define DS_SMALL_MAX 2048        /* values up to this size are packed in the heap */
#define DS_MAX_KEY 4096          /* longest key in bytes */

#define DS_ENOTFOUND  -30001     /* no such key or object (or it was deleted) */
#define DS_EFULL      -30002     /* capacity or backing memory exhausted */
#define DS_ECORRUPT   -30003     /* metadata failed a consistency check */
#define DS_EVERSION   -30004     /* store made by an incompatible version */
#define DS_ELIMIT     -30005     /* a fixed table is full (clients, buckets) */
#define DS_EINVAL     -30006     /* bad argument */
#define DS_ESTATE     -30007     /* object in the wrong state for the call */

/* put flags */
#define DS_NODEDUP 1             /* never share this value's pages */

typedef struct ds_store ds_store;

typedef struct ds_iov {
    const void *base;
    uint64_t len;
} ds_iov;

/* Where an object's bytes are, for ds_view(). */
typedef struct ds_viewinfo {
    uint8_t *data;          /* first byte of the data region */
    uint64_t size;          /* data region length in bytes */
    uint64_t map_len;       /* != 0: caller must ds_unmap(data, map_len) */
    const uint8_t *desc;    /* caller's descriptor bytes (read-only) */
    uint32_t desclen;
    uint32_t nbufs;
    const uint64_t *bufs;   /* nbufs pairs (offset, length) in the data region */
    uint32_t small;         /* 1 if packed in the heap (not page mapped) */
    uint32_t extents;       /* number of page runs (large objects) */
} ds_viewinfo;

typedef struct ds_stats {
    uint64_t capacity;
    uint64_t objects;        /* live sealed objects */
    uint64_t keys;           /* objects bound to a key */
    uint64_t logical_bytes;  /* sum of live objects' sizes */
    uint64_t physical_bytes; /* pool pages in use + packed small values */
    uint64_t metadata_bytes; /* per-page and per-object bookkeeping in use */
    uint64_t pages_used;     /* distinct pool pages with references */
    uint64_t pages_shared;   /* pool pages with more than one reference */
    uint64_t pages_sharing;  /* references saved by sharing */
    uint64_t pages_zero;     /* all-zero pages referenced (cost nothing) */
    uint64_t pages_free_warm;/* freed pages kept faulted in for reuse */
    uint64_t small_bytes;    /* bytes of packed small values */
    uint64_t clients;        /* attached processes */
    uint64_t handles;        /* references held by processes or in flight */
    uint64_t gc_runs;
    uint64_t recoveries;     /* lock owner died: metadata rebuilt */
    uint64_t reaped_clients; /* dead clients cleaned up */
    /* merger (ksmd's meanings) */
    uint64_t pages_merged;   /* mergeable pages mapped onto pool pages */
    uint64_t pages_unshared; /* stable mergeable pages with no partner yet */
    uint64_t pages_volatile; /* mergeable pages that changed between looks */
    uint64_t full_scans;     /* completed passes over a process's mergeable memory */
    uint64_t pages_scanned;  /* pages the mergers walked (merged ones included) */
    uint64_t merger_cpu_ns;
} ds_stats;

typedef struct ds_gcinfo {
    uint32_t dead_clients;
    uint32_t handles_released;
    uint32_t objects_reclaimed;  /* half-written objects removed */
    uint32_t transit_expired;
} ds_gcinfo;

typedef struct ds_clientinfo {
    uint32_t slot;
    uint32_t pid;
    uint64_t handles;        /* references it holds */
    uint64_t merged_pages;   /* its mergeable pages mapped onto pool pages */
    uint64_t attach_ns;      /* when it attached (CLOCK_REALTIME) */
} ds_clientinfo;

/*
 * Open or create a store.
 *   index_path, pool_path  the two files (the Python layer names them)
 *   create      0: attach, ENOENT if absent; 1: create or attach
 *   capacity    bytes of object data (create only; rounded to pages)
 *   warm_bytes  freed pages kept faulted in for reuse (create only)
 *   transit_ttl seconds a pickled, never unpickled reference lives
 * Returns 0 and *out, ENOENT, EACCES, DS_EVERSION, DS_ECORRUPT, errno.
 */
int ds_open(const char *index_path, const char *pool_path, int create,
            uint64_t capacity, uint64_t warm_bytes, uint32_t transit_ttl,
            ds_store **out);

/* Detach.  Mappings stay until the last view is unmapped.  Idempotent. */
void ds_close(ds_store *s);

/* Message for any return code. */
const char *ds_strerror(int rc);

/* Child side of fork(): register as a new client.  The child holds no
 * references until it ds_acquire()s them again. */
int ds_after_fork(ds_store *s);

/* Store identity (16 random bytes chosen at creation). */
void ds_uuid(ds_store *s, uint8_t out[16]);

/*
 * Put a value: copy the buffers in, dedup pages (unless DS_NODEDUP), seal,
 * optionally bind key (replacing an older binding).  The caller receives a
 * reference (*handle) on the new object.  Returns 0, DS_EFULL (store
 * unchanged), DS_EINVAL, DS_ELIMIT, errno.
 */
int ds_put(ds_store *s, const uint8_t *key, uint32_t keylen,
           const uint8_t *desc, uint32_t desclen,
           const ds_iov *bufs, uint32_t nbufs, uint32_t flags,
           uint32_t *obj, uint64_t *gen, uint32_t *handle);

/* Begin a writable object of nbytes: *data is private, zero-filled,
 * writable memory of this process (page-rounded length), invisible to
 * others until ds_commit.  No pool page is taken (nor capacity counted)
 * before the commit. */
int ds_create(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t nbytes,
              uint32_t *obj, uint64_t *gen, uint8_t **data);
/* Seal a created object and bind its key (if any): the same pipeline as
 * ds_put (zero pages and pages already stored cost no capacity; the tail
 * of the last page is zeroed), then data is remapped copy-on-write over
 * the stored pages.  *handle: caller's reference.  On failure (DS_EFULL
 * when its new pages do not fit) the object is discarded (see ds_abort
 * for data). */
int ds_commit(ds_store *s, uint32_t obj, uint64_t gen,
              const uint8_t *desc, uint32_t desclen, uint8_t *data,
              uint32_t *handle);
/* Discard a created object; data is left mapped to zero pages (the caller
 * unmaps it).  Also the state data is left in when ds_commit fails. */
int ds_abort(ds_store *s, uint32_t obj, uint64_t gen, uint8_t *data);

/* Key -> object (no reference taken).  DS_ENOTFOUND if absent. */
int ds_lookup(ds_store *s, const uint8_t *key, uint32_t keylen,
              uint32_t *obj, uint64_t *gen);
/* Take a reference on a live, not deleted object.  DS_ENOTFOUND if gone. */
int ds_acquire(ds_store *s, uint32_t obj, uint64_t gen, uint32_t *handle);
/* Drop a reference (frees the object when it was the last). */
int ds_release(ds_store *s, uint32_t handle);
/* Reference for a pickled ObjectRef: lives without any process until
 * claimed or transit_ttl passes.  *token names it. */
int ds_transit(ds_store *s, uint32_t obj, uint64_t gen, uint64_t *token);
/* Turn a transit reference into the caller's own.  DS_ENOTFOUND if the
 * token was claimed already or expired. */
int ds_claim(ds_store *s, uint64_t token, uint32_t obj, uint64_t gen,
             uint32_t *handle);

/* Map an object the caller holds a reference on.  writable: private
 * copy-on-write mapping (always needs ds_unmap).  A value of more page runs
 * than a view may map one by one comes back as a private copy (read-only
 * unless writable); out->map_len says what to unmap either way. */
int ds_view(ds_store *s, uint32_t obj, uint64_t gen, int writable,
            ds_viewinfo *out);
int ds_unmap(void *addr, uint64_t len);

/* Unbind a key (DS_ENOTFOUND if absent); the object is freed once no
 * reference holds it. */
int ds_delete_key(ds_store *s, const uint8_t *key, uint32_t keylen);
/* Delete an object by reference: unbind its key, hide it from lookups. */
int ds_delete_obj(ds_store *s, uint32_t obj, uint64_t gen);

/* Number of bound keys. */
int ds_count(ds_store *s, uint64_t *n);
/* All bound keys as records (u32 keylen, u64 size, key bytes), into buf.  *needed is set to
 * the size required; returns ERANGE if buflen was too small. */
int ds_keys(ds_store *s, uint8_t *buf, uint64_t buflen, uint64_t *needed);

int ds_stats_get(ds_store *s, ds_stats *out);
/* Reclaim what dead clients left; expire old transit references. */
int ds_gc(ds_store *s, ds_gcinfo *out);
/* Attached clients (up to n); *count is the number written. */
int ds_clients(ds_store *s, ds_clientinfo *out, uint32_t n, uint32_t *count);

/* ---- mergeable memory and the merger (merger.c) ----
 * Mergeable memory is private to the calling process: anonymous,
 * zero-filled, page aligned.  ds_merge_scan() merges its pages with
 * identical pages of the store (and, through the pool, of other
 * processes) copy-on-write.  Installs a SIGSEGV handler (chained). */
typedef struct ds_scaninfo {
    uint64_t total_pages;    /* mergeable pages of this process */
    uint64_t visited;        /* pages walked by this call */
    uint64_t scanned;        /* pages read and fingerprinted */
    uint64_t skipped;        /* smart scan: not looked at this pass */
    uint64_t merged;         /* pages newly mapped onto pool pages */
    uint64_t promoted;       /* of which copied into new pool pages */
    uint64_t unmerged;       /* merged pages written since (now private) */
    uint64_t zeroed;         /* zero pages dropped */
    uint64_t passes;         /* passes completed by this call */
    uint64_t cpu_ns;         /* CPU time of this call */
} ds_scaninfo;

int ds_mergeable_alloc(ds_store *s, uint64_t nbytes, uint8_t **addr);
/* Give the region back (its merged pages' references too). */
int ds_mergeable_free(ds_store *s, uint8_t *addr);
/* Walk up to max_pages pages (0: one full pass) from where the last call
 * stopped.  Takes only this process's merger lock and hdr->lock. */
int ds_merge_scan(ds_store *s, uint64_t max_pages, ds_scaninfo *out);
/* "userfaultfd" or "mprotect": how pages are write-protected while they
 * are compared and remapped (see merger.c). */
const char *ds_merger_wp_mode(void);
/* Most mappings the merger may create in this process. */
int ds_merger_config(ds_store *s, uint32_t vma_budget);

/* ---- consistency check (check.c) ---- */
typedef struct ds_checkinfo {
    uint32_t errors;         /* problems found (their text is in buf) */
    uint64_t objects;        /* sealed objects looked at */
    uint64_t pages;          /* pool pages in use */
    uint64_t bytes_checked;  /* bytes re-hashed against their fingerprints */
} ds_checkinfo;
/* Check every invariant of the store under its lock; write one line per
 * problem into buf (NUL terminated, truncated at buflen).  Returns 0 even
 * when it finds problems (they are in out->errors). */
int ds_check(ds_store *s, char *buf, uint64_t buflen, ds_checkinfo *out);

/* Salted 64-bit fingerprint of one page, and over n pages (benchmarks). */
uint64_t ds_fingerprint(ds_store *s, const void *page);
uint64_t ds_fingerprint_pages(ds_store *s, const void *pages, uint64_t n);
/* Which fingerprint kernel is in use: "avx2" or "scalar". */
const char *ds_hash_impl(void);

/* ---- cffi:end ---- */

#endif /* DEDUPSHM_H */
