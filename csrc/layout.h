/*
 * layout.h -- every shared structure of a store, its layout, and the lock
 * that protects it.  Nothing else defines shared memory layout.
 *
 * THE LOCK.  One robust, process-shared mutex (hdr->lock) protects every
 * mutable field below, in every process.  There is no other shared lock,
 * so there is no lock order to get wrong.  Work that needs no shared
 * state (fingerprinting, copying bytes, mapping views, fallocate of pages
 * the caller already owns) is done outside it.  When a process dies
 * holding the lock, the next locker gets EOWNERDEAD and rebuilds every
 * derived structure from the primary records (store.c: ds_rebuild).
 *
 * PRIMARY records (written carefully, validated on rebuild):
 *   - client table entries
 *   - heap chunks of kind OBJECT, BLOB, PENDING, HANDLE, FREE
 * DERIVED (recomputed by ds_rebuild):
 *   - page meta refcounts, the used/backed bitmaps' "used" half
 *   - the three hash indexes (pages by content, blobs by content, keys)
 *   - heap free lists, object/blob refcounts, all counters
 *
 * Index file layout (all offsets in the header, page aligned):
 *   [header 4 KiB][clients][page meta][page buckets][used bm][backed bm]
 *   [blob buckets][key buckets][heap]
 * Regions that grow (page meta, buckets, heap) are backed with fallocate()
 * before they are touched, so a full tmpfs is DS_EFULL, never SIGBUS.
 */
#ifndef DEDUPSHM_LAYOUT_H
#define DEDUPSHM_LAYOUT_H

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include "dedupshm.h"

#define DS_MAGIC   0x314d485350454444ULL   /* "DDEPSHM1" little endian */
#define DS_FORMAT  3u   /* 2: client liveness by OFD slot locks; 3: 44 B objects, inline values */
#define DS_NIL     0xFFFFFFFFu             /* end of chain / no node */
#define DS_UNHASHED 0xFFFFFFFEu            /* page meta: not in the content index */
#define DS_ZERO    0xFFFFFFFFu             /* page list: an all-zero page */
#define DS_MAX_CLIENTS 4096u
#define DS_NCLASSES 120u
#define DS_UNIT 16u                        /* heap offsets are in 16 B units */
#define DS_TRANSIT_OWNER 0xFFFFFFFFu

enum ds_state { DS_ST_EMPTY = 0, DS_ST_READY = 0x52454459u /* "READY" */ };

/* ---- linear hash table header (one per index) -------------------------
 * Buckets hold node ids (DS_NIL = empty); nodes chain through a 'next'
 * field they own.  Grows one bucket at a time (Litwin's linear hashing),
 * so the touched part of the bucket array is proportional to its entries.
 * Protected by hdr->lock. */
typedef struct ds_lhash {
    uint32_t level;        /* 2^level buckets before splitting starts */
    uint32_t split;        /* next bucket to split */
    uint32_t count;        /* nodes in the table */
    uint32_t max_buckets;  /* size of the bucket array */
    uint64_t buckets_off;  /* byte offset of the bucket array in the index */
    uint64_t backed;       /* bytes of the bucket array backed so far */
} ds_lhash;

/* ---- client table entry (one per attached process handle) -------------
 * Written by the owning process at attach/close, by gc when reaping; all
 * under hdr->lock.  pid == 0: free slot.  A used slot is alive while some
 * open file description of the index holds the OFD write lock on byte
 * DS_LIVE_LOCK_BASE + slot (store.c): the kernel drops it when its
 * process dies, whatever PID namespace either process is in.  pid is for
 * display only (it may be another namespace's number). */
typedef struct ds_client {
    uint32_t pid;
    uint32_t pad;
    uint64_t reserved;     /* format 1 kept a /proc start time here */
    uint64_t handles;      /* references it holds (statistics only) */
    uint64_t attach_ns;
    uint64_t volatile_pages;  /* merger: pages that changed since its last look */
    uint64_t unshared_pages;  /* merger: stable pages still waiting for a partner */
    uint64_t merged_pages;    /* merger: pages of ours mapped onto pool pages */
    uint64_t pad2;
} ds_client;

