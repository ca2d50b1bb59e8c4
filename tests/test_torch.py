"""dedupshm.torch with real DataLoader workers: the sample cache is filled
once for all workers and epochs, identical samples share pages, batches
travel through the store, and tensors map the store's pages without
warnings."""
import multiprocessing as mp
import os
import warnings

import pytest

torch = pytest.importorskip("torch")

from dedupshm.pool import Pool  # noqa: E402
from dedupshm.torch import (CachedDataset, StoreCollate, get_tensor,  # noqa: E402
                            put_tensor)
from helpers import in_store, wait_objects  # noqa: E402


pytestmark = pytest.mark.limit(60)

# the workers' start method ($DEDUPSHM_TEST_START_METHOD; CI runs
# forkserver too: the default on Linux from Python 3.14)
START = os.environ.get("DEDUPSHM_TEST_START_METHOD", "fork")


class Images(torch.utils.data.Dataset):
    """64 samples of 48 KiB; sample i equals sample i % 8.  Counts loads."""

    def __init__(self, counter):
        self.counter = counter

    def __len__(self):
        return 64

    def __getitem__(self, i):
        with self.counter.get_lock():
            self.counter.value += 1
        return {"x": torch.full((3, 64, 64), float(i % 8 + 1)), "y": i % 8, "i": i}


def test_put_get_tensor_zero_copy_no_warning(tstore):
    t = torch.arange(1 << 16, dtype=torch.float32)
    ref = put_tensor(tstore, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = get_tensor(tstore, ref)
    assert torch.equal(a, t) and in_store(a, tstore.name)
    a[0] = 99                       # private copy-on-write: stored value unchanged
    assert get_tensor(tstore, ref)[0] == 0
    bf = torch.linspace(0, 1, 5000).to(torch.bfloat16).requires_grad_(True)
    back = get_tensor(tstore, put_tensor(tstore, {"w": bf, "n": 3}))
    assert back["w"].dtype == torch.bfloat16 and back["w"].requires_grad
    assert torch.equal(back["w"].detach(), bf.detach()) and back["n"] == 3
    nc = torch.arange(12000.).reshape(100, 120).t()       # not contiguous
    assert torch.equal(get_tensor(tstore, put_tensor(tstore, nc)), nc)


def test_cached_dataset_shared_by_workers_and_epochs(tstore):
    counter = mp.get_context(START).Value("i", 0)
    ds = CachedDataset(Images(counter), tstore)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                         multiprocessing_context=START)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            seen = []
            for b in loader:
                seen += b["i"].tolist()
                assert torch.equal(b["x"][:, 0, 0, 0], (b["i"] % 8 + 1).float())
            assert sorted(seen) == list(range(64))
    assert counter.value == 64               # each sample decoded once, in all
    assert ds.cached() == 64
    st = tstore.stats()
    # 64 samples of 48 KiB, 8 distinct: stored about 8 times, not 64
    assert st["logical_bytes"] >= 64 * 48 << 10
    assert st["physical_bytes"] < 12 * 48 << 10
    s = ds[5]                                 # in this process: maps the cache
    assert in_store(s["x"], tstore.name) and s["y"] == 5
    del s, b
    ds.clear()
    assert ds.cached() == 0
    assert wait_objects(tstore, 0) == 0


class Plain(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((256, 64), float(i + 1)), i


def test_store_collate_batches_travel_through_store(tstore):
    loader = torch.utils.data.DataLoader(Plain(), batch_size=4, num_workers=2,
                                         multiprocessing_context=START,
                                         collate_fn=StoreCollate(tstore, min_nbytes=4096))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(loader)
    assert len(batches) == 8
    for k, (x, i) in enumerate(batches):
        assert in_store(x, tstore.name) and x.shape == (4, 256, 64)
        assert torch.equal(x[:, 0, 0], i.float() + 1) and i.tolist() == list(range(4 * k, 4 * k + 4))
    # in the main process (num_workers=0) it only collates
    x, i = next(iter(torch.utils.data.DataLoader(Plain(), batch_size=4,
                                                 collate_fn=StoreCollate(tstore))))
    assert not in_store(x, tstore.name)
    del batches, x
    assert wait_objects(tstore, 0) == 0


def double(t):
    return t * 2


def test_pool_moves_tensors(tstore):
    t = torch.ones(1 << 16)
    # forked children must not start OpenMP thread teams the parent's
    # libgomp state cannot run (the DataLoader does the same in its workers)
    with Pool(2, store=tstore, min_nbytes=4096, context=mp.get_context(START),
              initializer=torch.set_num_threads, initargs=(1,)) as pool:
        out = pool.map(double, [t, t])
    assert all(torch.equal(o, t * 2) and in_store(o, tstore.name) for o in out)
    del out
    assert wait_objects(tstore, 0) == 0
