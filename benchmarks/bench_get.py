"""get of a large array in ANOTHER process (attach + map, zero-copy).

The parent puts a random array; a spawned child attaches the store and
unpickles the ObjectRef first (not timed), then times, per iteration,
``v = store.get(ref)`` (get) and the following ``del v`` (release).
Reported: the first get (cold: nothing of the object mapped in the child
yet), a first read of one byte per page after it (page-table population,
info), and the median of many warm get / get+release iterations.

peers (same run, also measured in a separate process)
  shared_memory  SharedMemory(name) + np.ndarray view + close
  ray.get        in a Ray actor (a worker process), of an object the
                 driver ray.put; ``del`` of the result counts as release
target: get+release <= 50 us
"""
import multiprocessing as mp
import pickle

import numpy as np

from _common import (MiB, Result, fmt_bytes, median, note, ns, make_random,
                     ray_or_none, ray_skip_reason, run_standalone, ShmSegments,
                     store_name, temp_store, PAGE)

NAME = "get"
BLOCKS = 10


def _touch_pages(v):
    """Read one byte of every page (forces the mapping of every page)."""
    flat = v.reshape(-1).view(np.uint8)
    return int(flat[::PAGE].sum())


def object_extents(store, ref):
    """Number of page runs (= VMAs one view maps) of a stored object, via
    the private C handle; None if that is not reachable."""
    try:
        from dedupshm._core import ffi, lib
        core = store._core
        vi = ffi.new("ds_viewinfo *")
        if lib.ds_view(core._s, ref._obj, ref._gen, 0, vi) != 0:
            return None
        n = int(vi.extents)
        if vi.map_len:
            lib.ds_unmap(vi.data, vi.map_len)
        return n
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def _child(name, ref_blob, seg_name, shape, dtype, warmup, reps, q):
    """Times ours and the shared_memory peer in this (second) process,
    cold first, then warm in alternating blocks."""
    try:
        from multiprocessing import shared_memory
        import dedupshm
        s = dedupshm.Store(name)
        ref = pickle.loads(ref_blob)
        out = {"ours": {"get": [], "cycle": []}, "shm": {"get": [], "cycle": []}}

        def ours_once():
            t0 = ns()
            v = s.get(ref)
            t1 = ns()
            del v
            return t1 - t0, ns() - t0

        def shm_once():
            t0 = ns()
            seg = shared_memory.SharedMemory(name=seg_name)
            a = np.ndarray(shape, dtype, buffer=seg.buf)
            t1 = ns()
            del a
            seg.close()
            return t1 - t0, ns() - t0

        # cold: first get, then the first read of every page
        t0 = ns()
        v = s.get(ref)
        out["ours"]["first"] = (ns() - t0) / 1e9
        t0 = ns()
        out["ours"]["checksum"] = _touch_pages(v)
        out["ours"]["touch"] = (ns() - t0) / 1e9
        out["readonly_ndarray"] = isinstance(v, np.ndarray) and not v.flags.writeable
        del v
        t0 = ns()
        seg = shared_memory.SharedMemory(name=seg_name)
        a = np.ndarray(shape, dtype, buffer=seg.buf)
        out["shm"]["first"] = (ns() - t0) / 1e9
        t0 = ns()
        _touch_pages(a)
        out["shm"]["touch"] = (ns() - t0) / 1e9
        del a
        seg.close()

        for _ in range(warmup):
            ours_once()
            shm_once()
        for _ in range(BLOCKS):
            for key, fn in (("ours", ours_once), ("shm", shm_once)):
                for _ in range(reps // BLOCKS):
                    g, c = fn()
                    out[key]["get"].append(g / 1e9)
                    out[key]["cycle"].append(c / 1e9)
        del ref
        s.close()
        q.put(out)
    except BaseException as e:  # noqa: BLE001 - report to the parent
        q.put({"error": repr(e)})


def _run_child(target, args, timeout=300):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=args + (q,))
    p.start()
    try:
        out = q.get(timeout=timeout)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
            p.join()
    if "error" in out:
        raise RuntimeError(f"child failed: {out['error']}")
    return out


def _ray_actor_class(ray):
    @ray.remote(num_cpus=0)
    class Getter:
        def time_get(self, refs, warmup, reps):
            import time
            ref = refs[0]
            ns_ = time.perf_counter_ns
            t0 = ns_()
            v = ray.get(ref)
            first = (ns_() - t0) / 1e9
            flat = v.reshape(-1).view("u1")
            t0 = ns_()
            int(flat[::4096].sum())
            touch = (ns_() - t0) / 1e9
            del v, flat
            get, cyc = [], []
            for i in range(warmup + reps):
                t0 = ns_()
                v = ray.get(ref)
                t1 = ns_()
                del v
                t2 = ns_()
                if i >= warmup:
                    get.append((t1 - t0) / 1e9)
                    cyc.append((t2 - t0) / 1e9)
            return {"first": first, "touch": touch, "get": get, "cycle": cyc}
    return Getter


