"""Processes of a multiprocessing pool share one copy of a large array.

The parent puts a 64 MiB array into a store once; each worker receives only
the ObjectRef (a few dozen bytes through the pipe), reads the array
zero-copy, and puts back a result.  Identical results are stored once.

    python examples/share_arrays.py
"""
import multiprocessing as mp
import os

import numpy as np

import dedupshm


def work(args):
    store, ref, i = args
    arr = store.get(ref)                      # zero-copy, read-only
    assert not arr.flags.writeable
    result = np.full(1 << 18, arr[:1000].sum() > 0, dtype=np.float64)  # same for every task
    return i, float(arr[i]), store.put(result)


def main():
    name = f"example-{os.getpid()}"
    with dedupshm.Store(name, create=True, capacity="1GiB") as store:
        try:
            data = np.random.default_rng(0).standard_normal(8 << 20)   # 64 MiB
            ref = store.put(data)
            with mp.get_context("spawn").Pool(4) as pool:
                results = pool.map(work, [(store, ref, i) for i in range(16)])
            assert all(v == data[i] for i, v, _ in results)
            refs = [r for _, _, r in results]
            assert all((store.get(r) == store.get(refs[0])).all() for r in refs)
            s = store.stats()
            print(f"16 results of {8 * (1 << 18) >> 20} MiB each; store holds "
                  f"{s['logical_bytes'] >> 20} MiB logical in {s['physical_bytes'] >> 20} MiB physical "
                  f"(dedup ratio {s['dedup_ratio']:.1f})")
        finally:
            store.unlink()


if __name__ == "__main__":
    main()
