/*
 * wp.h -- internal interface between merger.c (which pages to merge, the
 * scan policy) and wp.c (keeping a page still while it is merged: the
 * region and busy tables, userfaultfd, mprotect, the SIGSEGV handler).
 * Not part of the ABI; see wp.c for the invariants.
 */
#ifndef DS_WP_H
#define DS_WP_H
#include <stdint.h>

#define DS_WP_BATCH 64u      /* most pages in one merge window */

/* Install the SIGSEGV handler and, unless disabled or unavailable, set
 * up this process's userfaultfd (lazily, once per process: after fork
 * the child sets up its own).  Takes wp.c's global lock: never call it
 * with a merger's mu held.  0 or an errno. */
int  ds_wp_setup(void);
/* 1 if this process has a working userfaultfd (after ds_wp_setup). */
int  ds_wp_uffd_ready(void);
/* Register [va, va+len) for userfaultfd write-protection.  Lock-free (no
 * wp.c lock), so the scan may call it under merger->mu.  1 if registered,
 * 0 if not (the pages then use mprotect). */
int  ds_wp_uffd_register(void *va, uint64_t len);

/* The table of mergeable regions the SIGSEGV handler consults.  Lock-free
 * (atomics), callable under any lock.  add: 0 or DS_ELIMIT. */
int  ds_wp_region_add(void *lo, uint64_t len);
void ds_wp_region_del(void *lo);

/* A merge window: pages [base, base + n pages) published busy and
 * write-protected.  Caller holds its merger's mu (so at most one window
 * per merger, and none across fork: see wp.c). */
typedef struct ds_wp_window {
    uint8_t *base;
    uint32_t n, nruns;
    int slot;                            /* busy-table entry */
    struct { uint32_t first, len; uint8_t uffd; } runs[DS_WP_BATCH];
} ds_wp_window;
/* Open a window over the pages i < n with sel[i] set; uffd[i] says page
 * i is registered for userfaultfd.  Publishes the busy entry, then
 * protects.  0: every selected page is write-protected.  Otherwise an
 * errno (ENOMEM near vm.max_map_count): nothing is protected any more,
 * the busy entry is gone, and the caller must not compare or remap. */
int  ds_wp_open(ds_wp_window *w, uint8_t *base, uint32_t n, const uint8_t *sel, const uint8_t *uffd);
/* Close it: lift the protection of the pages with still[i] set (pages
 * that were remapped meanwhile are fresh writable mappings and have
 * still[i] == 0), then clear the busy entry. */
void ds_wp_close(ds_wp_window *w, const uint8_t *still);

#endif