/* ---- page meta, one per pool page, array at hdr->pmeta_off -------------
 * refcnt: references from sealed/pending objects' page lists (+ merged
 *         mappings later).  0 = free.
 * fp:     low 32 bits of the salted content fingerprint (valid when hashed)
 * next:   chain in the content index; DS_UNHASHED while the page is
 *         private to a writer (being filled, or DS_NODEDUP).
 * All fields under hdr->lock.  A page with next != DS_UNHASHED is
 * immutable while refcnt > 0.
 * A FREE page (refcnt 0) that is still backed ("warm") keeps in fp the
 * time it was freed: the low 32 bits of CLOCK_MONOTONIC in milliseconds
 * (ds_now_ms32), compared modulo 2^32; ds_decay punches it once it has
 * been free for the decay time (pool.c). */
typedef struct ds_pmeta {
    uint32_t fp;
    uint32_t refcnt;
    uint32_t next;
} ds_pmeta;

/* ---- heap chunks --------------------------------------------------------
 * The heap is a bump region carved into chunks whose size comes from a
 * fixed class table (heap.c); chunks are never split or merged, and
 * freed ones go to the free list of their class.  Chunk ids are byte
 * offsets from heap start / 16 (0 is reserved: "none").  Walking the heap
 * from unit 1 by class size visits every chunk: that is what rebuild and
 * gc do.  Every field of every chunk is under hdr->lock, except that the
 * body of a SEALED object's blob is immutable and may be read without the
 * lock by a process holding a reference to the object. */
enum ds_kind {
    DS_K_FREE = 0xA1, DS_K_OBJECT = 0xB1, DS_K_BLOB = 0xB2,
    DS_K_HANDLE = 0xB3, DS_K_PENDING = 0xB4, DS_K_MERGE = 0xB5,
};

typedef struct ds_chunk {
    uint8_t kind;
    uint8_t cls;           /* size class */
    uint16_t flags;
    uint32_t refcnt;       /* OBJECT: handles + key binding; BLOB: objects */
    uint32_t next;         /* hash chain (OBJECT: keys, BLOB: blobs) or free list */
    uint32_t fp;           /* hash of key (OBJECT) or content (BLOB) */
} ds_chunk;

/* OBJECT chunk: one stored value.  44 bytes of header, then the key.
 * An INLINE object (a sealed value of at most DS_INLINE_MAX bytes in one
 * buffer, put whole) has no blob: its descriptor (desclen bytes) and its
 * bytes follow the key in the same chunk, immutable once sealed -- one
 * chunk per small key instead of an object and a shared blob, which
 * would cost more than the few bytes they could share. */
enum { DS_OBJ_CREATED = 1, DS_OBJ_SEALED = 2 };
enum { DS_OF_KEYED = 1, DS_OF_DELETED = 2, DS_OF_INLINE = 4 };
#define DS_INLINE_MAX 64u
typedef struct ds_object {
    ds_chunk h;
    uint64_t gen;          /* unique for the life of the store: refs carry it */
    uint64_t size;         /* logical bytes of the data region */
    uint32_t blob;         /* SEALED: BLOB chunk (0 if INLINE); CREATED: PENDING chunk or 0 */
    union {
        uint32_t owner;    /* client slot while CREATED */
        uint32_t desclen;  /* SEALED and INLINE: descriptor bytes after the key */
    };
    uint8_t state;         /* CREATED (owner filling it) or SEALED */
    uint8_t oflags;        /* DS_OF_* */
    uint16_t keylen;
    uint8_t key[];         /* keylen bytes [, INLINE: desc, data] */
} ds_object;
/* bytes an object chunk needs for a key of keylen and 'extra' bytes after it */
#define DS_OBJ_BYTES(keylen, extra) (offsetof(ds_object, key) + (uint64_t)(keylen) + (extra))
#define DS_OBJ_INLINE_DESC(o) ((o)->key + (o)->keylen)
#define DS_OBJ_INLINE_DATA(o) ((o)->key + (o)->keylen + (o)->desclen)

