"""The ``dedupshm`` command: demo, stats, ls, rm, gc."""
import argparse
import json
import os
import sys

from .store import DEFAULT_DIRECTORY, Store, store_paths

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


def human_bytes(n):
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt(value, is_bytes):
    if is_bytes:
        return human_bytes(value)
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.2f}"
    return f"{value:,}"


def _table(rows, out):
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        out.write(f"{label:<{width}}  {value:>14}\n")


def _json_safe(d):
    return {k: (str(v) if isinstance(v, float) and v == float("inf") else v) for k, v in d.items()}


def cmd_stats(args, out):
    with Store(args.name, directory=args.directory) as st:
        s = st.stats()
    if args.json:
        out.write(json.dumps(_json_safe(s), indent=2, sort_keys=True) + "\n")
        return 0
    out.write(f"store {args.name} ({args.directory or DEFAULT_DIRECTORY})\n")
    _table([(label, _fmt(s[k], b)) for k, label, b in _STAT_ORDER if k in s], out)
    return 0


def cmd_ls(args, out):
    with Store(args.name, directory=args.directory) as st:
        items = sorted(st.items_sizes(), key=lambda kv: (-kv[1], repr(kv[0])))
    if args.json:
        out.write(json.dumps([{"key": k if isinstance(k, str) else k.hex(), "bytes": n}
                              for k, n in items], indent=2) + "\n")
        return 0
    if not items:
        out.write("(no keys)\n")
        return 0
    out.write(f"{'SIZE':>12}  KEY\n")
    for k, n in items:
        out.write(f"{human_bytes(n):>12}  {k!r}\n" if not isinstance(k, str) else f"{human_bytes(n):>12}  {k}\n")
    out.write(f"{len(items)} keys, {human_bytes(sum(n for _, n in items))} logical\n")
    return 0


def cmd_rm(args, out):
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


def cmd_gc(args, out):
    with Store(args.name, directory=args.directory) as st:
        r = st.gc()
    if args.json:
        out.write(json.dumps(r, indent=2, sort_keys=True) + "\n")
    else:
        _table([(k.replace("_", " "), f"{v:,}") for k, v in sorted(r.items())], out)
    return 0


def cmd_demo(args, out):
    from .demo import run_demo
    return run_demo(workers=args.workers, mib=args.mib, out=out, keep=args.keep)


def build_parser():
    p = argparse.ArgumentParser(prog="dedupshm", description="deduplicating shared-memory object store")
    p.add_argument("--directory", default=None, help=f"where stores live (default {DEFAULT_DIRECTORY})")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="worker processes put overlapping data; show what dedup saved")
    d.add_argument("--workers", type=int, default=4)
    d.add_argument("--mib", type=int, default=64, help="size of the data each worker shares")
    d.add_argument("--keep", action="store_true", help="leave the demo store in place")
    d.set_defaults(fn=cmd_demo)
    for name, fn, helptext in (("stats", cmd_stats, "counters of a store"),
                               ("ls", cmd_ls, "keys of a store with their sizes"),
                               ("gc", cmd_gc, "reclaim what dead processes left")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("name")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(fn=fn)
    r = sub.add_parser("rm", help="remove a store's files")
    r.add_argument("name")
    r.set_defaults(fn=cmd_rm)
    return p


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        return args.fn(args, out)
    except FileNotFoundError:
        sys.stderr.write(f"dedupshm: no store named {getattr(args, 'name', '?')!r}\n")
        return 1
    except (ValueError, PermissionError) as e:
        sys.stderr.write(f"dedupshm: {e}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
