"""A process pool whose tasks all receive the same large array.

With multiprocessing.Pool every task pickles the 64 MiB array through a
pipe and every worker unpickles a private copy.  dedupshm.pool.Pool puts it
into the store once; each task sends a reference of about a hundred bytes
and the workers read the one shared copy.  Results of at least 1 MiB come
back the same way (identical results are stored once).

    python examples/pool.py
"""
import multiprocessing
import os
import time

import numpy as np

import dedupshm
from dedupshm.pool import Pool


def task(args):
    data, i = args                       # data: the shared array, read-only
    k = (i % 4) << 18
    return data[k:k + (1 << 18)] * 2     # a 2 MiB result; 4 distinct ones


def main():
    data = np.random.default_rng(0).standard_normal(8 << 20)        # 64 MiB
    tasks = [(data, i) for i in range(16)]
    name = f"example-pool-{os.getpid()}"
    store = dedupshm.Store(name, create=True, capacity="1GiB")
    try:
        t0 = time.perf_counter()
        with Pool(2, store=store) as pool:
            ours = pool.map(task, tasks)
        t_ours = time.perf_counter() - t0
        st = store.stats()
        t0 = time.perf_counter()
        with multiprocessing.Pool(2) as pool:
            plain = pool.map(task, tasks)
        t_plain = time.perf_counter() - t0
        assert all((a == b).all() for a, b in zip(ours, plain))
        print(f"16 tasks x 64 MiB argument, 2 workers: dedupshm.pool.Pool {t_ours:.2f} s, "
              f"multiprocessing.Pool {t_plain:.2f} s")
        print(f"results held in the store: {st['logical_bytes'] >> 20} MiB logical in "
              f"{st['physical_bytes'] >> 20} MiB physical (16 results, 4 distinct)")
    finally:
        store.unlink()
        store.close()


if __name__ == "__main__":
    main()
