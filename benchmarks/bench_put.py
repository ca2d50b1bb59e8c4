"""put of a large random array: cold, warm unique, duplicate.

ours
  cold      put into a freshly created store (every pool page is faulted
            in for the first time: ~12 us/page here)
  warm      repeated put/delete in one store created with
            warm_bytes=512 MiB, so freed pages stay faulted in; the array
            is changed on every page before each put (outside the timing),
            so every put is a unique put, never a dedup hit
  duplicate put of content the store already holds (one copy kept)
peers (same run)
  multiprocessing.shared_memory: create a new segment + copy (cold), and
            copy into an existing, already faulted segment (warm)
  ray.put   first put after ray.init (cold) and repeated puts (warm)
targets
  warm unique put >= 0.8x Ray's warm put throughput
  duplicate put >= 5x faster than shared_memory create+copy, and no
            slower than Ray's warm unique put
"""
import ctypes
import gc
import time

import numpy as np

from _common import (MiB, Result, fmt_bytes, fmt_time, median, note, ns,
                     make_random, perturb, ray_or_none, ray_skip_reason,
                     run_standalone, spread, ShmSegments, temp_store)

NAME = "put"
RAY_FREE_WAIT = 0.1


def _cold(arr, reps):
    """Fresh store vs new shm segment, alternating."""
    ours, shm = [], []
    for _ in range(reps):
        with temp_store("putcold", capacity=2 * arr.nbytes + 64 * MiB) as s:
            t0 = ns()
            ref = s.put(arr)
            ours.append((ns() - t0) / 1e9)
            del ref
        with ShmSegments() as segs:
            t0 = ns()
            seg = segs.create(arr.nbytes)
            dst = np.ndarray(arr.shape, arr.dtype, buffer=seg.buf)
            np.copyto(dst, arr)
            shm.append((ns() - t0) / 1e9)
            del dst
    return ours, shm


def _check_unique(s, arr, res):
    st = s.stats()
    res.info["warm_stats_after_unique_put_delete"] = st
    if st.get("physical_bytes", 0) > arr.nbytes + 2 * MiB:    # the kept copy only
        res.finding(f"after put/delete of every object, physical_bytes is still "
                    f"{fmt_bytes(st['physical_bytes'] - arr.nbytes)} above the kept copy "
                    f"(objects={st.get('objects')}): deleted objects were not freed")
    if st.get("pages_free_warm", 0) * 4096 < arr.nbytes // 2:
        res.finding(f"warm store keeps only {st.get('pages_free_warm')} free pages warm "
                    f"after deletes (warm_bytes=512 MiB): warm puts re-fault memory")


def _check_dup(s, arr, res):
    st = s.stats()
    res.info["dup_stats"] = st
    npages = arr.nbytes // 4096
    if st.get("pages_sharing", 0) < npages * 0.99:
        res.finding(f"duplicate put shared only {st.get('pages_sharing')} of "
                    f"{npages} pages (expected all)")
    if st.get("physical_bytes", 0) > arr.nbytes * 1.01:
        res.finding(f"duplicate put grew physical_bytes to {fmt_bytes(st['physical_bytes'])} "
                    f"for {fmt_bytes(arr.nbytes)} of unique content")


def _warm(arr, warmup, reps, ray, res):
    """Warm unique put, duplicate put, shm warm copy and ray.put, measured
    round-robin in one loop (rotating the order), so that noise from other
    processes on this machine hits all of them alike."""
    times = {"ours": [], "dup": [], "shm": [], "ray": [], "memcmp": []}
    dup_arr = arr.copy()
    perturb(dup_arr, 10_000_000)
    counter = [0]

    def fresh():
        counter[0] += 1
        perturb(arr, counter[0])

    with temp_store("putwarm", capacity=3 * arr.nbytes + 64 * MiB,
                    warm_bytes=512 * MiB) as s, ShmSegments() as segs:
        ref0 = s.put(dup_arr)                 # the content a duplicate put finds
        seg = segs.create(arr.nbytes)
        dst = np.ndarray(arr.shape, arr.dtype, buffer=seg.buf)
        np.copyto(dst, arr)                   # fault the segment in

        def op_ours():
            fresh()
            gc.collect()
            t0 = ns()
            ref = s.put(arr)
            dt = (ns() - t0) / 1e9
            s.delete(ref)
            del ref
            return dt

        def op_dup():
            gc.collect()
            t0 = ns()
            ref = s.put(dup_arr)
            dt = (ns() - t0) / 1e9
            if not times["dup"] and not checked[0]:
                _check_dup(s, arr, res)
                checked[0] = True
            s.delete(ref)
            del ref
            return dt

        libc = ctypes.CDLL(None)
        libc.memcmp.restype = ctypes.c_int
        libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        twin = dup_arr.copy()                 # equal bytes: memcmp reads both copies whole

        def op_memcmp():
            t0 = ns()
            libc.memcmp(dup_arr.ctypes.data, twin.ctypes.data, dup_arr.nbytes)
            return (ns() - t0) / 1e9

        def op_shm():
            fresh()
            t0 = ns()
            np.copyto(dst, arr)
            return (ns() - t0) / 1e9

        def op_ray():
            fresh()
            t0 = ns()
            ref = ray.put(arr)
            dt = (ns() - t0) / 1e9
            del ref
            # Ray frees asynchronously; without this pause the next put lands
            # in fresh (never faulted) object-store memory: not a warm put
            time.sleep(RAY_FREE_WAIT)
            return dt

        checked = [False]
        ops = [("ours", op_ours), ("dup", op_dup), ("shm", op_shm), ("memcmp", op_memcmp)]
        ray_first = None
        if ray is not None:
            fresh()
            t0 = ns()
            r = ray.put(arr)
            ray_first = (ns() - t0) / 1e9
            del r
            time.sleep(RAY_FREE_WAIT)
            ops.append(("ray", op_ray))
            # Ray's store reuses memory only after a few puts
            for _ in range(max(0, 3 - warmup)):
                op_ray()
        for i in range(warmup + reps):
            k = i % len(ops)
            for name, op in ops[k:] + ops[:k]:
                dt = op()
                if i >= warmup:
                    times[name].append(dt)
            if i == 0:
                _check_unique(s, arr, res)
        del dst, twin
        s.delete(ref0)
        del ref0
    return times, ray_first