def run(quick=False, use_ray=True):
    res = Result(NAME, quick)
    size = 64 * MiB if quick else 256 * MiB
    warmup, reps = (20, 200) if quick else (100, 2000)
    tag = fmt_bytes(size)
    res.info.update(size=size, warmup=warmup, reps=reps)
    note(f"get: {tag} array, in another process; {reps} timed gets after {warmup} warm-up")

    arr = make_random(size, seed=99)
    name = store_name("get")
    with temp_store("get", name=name, capacity=size + 64 * MiB) as s:
        ref = s.put(arr)
        ext = object_extents(s, ref)
        res.info["extents"] = ext
        note(f"object extents (page runs = VMAs per view): {ext}")
        if ext is not None and ext > 1:
            res.finding(f"a {tag} put into a fresh store is {ext} page runs, not 1: every "
                        f"get maps {ext} VMAs (mmap MAP_FIXED each) instead of returning a "
                        "pointer into the pool mapping")
        with ShmSegments() as segs:
            seg = segs.create(size)
            dst = np.ndarray(arr.shape, arr.dtype, buffer=seg.buf)
            np.copyto(dst, arr)
            del dst
            both = _run_child(_child, (name, pickle.dumps(ref), seg.name, arr.shape,
                                       arr.dtype.str, warmup, reps))
        ours, shm = both["ours"], both["shm"]
        if ours["checksum"] != _touch_pages(arr):
            res.finding("the array read in the other process differs from what was put")
        if not both.get("readonly_ndarray"):
            res.finding("get in another process did not return a read-only numpy array")
        s.delete(ref)
        del ref

    ray = ray_or_none(use_ray)
    rr = None
    if ray is not None:
        ref = ray.put(arr)
        getter = _ray_actor_class(ray).remote()
        rr = ray.get(getter.time_get.remote([ref], warmup, reps // 2), timeout=300)
        ray.kill(getter)
        del ref
    del arr

    m = {k: median(v["cycle"]) for k, v in (("ours", ours), ("shm", shm), ("ray", rr)) if v}
    g = {k: median(v["get"]) for k, v in (("ours", ours), ("shm", shm), ("ray", rr)) if v}
    def brief(d):
        if not d:
            return d
        out = {k: v for k, v in d.items() if not isinstance(v, list)}
        for k in ("get", "cycle"):
            xs = sorted(d[k])
            out[k + "_median"] = median(xs)
            out[k + "_p10_p90"] = (xs[len(xs) // 10], xs[len(xs) * 9 // 10])
            out[k + "_n"] = len(xs)
        return out
    res.info["samples"] = {"ours": brief(ours), "shm": brief(shm), "ray": brief(rr)}
    res.row(f"first get {tag} (cold) vs shm first attach+view", ours["first"], shm["first"],
            "shm attach+view")
    if rr:
        res.row(f"first get {tag} (cold) vs ray first get", ours["first"], rr["first"],
                "ray.get first")
    res.row("first read of every page after first get (info)", ours["touch"], shm["touch"],
            "shm")
    if rr:
        res.row("first read of every page after first get (info)", ours["touch"], rr["touch"],
                "ray")
    res.row("warm get (median)", g["ours"], g["shm"], "shm attach+view")
    res.row("warm get+release (median)", m["ours"], m["shm"], "shm attach+view+close")
    if rr:
        res.row("warm get (median)", g["ours"], g["ray"], "ray.get")
        res.row("warm get+release (median)", m["ours"], m["ray"], "ray.get+del")
    res.print_detail()
    note(f"per-page first-read cost, ours: {ours['touch'] / (size // PAGE) * 1e6:.2f} us/page")

    res.target(f"get+release {tag} in another process", m["ours"], m["shm"],
               "shm attach+view+close", "s", "lower", "<= 50 us", m["ours"] <= 50e-6)
    if rr:
        res.target(f"get+release {tag} in another process", m["ours"], m["ray"],
                   "ray.get", "s", "lower", "<= 50 us", m["ours"] <= 50e-6)
    else:
        res.target(f"get+release {tag} vs ray.get", m["ours"], None, "", "s", "lower",
                   f"<= 50 us ({ray_skip_reason()}: skipped)", None)
    return res


if __name__ == "__main__":
    run_standalone(run)
