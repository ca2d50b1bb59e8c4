"""The ``dedupshm`` command: demo, stats, ls, rm, gc; top, record, plot,
serve-metrics; put, get."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from types import FrameType
from typing import IO, Any, Iterable, Optional, Sequence

from ._format import human_bytes  # noqa: F401 - public here too
from .errors import CorruptStoreError, DedupShmError, IncompatibleStoreError
from .store import DEFAULT_DIRECTORY, Key, Store, store_paths

_STAT_ORDER = [
    ("objects", "objects", False), ("keys", "keys", False),
    ("logical_bytes", "logical", True), ("physical_bytes", "physical", True),
    ("dedup_ratio", "dedup ratio", False), ("metadata_bytes", "metadata", True),
    ("capacity", "capacity", True), ("pages_used", "pages used", False),
    ("pages_shared", "pages shared", False), ("pages_sharing", "pages sharing", False),
    ("pages_zero", "zero pages (free)", False), ("pages_free_warm", "warm free pages", False),
    ("small_bytes", "packed small values", True), ("clients", "attached processes", False),
    ("handles", "references held", False), ("gc_runs", "gc runs", False),
    ("reaped_clients", "dead processes reaped", False), ("recoveries", "lock recoveries", False),
]


def _fmt(value: Any, is_bytes: bool) -> str:
    if is_bytes:
        return human_bytes(value)
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.2f}"
    return f"{value:,}"


def _table(rows: Sequence[tuple[str, str]], out: IO[str]) -> None:
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        out.write(f"{label:<{width}}  {value:>14}\n")


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, float) and v == float("inf") else v) for k, v in d.items()}


def cmd_stats(args: argparse.Namespace, out: IO[str]) -> int:
    with Store(args.name, directory=args.directory) as st:
        s = st.stats()
        # this command attaches to read: it is not one of the store's users
        if "clients" in s and any(c["pid"] == os.getpid() for c in st.clients()):
            s["clients"] -= 1
    if args.json:
        out.write(json.dumps(_json_safe(s), indent=2, sort_keys=True) + "\n")
        return 0
    out.write(f"store {args.name} ({args.directory or DEFAULT_DIRECTORY})\n")
    _table([(label, _fmt(s[k], b)) for k, label, b in _STAT_ORDER if k in s], out)
    return 0


def _ls_key(k: Key) -> str:
    return k if isinstance(k, str) else k.hex()


def cmd_ls(args: argparse.Namespace, out: IO[str]) -> int:
    """Streams: keys come in the store's walk order, a batch at a time,
    in constant memory however many there are (--sort collects them all
    to order by size)."""
    with Store(args.name, directory=args.directory) as st:
        items: Iterable[tuple[Key, int]] = st.scan()
        if getattr(args, "sort", False):
            items = sorted(items, key=lambda kv: (-kv[1], repr(kv[0])))
        if args.json:
            out.write("[")
            for i, (k, n) in enumerate(items):
                out.write(("," if i else "") + "\n  " +
                          json.dumps({"key": _ls_key(k), "bytes": n}))
            out.write("\n]\n")
            return 0
        count = total = 0
        for k, n in items:
            if not count:
                out.write(f"{'SIZE':>12}  KEY\n")
            out.write(f"{human_bytes(n):>12}  {k if isinstance(k, str) else repr(k)}\n")
            count += 1
            total += n
    out.write(f"{count} keys, {human_bytes(total)} logical\n" if count else "(no keys)\n")
    return 0


def cmd_rm(args: argparse.Namespace, out: IO[str]) -> int:
    found = False
    for p in store_paths(args.name, args.directory):
        try:
            os.unlink(p)
            found = True
        except FileNotFoundError:
            pass
    if not found:
        sys.stderr.write(f"dedupshm: no store named {args.name!r}\n")
        return 1
    out.write(f"removed store {args.name}\n")
    return 0


def cmd_gc(args: argparse.Namespace, out: IO[str]) -> int:
    with Store(args.name, directory=args.directory) as st:
        r = st.gc()
    if args.json:
        out.write(json.dumps(r, indent=2, sort_keys=True) + "\n")
    else:
        _table([(k.replace("_", " "), f"{v:,}") for k, v in sorted(r.items())], out)
    return 0


def cmd_check(args: argparse.Namespace, out: IO[str]) -> int:
    with Store(args.name, directory=args.directory) as st:
        st.gc()
        rep = st.check()
    if args.json:
        out.write(json.dumps({"ok": rep.ok, "errors": rep.errors, "objects": rep.objects,
                              "pages": rep.pages, "bytes_checked": rep.bytes_checked}, indent=2) + "\n")
    else:
        for e in rep.errors:
            out.write(f"error: {e}\n")
        out.write(f"{'ok' if rep.ok else f'{len(rep.errors)} problems'}: {rep.objects:,} objects, "
                  f"{rep.pages:,} pages, {human_bytes(rep.bytes_checked)} re-hashed\n")
    return 0 if rep.ok else 3


def cmd_demo(args: argparse.Namespace, out: IO[str]) -> int:
    from .demo import run_demo
    if args.record:
        from .record import record_format
        record_format(args.record)
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.record))):
            sys.stderr.write(f"dedupshm: cannot write {args.record}: no such directory\n")
            return 1
    return run_demo(workers=args.workers, mib=args.mib, out=out, keep=args.keep,
                    record=args.record)


# ---------------------------------------------------------------- watching a store

def cmd_top(args: argparse.Namespace, out: IO[str]) -> int:
    from .live import run_top
    with Store(args.name, directory=args.directory) as st:
        return run_top(st, args.name, args.directory, interval=args.interval, once=args.once,
                       out=out)


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def cmd_record(args: argparse.Namespace, out: IO[str]) -> int:
    import signal

    from .record import record, record_format
    record_format(args.out)                          # a bad name fails before anything
    if not args.interval > 0:
        raise ValueError("--interval must be > 0")
    with Store(args.name, directory=args.directory) as st:
        old = signal.signal(signal.SIGTERM, _terminate)
        taken = 0

        def counted(row: dict[str, Any]) -> None:
            nonlocal taken
            taken += 1
        try:
            record(st, args.out, interval=args.interval, duration=args.duration,
                   count=args.count, on_sample=counted)
        except KeyboardInterrupt:                    # Ctrl-C / SIGTERM end a recording
            pass
        except OSError as e:
            sys.stderr.write(f"dedupshm: cannot write {args.out}: {e.strerror or e}\n")
            return 1
        finally:
            signal.signal(signal.SIGTERM, old)
    out.write(f"recorded {taken} samples of store {args.name} to {args.out}\n")
    return 0


def cmd_plot(args: argparse.Namespace, out: IO[str]) -> int:
    from .record import plot_record, read_record
    try:
        rows = read_record(args.file)
    except OSError as e:
        sys.stderr.write(f"dedupshm: cannot read {args.file}: {e.strerror or e}\n")
        return 1
    try:
        plot_record(rows, args.out, title=args.title)
    except RuntimeError as e:                        # matplotlib missing
        sys.stderr.write(f"dedupshm: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"dedupshm: cannot write {args.out}: {e.strerror or e}\n")
        return 1
    out.write(f"plotted {len(rows)} samples to {args.out}\n")
    return 0


def cmd_serve_metrics(args: argparse.Namespace, out: IO[str]) -> int:
    from .metrics import serve
    if not 0 <= args.port <= 65535:
        raise ValueError("--port must be in 0..65535")
    stores = []
    try:
        for name in args.name:
            stores.append(Store(name, directory=args.directory))
        try:
            return serve(stores, host=args.host, port=args.port, out=out)
        except OSError as e:
            sys.stderr.write(f"dedupshm: cannot serve on {args.host}:{args.port}: "
                             f"{e.strerror or e}\n")
            return 1
    finally:
        for st in stores:
            st.close()


# ---------------------------------------------------------------- files in and out

#: Transfers at least this large show a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = 8 << 20
_CHUNK = 8 << 20
#: Files up to this size are read whole and put (small values are packed, not paged).
_SMALL_FILE = 1 << 20


def _progress(total: int, verb: str) -> Any:
    """A rich progress bar on stderr for a transfer of ``total`` bytes, or a
    stand-in that shows nothing (stderr not a terminal, or a small transfer)."""
    import contextlib
    if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        class _Silent:
            def add_task(self, *a: Any, **k: Any) -> int:
                return 0

            def update(self, *a: Any, **k: Any) -> None:
                pass
        return contextlib.nullcontext(_Silent())
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    return Progress(TextColumn("{task.description:<8}"), BarColumn(), DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


def cmd_put(args: argparse.Namespace, out: IO[str]) -> int:
    try:
        return _put(args, out)
    except DedupShmError as e:                       # e.g. the store is full
        sys.stderr.write(f"dedupshm: cannot store {args.key!r}: {e}\n")
        return 1


def _put(args: argparse.Namespace, out: IO[str]) -> int:
    key = args.key
    try:
        f = sys.stdin.buffer if args.file == "-" else open(args.file, "rb", buffering=0)
    except OSError as e:
        sys.stderr.write(f"dedupshm: cannot read {args.file}: {e.strerror or e}\n")
        return 1
    with f, Store(args.name, directory=args.directory) as st:
        before = st.stats()["physical_bytes"]
        fst = os.fstat(f.fileno())
        import stat as stat_
        if not stat_.S_ISREG(fst.st_mode) or fst.st_size <= _SMALL_FILE:
            data = f.read()                          # a pipe (size unknown), or small:
            st.put(data, key=key)                    # put packs small values together
            size = len(data)
        else:
            size = fst.st_size
            with _progress(size, "put") as prog:
                task = prog.add_task("reading", total=size)
                with st.create(key, size) as buf:
                    done = 0
                    while done < size:
                        n = f.readinto(buf[done:min(size, done + _CHUNK)])  # type: ignore[union-attr]
                        if not n:
                            raise ValueError(f"{args.file} shrank while it was read "
                                             f"({done:,} of {size:,} bytes)")
                        done += n
                        prog.update(task, completed=done)
                    prog.update(task, description="sealing")
                prog.update(task, description="stored")
        grew = st.stats()["physical_bytes"] - before
    out.write(f"stored {key!r}: {human_bytes(size)}; the store grew by {human_bytes(max(grew, 0))}\n")
    return 0


def cmd_get(args: argparse.Namespace, out: IO[str]) -> int:
    import numpy as np
    with Store(args.name, directory=args.directory) as st:
        try:
            value = st.get(args.key)
        except KeyError:
            sys.stderr.write(f"dedupshm: no key {args.key!r} in store {args.name}\n")
            return 1
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        try:
            mv = memoryview(value).cast("B")
        except TypeError:
            sys.stderr.write(f"dedupshm: the value of {args.key!r} is a {type(value).__name__}, "
                             "not bytes or an array; read it with the Python API\n")
            return 1
        size = mv.nbytes
        if args.out == "-":
            target, tmp = sys.stdout.buffer, None
        else:
            d = os.path.dirname(os.path.abspath(args.out))
            try:
                # a fresh name, created exclusively: a predictable one in a
                # shared directory could be a planted symlink to another file
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(args.out)}.",
                                           suffix=".dedupshm", dir=d)
                mask = os.umask(0)
                os.umask(mask)
                os.fchmod(fd, 0o666 & ~mask)             # what open() would have made
                target = os.fdopen(fd, "wb")
            except OSError as e:
                sys.stderr.write(f"dedupshm: cannot write {args.out}: {e.strerror or e}\n")
                return 1
        try:
            with _progress(size, "get") as prog:
                task = prog.add_task("writing", total=size)
                for off in range(0, size, _CHUNK):
                    target.write(mv[off:off + _CHUNK])
                    prog.update(task, completed=min(size, off + _CHUNK))
                target.flush()
            if tmp is not None:
                target.close()
                os.replace(tmp, args.out)
                tmp = None
        except BrokenPipeError:
            return 1
        finally:
            if tmp is not None:
                target.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        del mv, value
    if args.out != "-":
        out.write(f"wrote {args.key!r} ({human_bytes(size)}) to {args.out}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dedupshm", description="deduplicating shared-memory object store")
    dir_help = f"where stores live (default {DEFAULT_DIRECTORY})"
    p.add_argument("--directory", default=None, help=dir_help)
    # --directory after the command as well (SUPPRESS: absent there, the
    # global one, given or not, stands)
    with_dir = argparse.ArgumentParser(add_help=False)
    with_dir.add_argument("--directory", default=argparse.SUPPRESS, help=dir_help)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name: str, *, directory: bool = True, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[with_dir] if directory else [], **kw)
    sub.add_parser = add_parser  # type: ignore[method-assign]
    d = sub.add_parser("demo", directory=False, help="worker processes put overlapping data; show what dedup saved")
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--mib", type=int, default=64, help="size of the data each worker shares")
    d.add_argument("--keep", action="store_true", help="leave the demo store in place")
    d.add_argument("--record", metavar="FILE", default=None,
                   help="sample the store's stats into FILE (.csv or .jsonl) while the workers run")
    d.set_defaults(fn=cmd_demo)
    for name, fn, helptext in (("stats", cmd_stats, "counters of a store"),
                               ("ls", cmd_ls, "keys of a store with their sizes"),
                               ("gc", cmd_gc, "reclaim what dead processes left"),
                               ("check", cmd_check, "gc, then check every invariant of a store")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("name")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "ls":
            c.add_argument("--sort", action="store_true",
                           help="largest first (holds every key in memory; without it "
                                "ls streams in constant memory)")
        c.set_defaults(fn=fn)
    r = sub.add_parser("rm", help="remove a store's files")
    r.add_argument("name")
    r.set_defaults(fn=cmd_rm)

    t = sub.add_parser("top", help="live view of a store (q quits)")
    t.add_argument("name")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.set_defaults(fn=cmd_top)
    rec = sub.add_parser("record", help="sample a store's stats into CSV or JSON lines")
    rec.add_argument("name")
    rec.add_argument("--out", required=True, metavar="FILE", help="FILE.csv or FILE.jsonl")
    rec.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    until = rec.add_mutually_exclusive_group()
    until.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    until.add_argument("--count", type=int, metavar="N", help="stop after N samples")
    rec.set_defaults(fn=cmd_record)
    pl = sub.add_parser("plot", directory=False, help="draw a record (needs matplotlib: dedupshm[plot])")
    pl.add_argument("file", help="a record written by `dedupshm record` or `demo --record`")
    pl.add_argument("--out", required=True, metavar="PNG")
    pl.add_argument("--title", default=None)
    pl.set_defaults(fn=cmd_plot)
    sm = sub.add_parser("serve-metrics", help="Prometheus endpoint for stores' stats")
    sm.add_argument("name", nargs="+")
    sm.add_argument("--port", type=int, default=9464, help="TCP port (default 9464; 0: any free port)")
    sm.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sm.set_defaults(fn=cmd_serve_metrics)
    pu = sub.add_parser("put", help="store a file's bytes under a key")
    pu.add_argument("name")
    pu.add_argument("key")
    pu.add_argument("file", help="a file, or - for standard input")
    pu.set_defaults(fn=cmd_put)
    g = sub.add_parser("get", help="write the bytes stored under a key to a file")
    g.add_argument("name")
    g.add_argument("key")
    g.add_argument("--out", default="-", metavar="FILE", help="where to write (default -: stdout)")
    g.set_defaults(fn=cmd_get)
    return p


def main(argv: Optional[Sequence[str]] = None, out: Optional[IO[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    if args.cmd is None:                             # bare `dedupshm`: what it can do
        parser.print_help(out)
        return 0
    try:
        rc: int = args.fn(args, out)
        return rc
    except FileNotFoundError as e:
        name = getattr(args, "name", None)
        if name and e.filename and os.path.basename(str(e.filename)).startswith(f"dedupshm.{name}."):
            sys.stderr.write(f"dedupshm: no store named {name!r}\n")
        else:
            sys.stderr.write(f"dedupshm: {e}\n")
        return 1
    except (ValueError, PermissionError) as e:
        sys.stderr.write(f"dedupshm: {e}\n")
        return 2
    except CorruptStoreError as e:                   # incl. IncompatibleStoreError
        hint = "" if isinstance(e, IncompatibleStoreError) else " (not a dedupshm store?)"
        sys.stderr.write(f"dedupshm: {e}{hint}\n")
        return 1
    except (DedupShmError, OSError) as e:
        sys.stderr.write(f"dedupshm: {e}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
