"""Fork while the merger merges (issue 9, item 7): no fork may land inside a
merge window, in either write-protection mode.  A child that inherited a
window (pages write-protected, a busy entry that no thread of the child
will ever clear) hung forever on its first write in the mprotect mode.

Each campaign runs in a fresh interpreter (the write-protection mode is
per process) and reports counts; every child has a deadline, so a hang is
counted, killed and fails the test."""
import os
import subprocess
import sys
import textwrap

import pytest

MODES = ["userfaultfd", "mprotect"]

CAMPAIGN = """
import os, signal, sys, threading, time
import numpy as np
import dedupshm

PAGE = 4096
MODE, NAME, FORKS, HOW = {mode!r}, {name!r}, {forks}, {how!r}
if dedupshm.merger.wp_mode() != MODE:
    print("SKIP: write protection mode", dedupshm.merger.wp_mode(), "not", MODE)
    sys.exit(77)
s = dedupshm.Store(NAME, create=True, capacity="256MiB")
s.unlink()
npages = 2048 if HOW == "scan" else 512
base = np.random.default_rng(7).integers(0, 256, npages * PAGE, dtype=np.uint8)
s["base"] = base
arr = s.mergeable_array(npages * PAGE, np.uint8)
arr[:] = base
stop = threading.Event()

def rewriter():
    # writes the same bytes back into merged pages: each write makes a
    # private copy (unmerge), which the merger merges again -- windows open
    # and close all the time, and the content is always `base`
    rng = np.random.default_rng(1)
    while not stop.is_set():
        for p in rng.integers(0, npages, 32).tolist():
            arr[p * PAGE:(p + 1) * PAGE] = base[p * PAGE:(p + 1) * PAGE]
        time.sleep(0)

scans = [0]
def scanner():
    # a thread that is inside ds_merge_scan (a full pass) most of the time
    while not stop.is_set():
        s.merger.scan()
        scans[0] += 1

if HOW == "thread":
    s.merger.start(pages_to_scan=64, sleep_ms=0)
else:
    threading.Thread(target=scanner, daemon=True).start()
threading.Thread(target=rewriter, daemon=True).start()
deadline = time.monotonic() + 20
while s.stats()["pages_merged"] < npages // 4 and time.monotonic() < deadline:
    time.sleep(0.01)
merged_before = s.stats()["pages_merged"]

def child():
    # our inherited view is `base`; every page must take a write and
    # read it back (a page inherited write-protected would hang here)
    try:
        if not (arr == base).all():
            os._exit(3)
        arr[:] = 0x5A
        arr[::PAGE] = np.arange(npages, dtype=np.uint64).astype(np.uint8)
        if not (arr[1::PAGE] == 0x5A).all() or not (arr[::PAGE] == np.arange(npages) % 256).all():
            os._exit(4)
        os._exit(0)
    except BaseException:
        os._exit(5)

hangs = wrong = other = 0
for i in range(FORKS):
    pid = os.fork()
    if pid == 0:
        child()
    end = time.monotonic() + 30
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hangs += 1
            status = None
            break
        time.sleep(0.001)
    if status is not None and status != 0:
        code = os.waitstatus_to_exitcode(status)
        if code in (3, 4):
            wrong += 1
        else:
            other += 1
            print("child", i, "exit", code, flush=True)
stop.set()
s.merger.stop()
time.sleep(0.05)
ok_parent = bool((arr == base).all())
print(f"forks={{FORKS}} hangs={{hangs}} wrong={{wrong}} other={{other}} parent_ok={{ok_parent}} "
      f"merged_before={{merged_before}} scans={{scans[0]}}", flush=True)
"""


def campaign(name, mode, forks, how, timeout=300):
    env = dict(os.environ)
    env.pop("DEDUPSHM_NO_UFFD", None)
    if mode == "mprotect":
        env["DEDUPSHM_NO_UFFD"] = "1"
    code = textwrap.dedent(CAMPAIGN.format(mode=mode, name=name, forks=forks, how=how))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired as ex:
        pytest.fail(f"campaign hung for {timeout}s: {ex.stdout!r} {ex.stderr!r}")
    if r.returncode == 77:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    last = r.stdout.strip().splitlines()[-1]
    counts = dict(kv.split("=") for kv in last.split())
    return counts, r.stdout


@pytest.mark.limit(400)
@pytest.mark.parametrize("mode", MODES)
def test_fork_while_merger_thread_merges(store_name, mode):
    """200 forks of a process whose merger thread merges continuously
    (tight pacing, no sleep): every child writes and reads back every page
    of the mergeable memory and exits 0 within its deadline."""
    counts, out = campaign(store_name, mode, 200, "thread")
    assert counts["hangs"] == "0", out
    assert counts["wrong"] == "0" and counts["other"] == "0", out
    assert counts["parent_ok"] == "True", out
    assert int(counts["merged_before"]) > 0, out


@pytest.mark.limit(400)
@pytest.mark.parametrize("mode", MODES)
def test_fork_while_another_thread_is_in_merge_scan(store_name, mode):
    """One thread forks while another is inside ds_merge_scan (full passes
    back to back over 8 MiB): the fork waits for the scan's merge lock, so
    no window is inherited."""
    counts, out = campaign(store_name, mode, 100, "scan")
    assert counts["hangs"] == "0", out
    assert counts["wrong"] == "0" and counts["other"] == "0", out
    assert counts["parent_ok"] == "True", out
    assert int(counts["scans"]) > 0, out
