"""Measuring the engine benchmarks (bench_dask, bench_joblib): the peak
memory of a process tree, from outside.

Host memory = the Pss_Anon + Pss_File of this process and all its
descendants (private pages, file pages split between their mappers) plus
the blocks of the /dev/shm files in play (our stores, joblib's memmapping
folders): exact, and unmoved by what other jobs on the machine do (unlike
/proc/meminfo's Shmem)."""
import glob
import os
import re
import threading

_FIELDS = re.compile(r"^(Pss_Anon|Pss_File):\s+(\d+) kB", re.M)


def descendants(root):
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
            ppid = int(s[s.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def private_pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            t = f.read()
    except OSError:
        return 0
    return sum(int(v) * 1024 for _, v in _FIELDS.findall(t))


def shm_bytes(patterns):
    """Blocks allocated to the files matching the glob patterns (recursively
    for directories)."""
    total = 0
    for pat in patterns:
        for p in glob.glob(pat):
            paths = [p]
            if os.path.isdir(p):
                paths = [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
            for q in paths:
                try:
                    total += os.stat(q).st_blocks * 512
                except OSError:
                    pass
    return total


class PeakSampler(threading.Thread):
    """Samples every ``interval`` s until stop(): peak of the tree's private
    memory + the /dev/shm files matching ``patterns``, and the peak of the
    files alone.  ``store``: a dedupshm Store among those files; its freed
    pages kept warm for reuse (``warm_bytes``) are not counted as in use, so
    that reusing them shows as memory used (``peak_physical``: the peak of
    its ``physical_bytes``)."""

    def __init__(self, patterns, interval=0.02, store=None):
        super().__init__(daemon=True)
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

    def run(self):
        while not self.ev.is_set():
            self.sample()
            self.ev.wait(self.interval)

    def stop(self):
        self.ev.set()
        self.join()
        self.sample()
        return self
