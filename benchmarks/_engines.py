"""Measuring the engine benchmarks (bench_dask, bench_joblib): the peak
memory of a process tree, from outside.

Host memory = the Pss_Anon + Pss_File of this process and all its
descendants (private pages, file pages split between their mappers) plus
the blocks of the /dev/shm files in play (our stores, joblib's memmapping
folders): exact, and unmoved by what other jobs on the machine do (unlike
/proc/meminfo's Shmem)."""
import glob
import os
import threading

# the process tree and its private memory, measured as bench_pool does
from bench_pool import Sampler, _descendants as descendants, _rollup as private_pss  # noqa: E402
from _common import allocated_bytes  # noqa: E402


def shm_bytes(patterns):
    """Blocks allocated to the files matching the glob patterns (recursively
    for directories)."""
    paths = []
    for pat in patterns:
        for p in glob.glob(pat):
            if os.path.isdir(p):
                paths += [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
            else:
                paths.append(p)
    return allocated_bytes(paths)


class PeakSampler(Sampler):
    """bench_pool's Sampler (runs until stop()), sampling every ``interval``
    s: the peak of the tree's private memory + the /dev/shm files matching
    ``patterns``, and the peak of the files alone.  ``store``: a dedupshm Store among those files; its freed
    pages kept warm for reuse (``warm_bytes``) are not counted as in use, so
    that reusing them shows as memory used (``peak_physical``: the peak of
    its ``physical_bytes``)."""

    def __init__(self, patterns, interval=0.02, store=None):
        threading.Thread.__init__(self, daemon=True)    # not Sampler's: no Shmem, no wchar
        self.patterns = list(patterns)
        self.interval = interval
        self.store = store
        self.ev = threading.Event()
        self.peak = self.peak_shm = self.peak_physical = 0
        self.sample()

    def sample(self):
        shm = shm_bytes(self.patterns)
        if self.store is not None:
            st = self.store.stats()
            shm -= st["warm_bytes"]
            self.peak_physical = max(self.peak_physical, st["physical_bytes"])
        tree = sum(private_pss(p) for p in descendants(os.getpid()))
        self.peak = max(self.peak, tree + shm)
        self.peak_shm = max(self.peak_shm, shm)
        return tree + shm