/* BLOB chunk: the immutable description (and, if small, the bytes) of a
 * sealed value.  Small blobs are deduplicated by content (h.fp, blob
 * index); large ones belong to one object and hold one page reference
 * per non-zero page of their extents. */
enum { DS_BF_SMALL = 1, DS_BF_HASHED = 2, DS_BF_NODEDUP = 4, DS_BF_REAP = 8 };
/* A large blob whose last object went (refcnt 0) with many pages is
 * released in slices (object.c ds_reap_flush): flagged DS_BF_REAP, its
 * client slot in h.next (large blobs are never in a hash chain), its
 * page runs trimmed from the end as they are released, so the runs left
 * are exactly the references it still holds.  gc finishes one whose
 * client died; crash recovery drops it (refcnt 0) and recounts pages. */
typedef struct ds_blob {
    ds_chunk h;
    uint64_t size;         /* data region bytes */
    uint32_t desclen;
    uint32_t nbufs;
    uint32_t nextents;     /* large: number of (page, npages) runs */
    uint32_t body;         /* bytes after this struct that the blob uses */
    /* then: uint64_t bufs[2*nbufs]; desc[desclen]; pad to 16;
     *       small: data[size] / large: uint32_t ext[2*nextents] */
} ds_blob;

/* PENDING chunk: the pages a CREATED object owns so far.  pages[i] is
 * DS_ZERO until page i is acquired.  Lets gc/rebuild release them.
 * MERGE chunk (same layout): one mergeable region of client 'owner';
 * pages[i] is the pool page that page i of the region is mapped onto (one
 * reference each), DS_ZERO if none.  Written by the owner's merger under
 * the lock; released by the owner, or by gc when the owner died. */
typedef struct ds_pending {
    ds_chunk h;
    uint64_t size;
    uint32_t npages;
    uint32_t owner;        /* MERGE only: client slot */
    uint32_t pages[];
} ds_pending;

/* Merger hint table: a lossy, 4-way set-associative table of fingerprints of
 * stable (unchanged across two looks) pages that are not in the pool
 * yet, and whose they are.  When a second process finds a page with the
 * same fingerprint there, it copies its page into the pool; the first
 * process then finds the bytes in the pool on its next look.  A hint is
 * never trusted: every merge compares bytes.  Under hdr->lock. */
typedef struct ds_hint {
    uint32_t tag;          /* high half of the fingerprint (low half picks the slot) */
    uint32_t owner;        /* client slot + 1; 0 = empty */
} ds_hint;

/* HANDLE chunk: one reference to an object held by a client, or in
 * flight inside a pickle (owner == DS_TRANSIT_OWNER). */
typedef struct ds_handle {
    ds_chunk h;
    uint32_t obj;
    uint32_t owner;
    uint64_t gen;
    uint64_t stamp;        /* transit: creation time (s); nonce in h.fp */
} ds_handle;

/* ---- the header at offset 0 of the index file ---------------------------
 * Immutable after creation: magic .. heap_size.  Everything from 'lock'
 * on is under hdr->lock. */
