"""Shared helpers of the dedupshm benchmarks.

Conventions (why: docs/ARCHITECTURE.md, "Measured costs the design follows"):
  * time.perf_counter_ns, medians of several runs, warm-up iterations;
  * cold (fresh memory / fresh store) and warm (reused, already faulted
    memory) are reported separately;
  * every figure of ours is printed next to a peer's figure measured in
    the same run, with the ratio.  ``ratio`` is always "how many times
    better ours is" (> 1: ours is faster / has more throughput / uses less
    memory), so a target such as "0.8x Ray's throughput" reads ratio >= 0.8.
  * every store and shared_memory segment made here is removed, even when
    a benchmark fails (context managers plus an atexit sweep).
"""
import atexit
import contextlib
import glob
import itertools
import logging
import os
import statistics
import sys
import time

MiB = 1 << 20
GiB = 1 << 30
GB = 1e9          # throughputs are in GB/s = 1e9 bytes per second
PAGE = 4096

ns = time.perf_counter_ns

# ---------------------------------------------------------------------------
# numbers


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    """(min, max) as a cheap noise indicator."""
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def fmt_time(sec):
    if sec is None or sec != sec:
        return "-"
    if sec >= 1:
        return f"{sec:.3f} s"
    if sec >= 1e-3:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec * 1e6:.1f} us"


def fmt_bytes(n):
    if n is None:
        return "-"
    if abs(n) >= GiB:
        return f"{n / GiB:.3f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.2f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def fmt_rate(bps):
    if bps is None or bps != bps:
        return "-"
    return f"{bps / GB:.2f} GB/s"


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return fmt_time(v)
    if unit == "B/s":
        return fmt_rate(v)
    if unit == "B":
        return fmt_bytes(v)
    return f"{v:.3g} {unit}".strip()


def fmt_ratio(r):
    if r is None or r != r:
        return "-"
    return f"{r:.2f}x"


# ---------------------------------------------------------------------------
# output


