"""DataLoader workers over a big list of Python objects, without copies.

Four DataLoader workers read a dataset of 200,000 small dicts.  Held as a
plain list, every item a worker reads writes its reference counts, so the
pages it touches become the worker's private copies (pytorch #13246).  As
a dedupshm.SharedSequence, the items are pickled once into shared memory
and unpickled on access: the workers' private memory stays flat.

    python examples/dataloader.py          (needs torch: pip install '.[torch]')
"""
import importlib.util
import os
import re
import sys
import time

import dedupshm
from dedupshm.sequence import put_sequence


def uss(pid):
    """Private memory of a process (smaps_rollup), bytes."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        text = f.read()
    return sum(int(v) * 1024 for v in re.findall(r"^Private_\w+:\s+(\d+) kB", text, re.M))


def first_id(batch):
    return batch[0]["id"]


def peak_worker_uss(torch, dataset):
    """Iterate one shuffled epoch with 4 workers; the largest worker Uss seen."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=True, num_workers=4,
                                         collate_fn=first_id, multiprocessing_context="fork")
    it, peak, n = iter(loader), 0, 0
    for _ in it:
        n += 1
        if n % 20 == 0:
            peak = max([peak] + [uss(w.pid) for w in it._workers])
    return peak


def main():
    import torch
    torch.set_num_threads(1)
    items = [{"id": i, "name": f"sample-{i}", "label": i % 10, "tags": ["x", "y"]}
             for i in range(200_000)]
    store = dedupshm.Store(f"example-dl-{os.getpid()}", create=True, capacity="1GiB")
    try:
        t0 = time.perf_counter()
        plain = peak_worker_uss(torch, items)
        t1 = time.perf_counter()
        seq = store.get(put_sequence(store, items))      # or store.put_sequence(items)
        del items
        shared = peak_worker_uss(torch, seq)
        t2 = time.perf_counter()
        print("peak private memory (Uss) of a DataLoader worker, 200,000 dicts:")
        print(f"  plain list      {plain / 2**20:6.1f} MiB   (epoch {t1 - t0:.1f} s)")
        print(f"  SharedSequence  {shared / 2**20:6.1f} MiB   (put + epoch {t2 - t1:.1f} s, "
              f"{seq.nbytes / 2**20:.1f} MiB stored once)")
    finally:
        store.unlink()
        store.close()


if __name__ == "__main__":
    if importlib.util.find_spec("torch") is None:
        sys.exit("examples/dataloader.py needs torch, which is not installed: "
                 "pip install '.[torch]' (from the checkout; or pip install torch==2.13.0)")
    import warnings
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    main()