typedef struct ds_header {
    uint64_t magic;
    uint32_t format;
    uint32_t page_size;
    uint64_t capacity;       /* bytes of object data allowed */
    uint32_t cap_pages;      /* pool pages (pool file size / 4096) */
    uint32_t max_clients;
    uint64_t salt[2];        /* fingerprint salt, random per store */
    uint8_t uuid[16];
    uint64_t index_size;
    uint64_t clients_off, pmeta_off, used_off, backed_off, heap_off, heap_size;
    uint64_t warm_pages;     /* freed pages kept backed, at most */
    uint64_t hints_off;      /* merger hint table */
    uint32_t hints_mask;     /* entries - 1 (a power of two) */
    uint32_t hints_active;   /* under lock: entries in use - 1; grows with mergeable memory */
    uint32_t transit_ttl;    /* seconds */
    uint32_t state;          /* DS_ST_READY once initialised */
    uint8_t pad0[64];

    pthread_mutex_t lock __attribute__((aligned(64)));

    ds_lhash pages_ix;       /* content index of pool pages */
    ds_lhash blobs_ix;       /* content index of small blobs */
    ds_lhash keys_ix;        /* key -> object */
    uint64_t pmeta_backed;   /* bytes of page meta backed */
    uint64_t heap_top;       /* bump offset in units */
    uint64_t heap_backed;    /* bytes of heap backed */
    uint32_t free_head[DS_NCLASSES];
    uint32_t alloc_hint;     /* lowest page that may be free */
    uint32_t page_hwm;       /* 1 + highest page ever allocated */
    uint64_t gen_seq;
    uint32_t nonce_seq;
    uint32_t transit;        /* transit handles outstanding */
    /* counters (derived) */
    uint64_t objects, keys, logical_bytes, pages_used, pages_shared,
             pages_sharing, pages_zero, small_bytes, warm_free, handles,
             meta_bytes, gc_runs, recoveries, reaped_clients;
    /* merger counters (summed over processes) */
    uint64_t full_scans, pages_scanned, merger_cpu_ns;
    uint64_t transit_walk;   /* when gc last looked for expired transit handles (s) */
    uint64_t mergeable_pages;/* pages of all live merge regions (sizes the hint table) */
} ds_header;

/* ---- the per-process handle (private memory) ---------------------------- */
struct ds_store {
    int index_fd, pool_fd;
    uint8_t *ix;             /* index, read-write */
    uint8_t *ix_ro;          /* index, read-only (small views) */
    uint8_t *pool_rw;        /* pool, read-write (writers fill pages here) */
    uint8_t *pool_ro;        /* pool, read-only (single-run views) */
    uint64_t ix_len, pool_len;
    ds_header *hdr;
    uint32_t slot;           /* our client slot */
    uint32_t pid;
    uint64_t secret[8];      /* fingerprint lanes derived from salt */
    struct ds_merger *merger;   /* this process's mergeable regions (merger.c) */

    /* refs.c: the references this process holds, one shared HANDLE per
     * object with a local count.  Process-private, under pin_mu.  Lock
     * order: g_stores_mu (refs.c) -> wp.c's global lock -> merger->mu ->
     * pin_mu -> hdr->lock. */
    pthread_mutex_t pin_mu;
    struct ds_pin *pins;     /* open addressing by object id */
    uint32_t pin_cap, pin_count;
    /* lifetime (atomics): calls in progress; 1 for the opener + 1 per cell
     * that holds something.  ds_close waits for inflight == 0; the handle
     * is torn down when refs reaches 0. */
    uint64_t inflight, refs;
    int closed;              /* ds_close ran: new calls get DS_ECLOSED */
    int gc_busy;             /* atomic: a thread of ours is reaping (store.c ds_gc) */
    int orphan;              /* a fork child that could not get a slot: calls fail */
    /* fork (refs.c's atfork handlers, between prepare and parent/child) */
    int fork_fd;             /* new open file description holding the child's slot lock */
    uint32_t fork_slot;      /* DS_NIL: none reserved */
    ds_store *next_store;    /* list of open handles, under g_stores_mu */
    char *index_path;        /* for re-opening the index if /proc is absent */
};

/* Offset of the OFD byte-range lock that marks client slot i alive: far
 * past the end of the index file, so it never covers data.  store.c. */
