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
 *  - Handles are per process and fork-safe: a pthread_atfork handler makes
 *    the child of fork() a client of its own before fork() returns, holding
 *    every reference the parent held (so inherited views and ObjectRefs
 *    stay valid whatever the parent does next), and no fork lands inside a
 *    merge window.  Only fork() runs those handlers: a child made by
 *    clone()/vfork() without exec must not use the handle.
 *  - References of this process live in a per-process table (refs.c):
 *    callers own them through cells (ds_ref, ds_viewinfo) that the call
 *    fills before it returns, and release them with ds_ref_unpin /
 *    ds_view_close, which are idempotent.  A process that dies holds
 *    nothing: its client slot is locked with an OFD lock on the index file,
 *    which the kernel drops when the process dies, in any PID namespace,
 *    and the next ds_gc() of any process releases what it held.
 *  - ds_close() waits for calls in flight on the handle, refuses new ones
 *    (DS_ECLOSED), and keeps the mappings and references that cells still
 *    hold until the last of them is released.
 *  - A store lives on one machine: the files must be on a local tmpfs or
 *    local filesystem, never on a network filesystem.  Both files belong
 *    to the user who created them (mode 0600); an attach that finds other
 *    owners or group/other permission bits fails with EACCES.
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
#define DS_ECLOSED    -30008     /* the handle was closed */

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
    uint64_t map_len;       /* != 0: a mapping of its own (ds_view_close unmaps it) */
    const uint8_t *desc;    /* caller's descriptor bytes (read-only) */
    uint32_t desclen;
    uint32_t nbufs;
    const uint64_t *bufs;   /* nbufs pairs (offset, length) in the data region */
    uint32_t small;         /* 1 if packed in the heap (not page mapped) */
    uint32_t extents;       /* number of page runs (large objects) */
    uint64_t tab1[2];       /* bufs of an inline value: (0, size) */
    /* ownership (refs.c): what this cell holds, released by ds_view_close */
    uint32_t obj;
    uint32_t own;           /* DS_OWN_* bits */
    uint64_t gen;
    ds_store *store;        /* the handle it holds something of (set with own) */
} ds_viewinfo;

/* A reference owned by the caller: filled by the call that takes it. */
typedef struct ds_ref {
    uint32_t obj;
    uint32_t held;          /* 1 while this cell holds a reference */
    uint64_t gen;
    ds_store *store;        /* the handle it holds it from (set with held) */
} ds_ref;

#define DS_OWN_PIN 1             /* holds a reference on (obj, gen) */
#define DS_OWN_MAP 2             /* data..map_len is a mapping to unmap */
#define DS_OWN_CREATE 4          /* a created object being filled */

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

/* Detach: wait for calls in flight on s, refuse new ones (DS_ECLOSED),
 * and release this process's client slot -- at once, or, while cells
 * (ds_ref, ds_viewinfo) still hold references or mappings, when the last
 * of them is released.  Call once per handle; s is freed by it. */
void ds_close(ds_store *s);
/* ds_close(*cell) once, and *cell = NULL: a destructor for a garbage
 * collector's cell that ds_open filled (idempotent). */
void ds_close_at(ds_store **cell);

/* Message for any return code. */
const char *ds_strerror(int rc);

/* Store identity (16 random bytes chosen at creation). */
void ds_uuid(ds_store *s, uint8_t out[16]);

/*
 * References (refs.c).  Every function that hands the caller a reference
 * or a mapping fills a cell the caller allocated BEFORE the call, and sets
 * its ownership fields last, before returning: there is no instant at
 * which the caller's code runs while a reference exists that no cell
 * names.  The release functions are idempotent.
 */

/* Put a value: copy the buffers in, dedup pages (unless DS_NODEDUP), seal,
 * optionally bind key (replacing an older binding); *out holds a reference
 * on the new object.  Returns 0, DS_EFULL (store unchanged), DS_EINVAL,
 * DS_ELIMIT, errno. */
int ds_put_ref(ds_store *s, const uint8_t *key, uint32_t keylen,
               const uint8_t *desc, uint32_t desclen,
               const ds_iov *bufs, uint32_t nbufs, uint32_t flags, ds_ref *out);
/* Put one buffer under a key, taking no reference: the key binding is what
 * keeps the value (store[key] = value).  Same returns as ds_put_ref. */
int ds_put_key(ds_store *s, const uint8_t *key, uint32_t keylen,
               const uint8_t *desc, uint32_t desclen,
               const char *data, uint64_t len, uint32_t flags);
/* One more reference on (obj, gen) into *out: if this process holds the
 * object already, a local count; otherwise the object must be live and not
 * deleted (DS_ENOTFOUND). */
int ds_ref_pin(ds_store *s, uint32_t obj, uint64_t gen, ds_ref *out);
/* Release what *r holds (nothing if it holds nothing). */
int ds_ref_unpin(ds_store *s, ds_ref *r);
/* Reference for a pickled ObjectRef: lives without any process until
 * claimed or transit_ttl passes.  *token names it. */
int ds_transit(ds_store *s, uint32_t obj, uint64_t gen, uint64_t *token);
/* Take over the transit reference 'token' into *out, or, if it was claimed
 * already or expired, pin the object anew.  DS_ENOTFOUND if gone. */
int ds_ref_claim(ds_store *s, uint64_t token, uint32_t obj, uint64_t gen, ds_ref *out);
/* 0 if (obj, gen) is sealed, not deleted and referenced; DS_ENOTFOUND if not. */
int ds_ref_alive(ds_store *s, uint32_t obj, uint64_t gen);