def run(quick=False, use_ray=True):
    res = Result(NAME, quick)
    size = 64 * MiB if quick else 256 * MiB
    cold_reps = 1 if quick else 5
    warmup, reps = (1, 3) if quick else (2, 11)
    tag = fmt_bytes(size)
    res.info.update(size=size, cold_reps=cold_reps, warmup=warmup, reps=reps)
    note(f"put: {tag} random uint64 array; cold x{cold_reps}, warm x{reps} after {warmup} warm-up")

    arr = make_random(size)
    ours_cold, shm_cold = _cold(arr, cold_reps)
    ray = ray_or_none(use_ray)
    t, ray_first = _warm(arr, warmup, reps, ray, res)
    ours_warm, ours_dup, shm_warm, ray_warm = t["ours"], t["dup"], t["shm"], t["ray"]

    oc, ow, od = median(ours_cold), median(ours_warm), median(ours_dup)
    sc, sw = median(shm_cold), median(shm_warm)
    rw = median(ray_warm) if ray_warm else None
    res.info["samples"] = dict(ours_cold=ours_cold, ours_warm=ours_warm, ours_dup=ours_dup,
                               shm_cold=shm_cold, shm_warm=shm_warm, ray_first=ray_first,
                               ray_warm=ray_warm)
    thr = (lambda t: size / t if t else None)

    res.row(f"cold put {tag} (fresh store) vs shm create+copy", oc, sc, "shm create+copy")
    if ray is not None:
        res.row(f"cold put {tag} vs ray first put", oc, ray_first, "ray.put first")
    res.row(f"warm unique put {tag} vs shm copy into existing segment", ow, sw, "shm warm copy")
    res.row("warm unique put throughput vs shm warm copy", thr(ow), thr(sw), "shm warm copy",
            unit="B/s", better="higher")
    if ray is not None:
        res.row(f"warm unique put {tag} vs ray.put warm", ow, rw, "ray.put warm")
        res.row("warm unique put throughput vs ray.put warm", thr(ow), thr(rw), "ray.put warm",
                unit="B/s", better="higher")
    res.row(f"duplicate put {tag} vs shm create+copy", od, sc, "shm create+copy")
    res.row(f"duplicate put {tag} vs one memcmp of the two copies", od, median(t["memcmp"]),
            "memcmp")
    res.row(f"duplicate put {tag} vs shm warm copy", od, sw, "shm warm copy")
    if ray is not None:
        res.row(f"duplicate put {tag} vs ray.put warm (unique)", od, rw, "ray.put warm")
    res.print_detail()
    for label, xs in (("ours cold", ours_cold), ("ours warm", ours_warm), ("ours dup", ours_dup),
                      ("shm cold", shm_cold), ("shm warm", shm_warm), ("ray warm", ray_warm)):
        if xs:
            lo, hi = spread(xs)
            note(f"{label:9s}: median {fmt_time(median(xs))}, min {fmt_time(lo)}, "
                 f"max {fmt_time(hi)}, n={len(xs)}")

    if ray is not None:
        r = thr(ow) / thr(rw)
        res.target(f"warm unique put {tag} throughput", thr(ow), thr(rw), "ray.put warm",
                   "B/s", "higher", ">= 0.8x ray", r >= 0.8)
    else:
        res.target(f"warm unique put {tag} throughput", thr(ow), None, "", "B/s", "higher",
                   f">= 0.8x ray ({ray_skip_reason()}: skipped)", None)
    res.target(f"duplicate put {tag} vs shm create+copy", od, sc, "shm create+copy", "s",
               "lower", ">= 5x faster", sc / od >= 5)
    if ray is not None:
        res.target(f"duplicate put {tag} vs ray unique put", od, rw, "ray.put warm", "s",
                   "lower", "no slower than ray", od <= rw)
    else:
        res.target(f"duplicate put {tag} vs ray unique put", od, None, "", "s", "lower",
                   f"no slower than ray ({ray_skip_reason()}: skipped)", None)
    res.target(f"cold put {tag} (fresh store)", oc, sc, "shm create+copy", "s", "lower",
               "(info)", None)
    return res


if __name__ == "__main__":
    run_standalone(run)