#define DS_LIVE_LOCK_BASE (1ull << 40)
int  ds_slot_lock(int fd, uint32_t slot);      /* 0 or errno (EAGAIN: held) */
int  ds_slot_alive(ds_store *s, uint32_t slot);   /* 1 alive, 0 dead */
void ds_release_slot(ds_store *s, uint32_t slot); /* lock held: all it holds */
void ds_teardown(ds_store *s);                 /* refs.c: last ref dropped */
/* refs.c: public entry points bracket their work with these */
int  ds_enter(ds_store *s);                    /* 0, DS_ECLOSED or DS_ELIMIT */
void ds_leave(ds_store *s);

/* ---- internal API (not part of the ABI) ---- */
/* store.c */
int  ds_lock(ds_store *s);            /* may rebuild after EOWNERDEAD */
void ds_unlock(ds_store *s);
int  ds_back(ds_store *s, uint64_t off, uint64_t len);  /* fallocate index */
uint64_t ds_now_s(void);
uint64_t ds_now_ns(void);            /* CLOCK_REALTIME */
/* hash.c */
void ds_hash_init(ds_store *s);
uint64_t ds_hash_bytes(const ds_store *s, const void *p, uint64_t n);
int  ds_page_is_zero(const void *p);
void ds_copy_page(void *dst, const void *src);   /* dst page aligned */
uint64_t ds_hash_copy_page(const ds_store *s, void *dst, const void *src);  /* both, one read */
void ds_copy_done(void);                         /* fence after ds_copy_page */
/* heap.c */
uint32_t ds_chunk_alloc(ds_store *s, uint64_t bytes, uint8_t kind);  /* 0 = full */
void ds_chunk_free(ds_store *s, uint32_t id);
uint64_t ds_chunk_bytes_for(uint64_t bytes);
void ds_heap_rebuild_free(ds_store *s);
typedef struct ds_lhops {
    uint32_t *(*next)(ds_store *, uint32_t);
    uint32_t (*hash)(ds_store *, uint32_t);
} ds_lhops;
int  ds_lh_insert(ds_store *s, ds_lhash *t, const ds_lhops *ops, uint32_t id);
void ds_lh_remove(ds_store *s, ds_lhash *t, const ds_lhops *ops, uint32_t id);
uint32_t ds_lh_first(ds_store *s, ds_lhash *t, uint32_t hash);
void ds_lh_reset(ds_store *s, ds_lhash *t);
extern const ds_lhops ds_pages_ops, ds_chunk_ops;
/* pool.c */
int  ds_pages_alloc(ds_store *s, uint32_t n, uint32_t *out);
int  ds_pages_alloc_at(ds_store *s, uint32_t n, uint32_t *out, uint32_t *cursor);
uint32_t ds_page_candidate(ds_store *s, uint64_t fp);
void ds_page_incref(ds_store *s, uint32_t page);
void ds_page_decref(ds_store *s, uint32_t page);
uint32_t ds_page_find(ds_store *s, uint64_t fp, const void *bytes);
int  ds_page_publish(ds_store *s, uint32_t page, uint64_t fp);
int  ds_pool_reserve(ds_store *s, const uint32_t *pages, uint32_t n);
void ds_page_free_raw(ds_store *s, uint32_t page);
void ds_page_decref_cold(ds_store *s, uint32_t page);
int  ds_pmeta_ensure(ds_store *s, uint32_t page);
uint32_t ds_now_ms32(void);          /* CLOCK_MONOTONIC ms, low 32 bits: freed-page stamps */
int  ds_punch_flush(ds_store *s);    /* lock held: punch a slice of pages freed past the warm cap */
int  ds_reap_flush(ds_store *s);     /* lock held: release a slice of a dropped large value's pages */
void ds_reap_pause(void);            /* no lock: test hook between slices */
void ds_blob_release_all(ds_store *s, uint32_t bid);   /* lock held: a REAP blob, at once */
void ds_punch_forget(void);
int  ds_decay_in(ds_store *s, uint32_t decay_ms, uint32_t *cursor, uint64_t *returned,
                 uint64_t *warm_left);
