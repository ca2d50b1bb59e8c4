"""Pre-fork server: gunicorn workers that each hold the same weights.

gunicorn serves examples/prefork.py's app on 127.0.0.1 (a free port) with
4 workers that each need the same 256 MiB of weights (--quick 64 MiB),
loaded from a .npy file; a bounded local loop sends 200 requests (urllib,
5 s timeouts), then the total Pss of the workers (and of the master) is
read from /proc/PID/smaps_rollup.  gunicorn is killed in every case.

Modes:
  none       the app without weights (same imports, store attached): the baseline
  none-preload  the same with --preload: the baseline of preload (imports shared too)
  plain      each worker np.load()s its own copy (the peer)
  preload    --preload: the master loads, workers share its pages copy-on-write (the peer)
  store      dedupshm.server.shared_load: one worker loads into the store, all map it
  mergeable  dedupshm.server.load_mergeable: each worker loads a private copy
             into mergeable memory; the merger folds them (time to 90% merged shown)

Target: with dedupshm (store), the workers' total Pss <= 1.1 x one copy + baseline.

    python benchmarks/bench_prefork.py [--quick]
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from _common import fmt_bytes, print_table  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    try:
        import gunicorn  # noqa: F401 - only: is it installed?
    except ImportError:
        print("gunicorn not installed (pip install gunicorn): skipped")
        return
    import prefork
    mib = 64 if a.quick else 256
    res = {}
    for mode in ("none", "none-preload", "plain", "preload", "store", "mergeable"):
        res[mode] = prefork.run(mode, mib=mib, workers=a.workers, requests=a.requests)
    base = res["none"]["workers_pss"]
    total = lambda r: r["workers_pss"] + r["master_pss"]  # noqa: E731
    one = mib << 20
    rows = []
    for mode, r in res.items():
        b = res["none-preload" if "preload" in mode else "none"]
        copies = (total(r) - total(b)) / one
        rows.append([mode, fmt_bytes(r["workers_pss"]), fmt_bytes(r["master_pss"]),
                     f"{copies:.2f}" if not mode.startswith("none") else "-",
                     fmt_bytes(r["store_physical"]),
                     f"{r['load_s']:.1f} s", f"{r['requests'] / r['requests_s']:.0f}/s",
                     r["pids_answering"],
                     f"{r['merge_s']:.1f} s" if r["merge_s"] is not None else "-"])
    print_table(f"gunicorn, {a.workers} workers, {mib} MiB of weights each, {a.requests} requests",
                ["mode", "workers' Pss", "master Pss", "copies above baseline*", "store physical",
                 "start+load", "requests", "workers answering", "merge time"], rows)
    print("   * (master + workers' Pss - the same for the baseline without weights) / one copy;"
          " preload modes against the preload baseline")
    for peer in ("plain", "preload"):
        b = res["none-preload" if peer == "preload" else "none"]
        print(f"   {peer} / store, master + workers' Pss above baseline: "
              f"{(total(res[peer]) - total(b)) / max(total(res['store']) - total(res['none']), 1):.2f}x")
    target = base + 1.1 * one
    got = res["store"]["workers_pss"]
    print(f"   TARGET store: workers' Pss {fmt_bytes(got)} <= baseline + 1.1 copies "
          f"{fmt_bytes(target)} -> {'met' if got <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
