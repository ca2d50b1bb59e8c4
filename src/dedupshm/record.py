"""Sampling a store over time: ``dedupshm record`` and ``dedupshm plot``.

A sample is ``store.stats()`` plus

* ``time``: wall clock (seconds since the epoch),
* ``elapsed``: seconds since the recording started (monotonic clock),
* ``store_file_bytes``: blocks the kernel has allocated to the store's two
  files -- in tmpfs (the default /dev/shm) exactly what the store adds to
  the kernel's ``Shmem`` figure,
* ``shmem_bytes``: the whole machine's ``Shmem`` (/proc/meminfo).

Records are CSV (``.csv``) or JSON lines (``.jsonl``/``.ndjson``/``.json``),
one sample per line, flushed as they are taken so that a recording cut
short is still readable.  Plotting needs matplotlib (``pip install
'dedupshm[plot]'``) and uses its Agg backend: no display needed.
"""
from __future__ import annotations

import csv
import json
import math
import os
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Callable, Optional

from .store import store_paths

if TYPE_CHECKING:
    from .store import Store

#: One sample: field name -> number (None where unknown).
Row = dict[str, Any]

FIRST_FIELDS = ("time", "elapsed")
KERNEL_FIELDS = ("store_file_bytes", "shmem_bytes")
_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def record_format(path: str) -> str:
    """'csv' or 'jsonl' from the file name's extension (ValueError otherwise)."""
    ext = os.path.splitext(path)[1].lower()
    try:
        return _FORMATS[ext]
    except KeyError:
        raise ValueError(f"cannot tell the format of {path!r}: name it .csv or .jsonl") from None


def meminfo_shmem() -> Optional[int]:
    """The machine's Shmem (/proc/meminfo) in bytes, None if unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Shmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def store_file_bytes(name: str, directory: Optional[str] = None) -> Optional[int]:
    """Bytes the file system has allocated to a store's files (None if gone)."""
    total, seen = 0, False
    for p in store_paths(name, directory):
        try:
            total += os.stat(p).st_blocks * 512
            seen = True
        except OSError:
            pass
    return total if seen else None


def sample(store: Store, t0: Optional[float] = None) -> Row:
    """One sample of ``store`` (a dict); ``t0`` is the monotonic start time."""
    now = time.monotonic()
    row: Row = {"time": time.time(), "elapsed": 0.0 if t0 is None else now - t0}
    row.update(store.stats())
    row["store_file_bytes"] = store_file_bytes(store.name, store.directory)
    row["shmem_bytes"] = meminfo_shmem()
    return row


def _fields(row: Row) -> list[str]:
    rest = [k for k in row if k not in FIRST_FIELDS and k not in KERNEL_FIELDS]
    return list(FIRST_FIELDS) + rest + list(KERNEL_FIELDS)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