/* merger.c */
void ds_merger_close(ds_store *s);
/* refs.c */
void ds_refs_add(ds_store *s);
/* object.c, check.c: bodies of public calls whose guard (ds_enter/ds_leave)
 * is in refs.c; same contracts as in dedupshm.h */
int ds_lookup_in(ds_store *s, const uint8_t *key, uint32_t keylen, uint32_t *obj, uint64_t *gen);
int ds_transit_in(ds_store *s, uint32_t obj, uint64_t gen, uint64_t *token);
int ds_delete_key_in(ds_store *s, const uint8_t *key, uint32_t keylen);
int ds_delete_obj_in(ds_store *s, uint32_t obj, uint64_t gen);
int ds_count_in(ds_store *s, uint64_t *n);
int ds_keys_next_in(ds_store *s, uint64_t *cursor, uint8_t *keys, uint64_t keycap,
                    uint32_t *lens, uint64_t *sizes, uint32_t maxn,
                    uint64_t *used, uint32_t *count);
int ds_check_in(ds_store *s, char *buf, uint64_t buflen, ds_checkinfo *out);
int ds_mergeable_alloc_in(ds_store *s, uint64_t nbytes, uint8_t **addr);
int ds_mergeable_free_in(ds_store *s, uint8_t *addr);
int ds_merge_scan_in(ds_store *s, uint64_t max_pages, ds_scaninfo *out);
int ds_merger_config_in(ds_store *s, uint32_t vma_budget);
/* object.c: handle-level operations, wrapped by refs.c (which owns the
 * process's reference table); see dedupshm.h for the cell-level API. */
void ds_object_free(ds_store *s, uint32_t id);
void ds_object_decref(ds_store *s, uint32_t id);
uint32_t ds_handle_new(ds_store *s, uint32_t obj, uint32_t owner);   /* lock held; 0 = full */
int ds_object_alive(ds_store *s, uint32_t obj, uint64_t gen);        /* lock held; 1 = live */
int ds_put(ds_store *s, const uint8_t *key, uint32_t keylen,
           const uint8_t *desc, uint32_t desclen,
           const ds_iov *bufs, uint32_t nbufs, uint32_t flags,
           uint32_t *obj, uint64_t *gen, uint32_t *handle);
int ds_create(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t nbytes,
              uint32_t *obj, uint64_t *gen, uint8_t **data);
int ds_commit(ds_store *s, uint32_t obj, uint64_t gen,
              const uint8_t *desc, uint32_t desclen, uint8_t *data,
              uint32_t *handle);
int ds_abort(ds_store *s, uint32_t obj, uint64_t gen, uint8_t *data);
int ds_acquire(ds_store *s, uint32_t obj, uint64_t gen, uint32_t *handle);
int ds_release(ds_store *s, uint32_t handle);
int ds_claim(ds_store *s, uint64_t token, uint32_t obj, uint64_t gen, uint32_t *handle);
/* Map an object the caller holds a reference on (a live, sealed, not
 * deleted one).  writable: private copy-on-write.  A value of more page
 * runs than ds_view_runs_max() comes back as a private copy (read-only
 * unless writable); out->map_len says what to unmap either way. */
int ds_view(ds_store *s, uint32_t obj, uint64_t gen, int writable, ds_viewinfo *out);
/* object.c, for put.c: objects and their keys (lock held) */
struct ds_object;
struct ds_object *ds_obj_check(ds_store *s, uint32_t id, uint64_t gen);
struct ds_object *ds_object_new(ds_store *s, const uint8_t *key, uint32_t keylen, uint64_t extra,
                                uint32_t *id);
int  ds_object_seal(ds_store *s, uint32_t id, uint32_t blob, uint64_t size, int keyed,
                    uint32_t *handle);
/* object.c: mapping page runs (no lock; the caller holds references on
 * the pages).  ds_view_runs_max: most runs a view maps one by one (each
 * costs a VMA); beyond it the bytes are copied into one mapping. */
