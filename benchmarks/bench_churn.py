"""put + delete of fresh 256 MiB arrays in a store at its DEFAULTS.

ours    Store(create=True) with no tuning; each cycle puts an array that
        differs on every page from all earlier ones (changed outside the
        timing), then deletes it; per-cycle median of put + delete
peers (same run)
        memcpy of 256 MiB into already-faulted memory (np.copyto)
        ray.put + dropping the ref (if ray is installed)
target  <= 1.2x the memcpy (issue 10: >= 1.0x Ray)
"""
import gc
import time

import numpy as np

from _common import (MiB, Result, fmt_bytes, fmt_time, median, note, ns, make_random,
                     perturb, ray_or_none, ray_skip_reason, run_standalone, temp_store)

NAME = "churn"
RAY_FREE_WAIT = 0.1


def run(quick=False, use_ray=True):
    res = Result(NAME, quick)
    size = 64 * MiB if quick else 256 * MiB
    warmup, reps = (1, 3) if quick else (2, 9)
    tag = fmt_bytes(size)
    res.info.update(size=size, warmup=warmup, reps=reps)
    note(f"churn: put + delete of a fresh {tag} array, store at defaults, x{reps} after {warmup}")
    arr = make_random(size)
    ours, puts, dels, cpy, rays = [], [], [], [], []
    counter = 0
    with temp_store("churn") as s:
        for i in range(warmup + reps):
            counter += 1
            perturb(arr, counter)
            gc.collect()
            t0 = ns()
            ref = s.put(arr)
            t1 = ns()
            s.delete(ref)
            del ref
            t2 = ns()
            if i >= warmup:
                ours.append((t2 - t0) / 1e9)
                puts.append((t1 - t0) / 1e9)
                dels.append((t2 - t1) / 1e9)
    dst = np.empty_like(arr)
    dst[...] = 0
    for i in range(warmup + reps):
        counter += 1
        perturb(arr, counter)
        t0 = ns()
        np.copyto(dst, arr)
        t1 = ns()
        if i >= warmup:
            cpy.append((t1 - t0) / 1e9)
    del dst
    ray = ray_or_none(use_ray)
    if ray is not None:
        for i in range(warmup + reps):
            counter += 1
            perturb(arr, counter)
            t0 = ns()
            r = ray.put(arr)
            del r
            t1 = ns()
            if i >= warmup:
                rays.append((t1 - t0) / 1e9)
            time.sleep(RAY_FREE_WAIT)
    o, c = median(ours), median(cpy)
    rw = median(rays) if rays else None
    res.info["samples"] = dict(ours=ours, put=puts, delete=dels, memcpy=cpy, ray=rays)
    res.row(f"put + delete {tag} (defaults) vs memcpy into faulted memory", o, c, "memcpy")
    if rw is not None:
        res.row(f"put + delete {tag} (defaults) vs ray.put + drop", o, rw, "ray.put")
    res.print_detail()
    note(f"ours: put median {fmt_time(median(puts))}, delete median {fmt_time(median(dels))}")
    res.target(f"put + delete {tag} at defaults", o, c, "memcpy", "s", "lower",
               "<= 1.2x memcpy", o <= 1.2 * c)
    if rw is not None:
        res.target(f"put + delete {tag} at defaults vs ray", o, rw, "ray.put", "s", "lower",
                   ">= 1.0x ray", o <= rw)
    else:
        res.target(f"put + delete {tag} at defaults vs ray", o, None, "", "s", "lower",
                   f">= 1.0x ray ({ray_skip_reason()}: skipped)", None)
    return res


if __name__ == "__main__":
    run_standalone(run)