def print_table(title, header, rows):
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    print()
    print(f"== {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def note(msg):
    print(f"   {msg}")
    sys.stdout.flush()


class Result:
    """What one benchmark produced: a detail table and summary rows."""

    def __init__(self, name, quick):
        self.name = name
        self.quick = quick
        self.rows = []        # detail rows (dicts)
        self.summary = []     # summary rows (dicts)
        self.notes = []       # findings worth reading
        self.info = {}

    def row(self, what, ours=None, peer=None, peer_name="", unit="s",
            better="lower", samples=None, **extra):
        """One detail line.  better: 'lower' (times, bytes) or 'higher'
        (throughput)."""
        r = {"what": what, "ours": ours, "peer": peer, "peer_name": peer_name,
             "unit": unit, "ratio": ratio(ours, peer, better), "samples": samples}
        r.update(extra)
        self.rows.append(r)
        return r

    def target(self, what, ours, peer, peer_name, unit, better, target_desc,
               met):
        """A summary row.  met: True/False, or None when it cannot be judged
        (peer missing)."""
        r = {"benchmark": f"{self.name}: {what}", "ours": ours, "peer": peer,
             "peer_name": peer_name, "unit": unit,
             "ratio": ratio(ours, peer, better), "target": target_desc,
             "met": met}
        self.summary.append(r)
        return r

    def finding(self, msg):
        self.notes.append(msg)
        note("FINDING: " + msg)

    def print_detail(self):
        rows = []
        for r in self.rows:
            rows.append([r["what"], fmt_value(r["ours"], r["unit"]),
                         (r["peer_name"] or "-"), fmt_value(r["peer"], r["unit"]),
                         fmt_ratio(r["ratio"])])
        print_table(f"{self.name}" + (" (quick)" if self.quick else ""),
                    ["measurement", "ours", "peer", "peer figure", "ratio (>1: ours better)"],
                    rows)

    def to_json(self):
        return {"name": self.name, "quick": self.quick, "rows": self.rows,
                "summary": self.summary, "notes": self.notes, "info": self.info}


def ratio(ours, peer, better):
    if ours is None or peer is None:
        return None
    try:
        if better == "higher":
            return ours / peer if peer else None
        return peer / ours if ours else None
    except (TypeError, ZeroDivisionError):
        return None


def print_summary(summary_rows):
    rows = []
    for r in summary_rows:
        met = {True: "yes", False: "NO", None: "n/a"}[r["met"]]
        rows.append([r["benchmark"], fmt_value(r["ours"], r["unit"]),
                     f"{r['peer_name']}: {fmt_value(r['peer'], r['unit'])}" if r["peer_name"] else "-",
                     fmt_ratio(r["ratio"]), r["target"], met])
    print_table("SUMMARY (ratio > 1: ours better; same run, same machine)",
                ["benchmark", "ours", "peer", "ratio", "target", "met"], rows)


# ---------------------------------------------------------------------------
# machine state


def meminfo(field="Shmem"):
    """A /proc/meminfo field in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def allocated_bytes(paths):
    """Memory actually allocated to files (tmpfs: st_blocks), missing = 0."""
    total = 0
    for p in paths:
        try:
            total += os.stat(p).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def store_files(name, directory=None):
    return _store_files(name, directory)


def touch(arr):
    """Fault in every page of a numpy array (writes one byte per page)."""
    import numpy as np
    flat = arr.reshape(-1).view(np.uint8)
    flat[::PAGE] = flat[::PAGE]


def make_random(nbytes, seed=1234):
    """A warm (faulted-in) random uint64 array of nbytes."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**63 - 1, size=nbytes // 8, dtype=np.uint64)


def perturb(arr, counter):
    """Make every 4 KiB page of arr different from any earlier content
    (one 8-byte word per page), so a following put is a unique put."""
    import numpy as np
    w = arr.reshape(-1).view(np.uint64)
    w[::PAGE // 8] = np.uint64(counter * 0x9E3779B97F4A7C15 % (1 << 64))


# ---------------------------------------------------------------------------
# stores (always removed)

_RUN_TAG = f"bench{os.getpid()}"
_counter = itertools.count()
_made = []


def store_name(kind):
    return f"{_RUN_TAG}-{kind}-{next(_counter)}"


def _store_files(name, directory=None):
    d = directory or "/dev/shm"
    return [os.path.join(d, f"dedupshm.{name}.index"), os.path.join(d, f"dedupshm.{name}.pool")]


def remove_store_files(name, directory=None):
    for p in _store_files(name, directory):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


@contextlib.contextmanager
def temp_store(kind, name=None, **kw):
    """A fresh store that is unlinked and closed whatever happens."""
    import dedupshm
    name = name or store_name(kind)
    _made.append((name, kw.get("directory")))
    store = None
    try:
        store = dedupshm.Store(name, create=True, **kw)
        yield store
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                store.unlink()
            with contextlib.suppress(Exception):
                store.close()
        remove_store_files(name, kw.get("directory"))


@atexit.register
def _sweep():
    for name, d in _made:
        remove_store_files(name, d)
    for p in glob.glob(f"/dev/shm/dedupshm.{_RUN_TAG}-*"):
        with contextlib.suppress(OSError):
            os.unlink(p)


class ShmSegments:
    """multiprocessing.shared_memory segments that are always unlinked."""

    def __init__(self):
        self.segs = []

    def create(self, size):
        from multiprocessing import shared_memory
        s = shared_memory.SharedMemory(create=True, size=size)
        self.segs.append(s)
        return s

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in self.segs:
            with contextlib.suppress(Exception):
                s.close()
            with contextlib.suppress(Exception):
                s.unlink()
        self.segs = []


# ---------------------------------------------------------------------------
# Ray (optional peer)

_ray = None
_ray_state = None      # None: not tried; "ok"; or a reason string


def ray_or_none(enabled=True):
    """The initialised ray module, or None (prints why once)."""
    global _ray, _ray_state
    if not enabled:
        if _ray_state is None:
            _ray_state = "disabled (--no-ray)"
            note("ray disabled: skipped")
        return None
    if _ray_state == "ok":
        return _ray
    if _ray_state is not None:
        return None
    try:
        import ray
    except ImportError:
        _ray_state = "ray not installed"
        note("ray not installed: skipped")
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = ns()
    try:
        ray.init(num_cpus=1, object_store_memory=2 << 30, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True)
    except Exception as e:  # noqa: BLE001 - any start-up failure means "no peer"
        _ray_state = f"ray failed to start: {e!r}"
        note(_ray_state + ": skipped")
        return None
    note(f"ray {ray.__version__} started in {(ns() - t0) / 1e9:.1f} s")
    _ray, _ray_state = ray, "ok"
    return ray


def ray_status():
    return _ray_state


def shutdown_ray():
    global _ray, _ray_state
    if _ray is not None:
        with contextlib.suppress(Exception):
            _ray.shutdown()
    _ray = None
    if _ray_state == "ok":
        _ray_state = "used (shut down)"


def ray_skip_reason():
    return _ray_state or "ray not installed"


def run_standalone(run):
    """python benchmarks/bench_x.py [--quick] [--no-ray]"""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ray", action="store_true")
    a = ap.parse_args()
    try:
        res = run(quick=a.quick, use_ray=not a.no_ray)
        print_summary(res.summary)
    finally:
        shutdown_ray()