int  ds_map_runs(ds_store *s, uint8_t *addr, const uint32_t *ext, uint32_t nruns,
                 int prot, int shared);
uint8_t *ds_reserve_va(uint64_t len);
uint32_t ds_view_runs_max(void);
/* heap.c: the one heap walk.  ds_chunk_next: the chunk after id, or 0
 * when the walk must stop (end of heap, or a chunk whose class is unknown
 * or that runs past heap_top: a torn tail).  Lock held. */
uint64_t ds_chunk_next(ds_store *s, uint64_t id);
/* Visit every chunk from unit 1 (lock held).  'continue' is fine; 'break'
 * leaves only the inner loop, so use goto or a flag to stop early. */
#define DS_FOR_CHUNKS(s, id, c)                                                \
    for (uint64_t id = 1, _ds_nx; id < (s)->hdr->heap_top &&                   \
         (_ds_nx = ds_chunk_next((s), id)) != 0; id = _ds_nx)                  \
        for (ds_chunk *c = DS_CHUNK_RAW((s), id); c; c = NULL)
/* heap.c: fallocate that retries on EINTR (a signal must not fail a
 * reservation or leave a punch undone).  Any caller, no lock needed. */
int  ds_fallocate(int fd, int mode, uint64_t off, uint64_t len);
/* merger fork hooks (called by refs.c's atfork handlers)
 * Order.  prepare: ds_wp_atfork_prepare(); then ds_merger_fork_prepare(s)
 * for every store, BEFORE taking any hdr->lock (the scan holds
 * merger->mu while it waits for hdr->lock); then, under hdr->lock with
 * the child's slot allocated, ds_merger_fork_dup(s, child_slot).
 * parent: ds_merger_fork_parent(s) for every store, then
 * ds_wp_atfork_parent().  child: ds_wp_atfork_child(), then
 * ds_merger_fork_child(s) for every store (s->slot may already be the
 * child's: fork_child does not read it).
 * Parent and child hooks run after every prepare, also when the fork or
 * ds_merger_fork_dup failed.  ds_merger_fork_dup sets the child slot's
 * merged_pages itself (the caller must not clear that slot afterwards);
 * on DS_EFULL it has freed its copies, and a child that is forked all
 * the same forgets its merges (its merged pages stay mapped with no
 * reference of its own: refs.c should make such a fork fail).  While a
 * fork waits in ds_merger_fork_prepare the scan hands mu over between two
 * batches, so a fork waits for one batch, not a whole ds_merge_scan. */
void ds_wp_atfork_prepare(void);     /* takes wp.c's global lock */
void ds_wp_atfork_parent(void);
void ds_wp_atfork_child(void);       /* busy table cleared, uffd reset, lock usable */
void ds_merger_fork_prepare(ds_store *s);    /* takes s->merger->mu: no merge window open */
int  ds_merger_fork_dup(ds_store *s, uint32_t child_slot);
void ds_merger_fork_parent(ds_store *s);     /* forgets the copies; unlocks mu */
void ds_merger_fork_child(ds_store *s);      /* adopts the copies; per-process state reset */

/* address helpers */
#define DS_HDR(s)        ((s)->hdr)
/* Chunk and page-meta accessors for ids read from shared memory: an id
 * outside the heap (or a page outside the backed page meta) yields a
 * process-local zeroed stand-in whose kind matches nothing, so corrupt
 * metadata is reported by the callers' kind checks and never makes us
 * read or write outside our mappings.  _RAW: for ids already checked
 * (the allocator, ds_chunk_get, the heap walk). */
/* The stand-in is per thread (threads of one process reach it at once:
 * a shared one would be zeroed under a thread still reading it). */
