"""Run every dedupshm benchmark and print a summary table.

    python benchmarks/run_all.py            full run (< 10 min)
    python benchmarks/run_all.py --quick    smoke run for CI (~2 min, merger ~50 s)
    options: --json [PATH]  write results (default benchmarks/results.json)
             --only NAME..  run some (memory merger fingerprint small keys put churn stall
                            get dask joblib)
             --no-ray       skip the Ray peer
             --strict       exit 1 when a target is missed

Every figure of ours is printed with a peer's figure from the same run and
the ratio (> 1: ours better).  Ray is an optional peer: when it is not
installed its rows say "ray not installed: skipped".  A benchmark that
crashes makes the exit status 1; a missed target does so only with
--strict (these machines are noisy; the figures are for reading).
"""
import argparse
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _common  # noqa: E402

# memory and merger first: they read the machine-wide Shmem counter, best
# before Ray's object store exists
ORDER = ["memory", "merger", "fingerprint", "small", "keys", "put", "churn", "stall", "get"]


def _modules():
    import bench_churn
    import bench_fingerprint
    import bench_get
    import bench_keys
    import bench_memory
    import bench_merger
    import bench_put
    import bench_small
    import bench_stall
    mods = {"memory": bench_memory, "merger": bench_merger, "fingerprint": bench_fingerprint,
            "small": bench_small, "keys": bench_keys, "put": bench_put, "churn": bench_churn,
            "stall": bench_stall, "get": bench_get}
    mods.update(_engine_modules())
    return mods


# ---- engines (dedupshm.dask, dedupshm.joblib): each skips itself, with a
# finding, when its engine is not installed
ENGINES = ["dask", "joblib"]
ORDER += ENGINES


def _engine_modules():
    import bench_dask
    import bench_joblib
    return {"dask": bench_dask, "joblib": bench_joblib}


def _versions():
    out = {"python": platform.python_version(), "kernel": platform.release(),
           "machine": platform.machine(), "cpus": os.cpu_count()}
    for mod in ("numpy", "dedupshm", "ray", "xxhash"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", getattr(m, "VERSION", "?"))
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fast smoke version (CI)")
    ap.add_argument("--json", nargs="?", const=os.path.join(HERE, "results.json"),
                    default=None, metavar="PATH", help="write results as JSON")
    ap.add_argument("--only", nargs="+", choices=ORDER, default=None)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray peer")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    a = ap.parse_args(argv)

    try:
        import dedupshm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"dedupshm is not importable: {e!r}", file=sys.stderr)
        return 1

    mods = _modules()
    names = [n for n in ORDER if a.only is None or n in a.only]
    t_start = time.monotonic()
    print(f"dedupshm benchmarks ({'quick' if a.quick else 'full'}): {', '.join(names)}")
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
          f"({os.cpu_count()} cpus; other load makes every figure noisy)")
    print("ratio = how many times better ours is (> 1: faster / more throughput / "
          "less memory); peers measured in the same run")
    results, errors = [], {}
    try:
        for n in names:
            t0 = time.monotonic()
            print(f"\n### {n}")
            sys.stdout.flush()
            try:
                res = mods[n].run(quick=a.quick, use_ray=not a.no_ray)
                results.append(res)
            except Exception:  # noqa: BLE001 - keep going, report at the end
                tb = traceback.format_exc()
                errors[n] = tb
                print(f"benchmark {n} FAILED:\n{tb}", file=sys.stderr)
            print(f"   ({n}: {time.monotonic() - t0:.1f} s)")
    finally:
        _common.shutdown_ray()

    summary = [r for res in results for r in res.summary]
    for n, tb in errors.items():
        summary.append({"benchmark": f"{n}: FAILED", "ours": None, "peer": None,
                        "peer_name": "", "unit": "s", "ratio": None,
                        "target": tb.strip().splitlines()[-1][:60], "met": False})
    _common.print_summary(summary)
    notes = [f"{res.name}: {m}" for res in results for m in res.notes]
    if notes:
        print("\nFindings:")
        for m in notes:
            print(f" - {m}")
    total = time.monotonic() - t_start
    load1 = os.getloadavg()
    print(f"\ntotal {total:.1f} s; ray: {_common.ray_status() or 'not used'}; "
          f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")

    if a.json:
        doc = {"quick": a.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "total_seconds": total, "versions": _versions(),
               "loadavg_start": load0, "loadavg_end": load1,
               "ray": _common.ray_status(), "summary": summary,
               "benchmarks": [r.to_json() for r in results], "errors": errors}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"results written to {a.json}")

    if errors:
        return 1
    if a.strict and any(r["met"] is False for r in summary):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
