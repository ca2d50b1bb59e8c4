"""EINTR (issue 9, item 15): blocking system calls of the C core -- flock()
while opening a store someone else is creating, fallocate() backing the
pages of a large put, the mmap/mprotect work of gets and merges -- must
retry when a signal interrupts them.  A Python signal handler installed with
signal.signal() and siginterrupt(sig, True) makes the kernel return EINTR
instead of restarting, as any program with a SIGALRM/SIGCHLD handler does.

The body runs in a subprocess of its own: the suite's hang guard uses
SIGALRM in this process, and a store's write-protection mode and signal
dispositions are per process.  There, a 1 kHz ITIMER_REAL timer fires all
along while the store is created, attached (with another process holding
the index file's flock for a while, so the attach really blocks),
large values are put (fallocate runs for many MiB), read back, deleted and
merged; every operation must succeed with the right bytes.

    python tests/test_eintr.py NAME [--rounds N]   # the body, by hand
"""
import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _body(name, rounds, directory="/dev/shm"):
    import fcntl
    import signal

    import numpy as np

    import dedupshm
    from helpers import MiB, PAGE, digest, pattern_array, rand_array

    fired = [0]

    def handler(signum, frame):
        fired[0] += 1

    failures = []

    def step(what, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:          # noqa: BLE001 - every failure is reported
            failures.append(f"{what}: {type(e).__name__}: {e}")
            return None

    index = os.path.join(directory, f"dedupshm.{name}.index")
    # another process creates the store and then holds the index file's
    # flock for a while: our attach's flock(LOCK_SH) blocks meanwhile and is
    # interrupted about every millisecond
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            c = dedupshm.Store(name, create=True, capacity="1GiB", warm_bytes=0)
            c.close()
            del c
            fd = os.open(index, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(w, b"L")
            time.sleep(0.3)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os._exit(0)
    os.close(w)
    locked = os.read(r, 1) == b"L"
    os.close(r)
    if not locked:
        failures.append("the helper could not create the store and take its flock")
    signal.signal(signal.SIGALRM, handler)
    signal.siginterrupt(signal.SIGALRM, True)
    signal.signal(signal.SIGUSR1, handler)
    signal.siginterrupt(signal.SIGUSR1, True)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    spray = Sprayer(signal.SIGUSR1)
    spray.start()
    s = None
    try:
        t0 = time.monotonic()
        s = step("attach while another process holds the flock", dedupshm.Store, name)
        waited = time.monotonic() - t0
        os.waitpid(pid, 0)
        if s is None:                   # go on testing the rest
            s = step("attach again, uncontended", dedupshm.Store, name)
        if s is None:
            return fired[0], failures
        if waited < 0.1 and len(failures) == 0:
            failures.append(f"the attach did not wait for the flock ({waited:.3f}s): not tested")
        other = f"{name}-2"
        s2 = step("create", dedupshm.Store, other, create=True, capacity="64MiB")
        if s2 is not None:
            step("put in the new store", s2.put, b"x" * 5000)
            s2.unlink()
            s2.close()
        m = s.mergeable_array(8 * MiB, np.uint8)
        for i in range(rounds):
            big = pattern_array(48 * MiB, seed=i)          # every page distinct: fallocate 48 MiB
            small = rand_array(1500, seed=i)
            d_big, d_small = digest(big), digest(small)
            ref = step(f"put 48 MiB (round {i})", s.put, big)
            step(f"put small (round {i})", s.__setitem__, f"k{i}", small)
            if ref is not None:
                v = step(f"get 48 MiB (round {i})", s.get, ref)
                if v is not None and digest(v) != d_big:
                    failures.append(f"get 48 MiB (round {i}): wrong bytes")
                # the merger: copy stored pages into mergeable memory and merge them
                if v is not None:
                    m[:] = np.asarray(v).view(np.uint8)[: m.nbytes]
                    merged = step(f"merge scan (round {i})", s.merger.scan)
                    if merged is not None and merged == 0:
                        step(f"merge scan again (round {i})", s.merger.scan)
                    if not np.array_equal(m, np.asarray(v).view(np.uint8)[: m.nbytes]):
                        failures.append(f"mergeable memory changed by a merge (round {i})")
                    m[::PAGE] = 7                           # writes after the merge (COW)
                del v
                step(f"delete ref (round {i})", s.delete, ref)
                del ref
            got = step(f"get small (round {i})", s.get, f"k{i}")
            if got is not None and digest(got) != d_small:
                failures.append(f"get small (round {i}): wrong bytes")
            del got
            step(f"delete key (round {i})", s.__delitem__, f"k{i}")
            step(f"gc (round {i})", s.gc)
        with_create = step("create() 16 MiB", lambda: _create(s, pattern_array(16 * MiB, seed=99)))
        if with_create is not None and digest(s["c"]) != digest(pattern_array(16 * MiB, seed=99)):
            failures.append("create() 16 MiB: wrong bytes")
        step("delete c", s.__delitem__, "c")
        del m
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        spray.stop.set()
        spray.join()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        print(f"thread-directed signals sent: {spray.sent}")
    if s is None:
        return fired[0], failures
    rep = s.check()
    failures += [f"check: {e}" for e in rep.errors]
    if s.stats()["objects"] != 0:
        failures.append(f"objects left: {s.stats()['objects']}")
    s.unlink()
    s.close()
    return fired[0], failures


_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


class Sprayer(threading.Thread):
    """Every millisecond, sends sig to every other thread of this process
    (tgkill): the process-directed timer reaches the main thread only, and
    the C core's own threads (the put pipeline's helper, the userfaultfd
    thread) make blocking calls too."""

    def __init__(self, sig):
        super().__init__(daemon=True)
        self.sig = sig
        self.stop = threading.Event()
        self.sent = 0

    def run(self):
        if _TGKILL is None:
            return
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        me, pid = threading.get_native_id(), os.getpid()
        while not self.stop.wait(0.001):
            try:
                tids = [int(x) for x in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                if tid != me and libc.syscall(_TGKILL, pid, tid, int(self.sig)) == 0:
                    self.sent += 1


def _create(s, arr):
    with s.create("c", arr.nbytes) as buf:
        buf[:] = memoryview(arr).cast("B")
    return True


@pytest.mark.limit(300)
@pytest.mark.parametrize("wp", ["default", "mprotect"])
def test_operations_survive_a_1khz_signal(store_name, wp):
    env = dict(os.environ)
    env.pop("DEDUPSHM_NO_UFFD", None)
    if wp == "mprotect":
        env["DEDUPSHM_NO_UFFD"] = "1"       # the merger's fallback write-protection
    p = subprocess.run([sys.executable, os.path.join(HERE, "test_eintr.py"), store_name],
                       capture_output=True, text=True, timeout=240, env=env)
    out = p.stdout + p.stderr
    # the subprocess unlinks its store; make sure nothing is left if it died
    for n in (store_name, f"{store_name}-2"):
        for suffix in ("index", "pool"):
            try:
                os.remove(f"/dev/shm/dedupshm.{n}.{suffix}")
            except FileNotFoundError:
                pass
    assert p.returncode == 0, f"exit {p.returncode}:\n{out[-3000:]}"
    assert "signals fired:" in out, out[-3000:]


if __name__ == "__main__":
    import argparse
    sys.path.insert(0, HERE)
    ap = argparse.ArgumentParser(description="the EINTR test body")
    ap.add_argument("name")
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    n, fails = _body(a.name, a.rounds)
    print(f"signals fired: {n}")
    for f in fails:
        print("FAIL", f)
    if n < 50:
        print("FAIL too few signals fired: the test did not test anything")
    sys.exit(1 if fails or n < 50 else 0)