#define DS_DUMMY_BYTES 512u
extern __thread uint64_t ds_dummy[DS_DUMMY_BYTES / 8];
static inline void *ds_standin(void) {
    memset(ds_dummy, 0, DS_DUMMY_BYTES);
    return ds_dummy;
}
#define DS_CHUNK_RAW(s, id) ((ds_chunk *)((s)->ix + (s)->hdr->heap_off + (uint64_t)(id) * DS_UNIT))
static inline ds_chunk *ds_chunk_at(ds_store *s, uint64_t id) {
    if (id - 1 >= s->hdr->heap_top - 1) {          /* id == 0 or id >= heap_top */
        ds_chunk *c = ds_standin();
        c->next = DS_NIL;                           /* ends any chain it is found in */
        return c;
    }
    return DS_CHUNK_RAW(s, id);
}
static inline ds_pmeta *ds_pmeta_at(ds_store *s, uint64_t pg) {
    if (pg >= s->hdr->cap_pages || (pg + 1) * sizeof(ds_pmeta) > s->hdr->pmeta_backed) {
        ds_pmeta *m = ds_standin();
        m->next = DS_NIL;
        return m;
    }
    return ((ds_pmeta *)(s->ix + s->hdr->pmeta_off)) + pg;
}
#define DS_CHUNK(s, id)  ds_chunk_at((s), (id))
/* most links a chain walk follows before it calls the chain corrupt */
#define DS_CHAIN_MAX(t)  ((uint64_t)(t)->count + 64)
#define DS_PMETA(s, pg)  ds_pmeta_at((s), (pg))
#define DS_CLIENT(s, i)  (((ds_client *)((s)->ix + (s)->hdr->clients_off)) + (i))
#define DS_POOL_RO(s, pg) ((s)->pool_ro + (uint64_t)(pg) * DS_PAGE_SIZE)
#define DS_POOL_RW(s, pg) ((s)->pool_rw + (uint64_t)(pg) * DS_PAGE_SIZE)

/* Entries a PENDING/MERGE list, or page runs a blob, really has room for:
 * loops over counts read from shared memory use these, so a corrupt count
 * cannot walk them out of their chunk. */
uint64_t ds_class_bytes(unsigned cls);
static inline uint32_t ds_list_len(const ds_pending *pd) {
    uint64_t bytes = ds_class_bytes(pd->h.cls);
    uint64_t room = bytes > sizeof *pd ? (bytes - sizeof *pd) / 4 : 0;
    return pd->npages <= room ? pd->npages : (uint32_t)room;
}
static inline uint32_t ds_blob_runs(const ds_blob *b) {
    uint64_t bytes = ds_class_bytes(b->h.cls);
    uint64_t head = ((16ull * b->nbufs + b->desclen) + 15u) & ~15ull;
    uint64_t room = bytes > sizeof *b + head ? (bytes - sizeof *b - head) / 8 : 0;
    return b->nextents <= room ? b->nextents : (uint32_t)room;
}

static inline uint8_t *ds_blob_desc(ds_blob *b) {
    return (uint8_t *)(b + 1) + 16u * b->nbufs;
}
static inline uint64_t *ds_blob_bufs(ds_blob *b) { return (uint64_t *)(b + 1); }
static inline uint8_t *ds_blob_payload(ds_blob *b) {
    uint64_t off = 16u * b->nbufs + b->desclen;
    off = (off + 15u) & ~(uint64_t)15u;
    return (uint8_t *)(b + 1) + off;
}

/* THE validator for a chunk id read from shared memory (or from a
 * caller): the chunk if id lies inside the heap, its class is known, it
 * ends inside the heap and (kind != 0) it is of that kind; else NULL.
 * Lock held, or a reference that keeps the chunk alive. */
static inline ds_chunk *ds_chunk_get(ds_store *s, uint64_t id, uint8_t kind) {
    uint64_t top = s->hdr->heap_top;
    if (id < 1 || id >= top) return NULL;
    ds_chunk *c = DS_CHUNK_RAW(s, id);
    uint64_t bytes = ds_class_bytes(c->cls);
    if (!bytes || id + bytes / DS_UNIT > top || (kind && c->kind != kind)) return NULL;
    return c;
}

#endif
