"""Issue 9 #18 (the Python side) and top's Ctrl-C: the merger thread never
dies silently and is started/stopped safely from any thread; bad capacities
and files that are not stores give one clear line, not a traceback; `top`
quits on Ctrl-C even when started with SIGINT ignored (a background job)."""
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pexpect
import pytest

import dedupshm
from dedupshm import merger as merger_mod

CMD = [sys.executable, "-m", "dedupshm"]


# ---------------------------------------------------------------- the merger thread

def _wait(pred, timeout=20):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


def test_merger_error_is_counted_warned_and_reraised_by_stop(make_store):
    s = make_store(capacity="64MiB")
    core = s._c()

    def failing(n):
        raise OSError(errno.ENOMEM, "scan failed on purpose")

    core.merge_scan = failing                 # this process's attachment only
    try:
        m = s.merger
        with pytest.warns(RuntimeWarning, match="scan failed on purpose"):
            m.start(sleep_ms=1)
            assert _wait(lambda: not m.running)
        assert m.errors == merger_mod.MAX_CONSECUTIVE_ERRORS
        assert isinstance(m.last_error, OSError)
        with pytest.raises(OSError, match="scan failed on purpose"):
            m.stop()
        m.stop()                              # raised once
    finally:
        del core.merge_scan


def test_merger_survives_a_passing_error(make_store):
    s = make_store(capacity="64MiB")
    core = s._c()
    real = core.merge_scan
    failed = []

    def flaky(n):
        if not failed:
            failed.append(n)
            raise OSError(errno.EINTR, "interrupted once")
        return real(n)

    core.merge_scan = flaky
    try:
        m = s.merger
        m.start(sleep_ms=1)
        assert _wait(lambda: m.last.get("total_pages") is not None)
        assert m.running and m.errors == 1 and "interrupted once" in str(m.last_error)
        m.stop()                              # did not end the thread: nothing to raise
        assert not m.running
    finally:
        del core.merge_scan


@pytest.mark.limit(120)
def test_merger_start_stop_from_many_threads(make_store):
    s = make_store(capacity="64MiB")
    mem = s.mergeable(1 << 20)
    m = s.merger
    before = set(threading.enumerate())
    problems = []

    def hammer(i):
        try:
            for k in range(40):
                if (k + i) % 2:
                    m.start(sleep_ms=1)
                else:
                    m.stop()
        except Exception as e:  # noqa: BLE001 - reported below
            problems.append(repr(e))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    m.stop()
    assert not m.running
    time.sleep(0.1)
    leftover = [t for t in threading.enumerate()
                if t.name == "dedupshm-merger" and t not in before and t.is_alive()]
    assert problems == [] and leftover == [], (problems, leftover)
    del mem


# ---------------------------------------------------------------- clear errors

def test_capacity_beyond_the_limit_names_it(store_name):
    with pytest.raises(ValueError, match=r"limit is 16 TiB"):
        dedupshm.Store(store_name, create=True, capacity="20TiB")
    assert not any(f.startswith(f"dedupshm.{store_name}.") for f in os.listdir("/dev/shm"))


@pytest.mark.parametrize("command", [["stats"], ["ls"], ["gc"], ["check"], ["top", "--once"]])
def test_cli_on_a_file_that_is_not_a_store(tmp_path, command):
    name = "garbage"
    with open(tmp_path / f"dedupshm.{name}.index", "wb") as f:
        f.write(os.urandom(1 << 16))
    with open(tmp_path / f"dedupshm.{name}.pool", "wb") as f:
        f.write(os.urandom(1 << 14))
    os.chmod(tmp_path / f"dedupshm.{name}.index", 0o600)
    os.chmod(tmp_path / f"dedupshm.{name}.pool", 0o600)
    r = subprocess.run(CMD + ["--directory", str(tmp_path)] + command[:1] + [name] + command[1:],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dedupshm: "), r.stderr


# ---------------------------------------------------------------- top and Ctrl-C

@pytest.mark.limit(40)
def test_top_quits_on_ctrl_c_when_started_with_sigint_ignored(make_store):
    s = make_store(capacity="64MiB")
    s["some-key"] = b"x" * 100
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="80", LINES="24")
    child = pexpect.spawn(CMD[0], CMD[1:] + ["top", s.name, "--interval", "0.2"], env=env,
                          dimensions=(24, 80), encoding="utf-8", codec_errors="replace",
                          timeout=10,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        child.expect_exact("some-key")
        child.sendintr()
        child.expect(pexpect.EOF, timeout=5)
        child.wait()
        assert (child.exitstatus, child.signalstatus) == (0, None)
        assert "Traceback" not in (child.before or "")
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_cli_get_does_not_follow_a_planted_temporary_name(make_store, tmp_path):
    from dedupshm import cli
    s = make_store(capacity="64MiB")
    s["k"] = b"secret value" * 100
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    out = tmp_path / "out.bin"
    # the name the old code wrote through, planted as a symlink
    (tmp_path / f".out.bin.dedupshm-{os.getpid()}").symlink_to(victim)
    with open(os.devnull, "w") as null:
        assert cli.main(["get", s.name, "k", "--out", str(out)], out=null) == 0
    assert victim.read_bytes() == b"do not touch"
    assert not out.is_symlink() and out.read_bytes() == b"secret value" * 100
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".dedupshm")] == []