class RecordWriter:
    """Appends samples to a CSV or JSON-lines file, one flushed line each."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.format = record_format(path)
        self._f = open(path, "w", newline="" if self.format == "csv" else None)
        self._csv: Optional[csv.DictWriter[str]] = None
        self.count = 0

    def write(self, row: Row) -> None:
        if self.format == "csv":
            if self._csv is None:
                self._csv = csv.DictWriter(self._f, fieldnames=_fields(row), extrasaction="ignore")
                self._csv.writeheader()
            self._csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
        else:
            self._f.write(json.dumps({k: _jsonable(row[k]) for k in _fields(row)}) + "\n")
        self._f.flush()
        self.count += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def record(store: Store, path: str, interval: float = 1.0, duration: Optional[float] = None,
           count: Optional[int] = None, stop: Optional[threading.Event] = None,
           on_sample: Optional[Callable[[Row], object]] = None) -> int:
    """Sample ``store`` into ``path`` every ``interval`` seconds, until
    ``duration`` seconds have passed, ``count`` samples were taken, or the
    ``stop`` event is set (whichever comes first; none: until interrupted).
    Samples are taken on a fixed schedule (no drift; slots missed while the
    machine was busy are skipped).  Returns the number of samples written."""
    if not interval > 0:
        raise ValueError("interval must be > 0")
    if duration is not None and duration < 0:
        raise ValueError("duration must be >= 0")
    if count is not None and count < 1:
        raise ValueError("count must be >= 1")
    stop = stop or threading.Event()
    t0 = time.monotonic()
    with RecordWriter(path) as w:
        k = 0
        while True:
            row = sample(store, t0)
            w.write(row)
            if on_sample is not None:
                on_sample(row)
            k += 1
            if count is not None and k >= count:
                break
            due = _next_slot(t0, interval)
            if duration is not None and due - t0 > duration + 1e-9:
                break
            if stop.wait(max(0.0, due - time.monotonic())):
                break
        return w.count


def _next_slot(t0: float, interval: float) -> float:
    """The next time t0 + k * interval still ahead (slots missed while a
    sample was slow are skipped, not caught up in a burst)."""
    return t0 + (int((time.monotonic() - t0) / interval + 1e-9) + 1) * interval


class Recorder:
    """``record()`` in a background thread: ``start()``, then ``stop()``,
    which takes one last sample so the record ends at the final state."""

    def __init__(self, store: Store, path: str, interval: float = 0.1) -> None:
        self.store, self.path, self.interval = store, path, interval
        record_format(path)                       # fail early on a bad name
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.count = 0
        self.error: Optional[Exception] = None

    def start(self) -> Recorder:
        self._t0 = time.monotonic()
        self._writer = RecordWriter(self.path)
        self._thread = threading.Thread(target=self._run, name="dedupshm-recorder", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                self._writer.write(sample(self.store, self._t0))
                due = _next_slot(self._t0, self.interval)
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    break
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self) -> int:
        self._stop.set()
        assert self._thread is not None, "stop() before start()"
        self._thread.join()
        try:
            if self.error is None:
                self._writer.write(sample(self.store, self._t0))
        finally:
            self.count = self._writer.count
            self._writer.close()
        if self.error is not None:
            raise self.error
        return self.count


# ---------------------------------------------------------------- reading

def _number(s: Any) -> Any:
    if s is None or s == "":
        return None
    if isinstance(s, (int, float)):
        return s
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)            # also 'inf'
    except ValueError:
        return s


def read_record(path: str) -> list[Row]:
    """The samples of a record file: a list of dicts of numbers."""
    fmt = record_format(path)
    rows: list[Row] = []
    with open(path, newline="" if fmt == "csv" else None) as f:
        if fmt == "csv":
            for r in csv.DictReader(f):
                rows.append({k: _number(v) for k, v in r.items()})
        else:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    # a recording killed mid-line: keep what came before
                    if not f.readline():
                        break
                    raise ValueError(f"{path}:{n}: not a JSON line") from None
                rows.append({k: _number(v) for k, v in r.items()})
    return rows


def rates(rows: list[Row], key: str, per: float = 1.0) -> tuple[list[float], list[float]]:
    """(times, per-second rate of the counter ``key``) between samples;
    a counter that went down (store re-created) gives no rate there."""
    ts: list[float] = []
    vs: list[float] = []
    for a, b in zip(rows, rows[1:]):
        dt = b["elapsed"] - a["elapsed"]
        if dt <= 0 or a.get(key) is None or b.get(key) is None:
            continue
        d = b[key] - a[key]
        ts.append(b["elapsed"])
        vs.append(d / dt * per if d >= 0 else float("nan"))
    return ts, vs


# ---------------------------------------------------------------- plotting

MiB = float(1 << 20)


def plot_record(rows: list[Row], out: Any, title: Optional[str] = None) -> Any:
    """Draw a record to a PNG: memory and what dedup saved, merger activity."""
    if not rows:
        raise ValueError("the record holds no samples")
    for k in ("elapsed", "logical_bytes", "physical_bytes"):
        if rows[0].get(k) is None:
            raise ValueError(f"the record has no {k!r} field: not a dedupshm record?")
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'dedupshm[plot]'") from None
    del matplotlib

    t = [r["elapsed"] for r in rows]

    def col(k: str, scale: float = 1.0) -> list[float]:
        return [float("nan") if r.get(k) is None else r[k] / scale for r in rows]

    logical, physical = col("logical_bytes", MiB), col("physical_bytes", MiB)
    files = col("store_file_bytes", MiB)
    have_files = any(v == v for v in files)

    merged = col("pages_merged")
    idle = (not any((v or 0) > 0 for v in merged)
            and not any((r.get("pages_scanned") or 0) > 0 for r in rows))

    if idle:      # nothing to draw for the merger: memory only, and say so
        fig = Figure(figsize=(8.5, 5.6), dpi=90, layout="constrained")
        FigureCanvasAgg(fig)
        ax_mem, ax_saved = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        axes: tuple[Any, ...] = (ax_mem, ax_saved)
    else:
        fig = Figure(figsize=(8.5, 9.0), dpi=90, layout="constrained")
        FigureCanvasAgg(fig)
        ax_mem, ax_saved, ax_merge, ax_cpu = fig.subplots(4, 1, sharex=True,
                                                           height_ratios=(3, 2, 2, 1.4))
        axes = (ax_mem, ax_saved, ax_merge, ax_cpu)
    fig.suptitle(title or "dedupshm store over time", fontsize=12)

    ax_mem.plot(t, logical, label="logical (what was put)", color="tab:blue", lw=2)
    ax_mem.plot(t, physical, label="physical (stored pages + packed values)", color="tab:green", lw=2)
    ax_mem.fill_between(t, physical, logical, color="tab:green", alpha=0.12, lw=0)
    if have_files:
        ax_mem.plot(t, files, label="store files' Shmem (kernel)", color="tab:orange", lw=1.2, ls="--")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title("memory", fontsize=10, loc="left")
    ax_mem.legend(loc="upper left", fontsize=8)
    ax_mem.set_ylim(bottom=0)

    merged_mib = [(v or 0) * 4096 / MiB for v in merged]
    saved_stats = [lg + mg - ph for lg, ph, mg in zip(logical, physical, merged_mib)]
    ax_saved.plot(t, saved_stats, color="tab:green", lw=2,
                  label="saved by dedup (logical − physical)" if idle else
                  "saved (logical + pages merged − physical)")
    if have_files:
        saved_kernel = [lg - fb for lg, fb in zip(logical, files)]
        ax_saved.plot(t, saved_kernel, label="Shmem saved (logical − store files' Shmem)",
                      color="tab:orange", lw=1.2, ls="--")
    if not idle:
        ax_saved.plot(t, merged_mib, label="by the merger (pages merged)", color="tab:purple", lw=1)
    whole = logical[-1] + merged_mib[-1]
    if whole > 0:
        pct = 100.0 * saved_stats[-1] / whole
        ax_saved.annotate(f"{saved_stats[-1]:,.1f} MiB saved at the end ({pct:.0f}%)",
                          xy=(0.99, 0.06), xycoords="axes fraction", ha="right", fontsize=8)
    ax_saved.set_ylabel("MiB")
    ax_saved.set_title("memory saved", fontsize=10, loc="left")
    ax_saved.legend(loc="upper left", fontsize=8)

    if idle:
        ax_saved.set_xlabel("seconds  (merger: no activity in this record)")
    else:
        st, scan = rates(rows, "pages_scanned")
        ct, cpu = rates(rows, "merger_cpu_seconds", per=100.0)
        ax_merge.plot(t, merged, label="pages merged", color="tab:purple", lw=2)
        ax_merge.set_ylabel("pages merged")
        ax_merge.set_ylim(bottom=0)
        ax_scan = ax_merge.twinx()
        ax_scan.plot(st, scan, label="pages scanned/s", color="tab:gray", lw=1)
        ax_scan.set_ylabel("pages scanned/s")
        ax_scan.set_ylim(bottom=0)
        h1, l1 = ax_merge.get_legend_handles_labels()
        h2, l2 = ax_scan.get_legend_handles_labels()
        ax_merge.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
        ax_merge.set_title("merger", fontsize=10, loc="left")
        ax_cpu.plot(ct, cpu, color="tab:red", lw=1)
        ax_cpu.set_ylabel("CPU %")
        ax_cpu.set_ylim(bottom=0)
        ax_cpu.set_title("merger CPU (% of one core, all processes)", fontsize=10, loc="left")
        ax_cpu.set_xlabel("seconds")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.savefig(out, format="png")
    return out