/* Key -> object (no reference taken).  DS_ENOTFOUND if absent. */
int ds_lookup(ds_store *s, const uint8_t *key, uint32_t keylen,
              uint32_t *obj, uint64_t *gen);

/* Views.  ds_view_open pins (obj, gen) -- which must be live and not
 * deleted -- and maps it; ds_view_key does the same for the object bound
 * to key.  The cell then holds the pin (DS_OWN_PIN) and, for page-mapped
 * views that are not slices of the process's pool mapping, the mapping
 * (DS_OWN_MAP).  writable: a private copy-on-write mapping.  A small value
 * (vi->small) points into the metadata heap: copy it, then close the view.
 * ds_view_close releases whatever the cell holds. */
int ds_view_open(ds_store *s, uint32_t obj, uint64_t gen, int writable, ds_viewinfo *vi);
int ds_view_key(ds_store *s, const uint8_t *key, uint32_t keylen, int writable,
                ds_viewinfo *vi);
int ds_view_close(ds_store *s, ds_viewinfo *vi);

/* Destructors for a garbage collector (cffi's ffi.gc): release what the
 * cell holds, if anything, without running any code of the caller's
 * language in between.  ds_view_drop_at takes (and ignores) the address
 * of the object whose collection triggers it. */
void ds_ref_drop(ds_ref *r);
void ds_view_drop(ds_viewinfo *vi);
void ds_view_drop_at(ds_viewinfo *vi, void *addr);

/* Create: vi->data is private, zero-filled, writable memory of this
 * process (DS_OWN_MAP | DS_OWN_CREATE); no pool page is taken, nor
 * capacity counted, before the commit.  Commit runs the put pipeline over
 * it (zero pages and pages already stored cost nothing; the tail of the
 * last page is zeroed), seals and binds the key, and remaps vi->data
 * copy-on-write over the stored pages; the cell then holds a reference
 * (DS_OWN_PIN).  Abort (also what a failed commit leaves) discards the
 * object and leaves vi->data mapped to zero pages until ds_view_close.  A
 * child of fork() inherits the buffer as private memory, like any other;
 * only the process that began a create can commit it (DS_ESTATE). */
int ds_create_open(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t nbytes,
                   ds_viewinfo *vi);
int ds_create_commit(ds_store *s, ds_viewinfo *vi, const uint8_t *desc, uint32_t desclen);
int ds_create_abort(ds_store *s, ds_viewinfo *vi);

/* Unbind a key (DS_ENOTFOUND if absent); the object is freed once no
 * reference holds it. */
int ds_delete_key(ds_store *s, const uint8_t *key, uint32_t keylen);
/* Delete an object by reference: unbind its key, hide it from lookups. */
int ds_delete_obj(ds_store *s, uint32_t obj, uint64_t gen);

/* Number of bound keys. */
int ds_count(ds_store *s, uint64_t *n);
/* The bound keys, one bounded batch per call (the lock is not held
 * between calls).  Start with *cursor = 0; each call appends up to maxn
 * keys' bytes back to back into keys[0..keycap) with their lengths and
 * logical sizes, sets *used / *count, and advances *cursor; the walk is
 * over when *cursor == DS_KEYS_END.  A key bound for the whole walk comes
 * exactly once; one bound or unbound during it may or may not.  ERANGE
 * (cursor unchanged) if one hash bucket alone needs more than keycap bytes
 * or maxn entries: *used and *count then say how many. */
#define DS_KEYS_END 0x100000000
int ds_keys_next(ds_store *s, uint64_t *cursor, uint8_t *keys, uint64_t keycap,
                 uint32_t *lens, uint64_t *sizes, uint32_t maxn,
                 uint64_t *used, uint32_t *count);

int ds_stats_get(ds_store *s, ds_stats *out);
/* Reclaim what dead clients left; expire old transit references. */
int ds_gc(ds_store *s, ds_gcinfo *out);
/* This handle's client identity (slot, attach time), for telling others
 * who holds something; and whether the client so named is still attached
 * and alive (1) or not (0) -- by its slot lock, so across PID namespaces. */
void ds_client_self(ds_store *s, uint32_t *slot, uint64_t *attach_ns);
int ds_client_alive(ds_store *s, uint32_t slot, uint64_t attach_ns);
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
    uint64_t wp_failed;      /* batches dropped so far: write protection could not be set */
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

/* Return to the kernel the warm (freed, still faulted) pages that have
 * been free for at least decay_ms: one hole punch per run of pages, in
 * bounded slices under the lock, at most one pass over the pool per
 * call, resuming at *cursor (the caller's, initially 0).  *returned: pages
 * punched; *warm_left: warm pages still held.  Any thread, no lock held;
 * the Python side calls it from a per-process daemon thread (_decay.py). */
int ds_decay(ds_store *s, uint32_t decay_ms, uint32_t *cursor, uint64_t *returned,
             uint64_t *warm_left);

/* Salted 64-bit fingerprint of one page, and over n pages (benchmarks). */
uint64_t ds_fingerprint(ds_store *s, const void *page);
uint64_t ds_fingerprint_pages(ds_store *s, const void *pages, uint64_t n);
/* Which fingerprint kernel is in use: "avx2" or "scalar". */
const char *ds_hash_impl(void);

/* ---- cffi:end ---- */

#endif /* DEDUPSHM_H */
