"""Never a wrong byte: fork, Ctrl-C, containers and planted files (issue 9).

Each test here failed on the code before the reference table moved into C
(csrc/refs.c): forked children saw other values' bytes, `ref in store` was
True after delete, KeyboardInterrupt leaked references and mappings, a
client in another PID namespace was reaped while it read, planted files
were adopted.
"""
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import numpy as np
import pytest

import dedupshm
from dedupshm.store import store_paths

MiB = 1 << 20


def _digest(buf):
    return hashlib.sha256(memoryview(buf).cast("B")).hexdigest()


def _child_watch(views, digests, go_r, rounds=50):
    """In a forked child: wait for the parent to mutate the store (it does
    so at once, racing the child's start), then verify the inherited views
    for a while.  Exit code 0 when every byte stayed, 3 on a wrong byte."""
    os.read(go_r, 1)
    for _ in range(rounds):
        for v, d in zip(views, digests):
            if _digest(v) != d:
                os._exit(3)
        time.sleep(0.002)
    os._exit(0)


def _fork_and_churn(store, views, mutate, churn_values):
    """Fork a child holding ``views`` (a list the parent then empties); in
    the parent run ``mutate`` (which drops the parent's other references),
    then put other values to reuse the freed pages while the child
    verifies.  Returns the child's exit code."""
    digests = [_digest(v) for v in views]
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _child_watch(views, digests, go_r)
        finally:
            os._exit(4)
    views.clear()                      # the parent lets go of its views at once
    mutate()
    churn = [store.put(v) for v in churn_values]     # reuses the freed pages
    os.write(go_w, b"g")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("forked child hung")
    for fd in (go_r, go_w):
        os.close(fd)
    del churn
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("nbytes", [300, 64 << 10, 4 * MiB])
def test_fork_child_view_survives_delete_by_ref(store, nbytes):
    """#1: v = get(ref); delete(ref); fork; the parent drops v and puts
    other values: the child's v keeps its bytes."""
    rng = np.random.default_rng(nbytes)
    for _ in range(4):
        ref = store.put(rng.integers(0, 255, nbytes, dtype=np.uint8))
        v = store.get(ref)
        store.delete(ref)

        def mutate():
            nonlocal v, ref
            del v, ref

        others = [rng.integers(0, 255, nbytes, dtype=np.uint8) for _ in range(3)]
        assert _fork_and_churn(store, [v], mutate, others) == 0
        assert store.check().ok


def test_fork_child_view_survives_key_delete(store):
    """#1: v = s["k"]; fork; del s["k"]; del v in the parent (8 hand-offs)."""
    rng = np.random.default_rng(1)
    for i in range(8):
        store["k"] = rng.integers(0, 255, 1 * MiB + 4096 * i, dtype=np.uint8)
        v = store["k"]
        small = store.get("k")                # a second view of the same object

        def mutate():
            nonlocal v, small
            del store["k"]
            del v, small

        others = [rng.integers(0, 255, 1 * MiB, dtype=np.uint8) for _ in range(2)]
        assert _fork_and_churn(store, [v, small], mutate, others) == 0
    assert store.check().ok


def test_fork_child_holds_refs_and_writable_views(store):
    """A child inherits ObjectRefs and copy-on-write views too."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 255, 2 * MiB, dtype=np.uint8)
    ref = store.put(data)
    w = store.get(ref, writable=True)
    w[:10] = 7                               # a private page, plus shared ones

    def mutate():
        nonlocal w
        store.delete(ref)
        del w

    assert _fork_and_churn(store, [w], mutate, [data[::-1].copy()]) == 0


def test_contains_is_false_after_delete(store):
    """#3: `ref in store` is False once the ref's object is deleted, even
    while this process still holds the ref."""
    ref = store.put(b"x" * 10000)
    small = store.put(b"tiny")
    assert ref in store and small in store
    store.delete(ref)
    store.delete(small)
    assert ref not in store and small not in store
    with pytest.raises(KeyError):
        store.get(ref)
    with pytest.raises(KeyError):
        store.get(small)


def _small_writer(name, stop_at):
    s = dedupshm.Store(name)
    rng = np.random.default_rng(os.getpid())
    while time.monotonic() < stop_at:
        n = int(rng.integers(40, 1900))
        body = rng.bytes(n - 8)
        s["k"] = n.to_bytes(4, "little") + zlib.crc32(body).to_bytes(4, "little") + body
    s.close()


def test_small_value_replaced_concurrently_is_never_torn(store, procs):
    """#2: another process loops s["k"] = v (40-1900 B); every read is
    whole: length and crc as written."""
    import multiprocessing as mp
    store["k"] = (8).to_bytes(4, "little") + zlib.crc32(b"").to_bytes(4, "little")
    stop_at = time.monotonic() + 4.0
    procs.start(mp.get_context("fork"), _small_writer, store.name, stop_at)
    reads = bad = 0
    while time.monotonic() < stop_at:
        try:
            v = bytes(store["k"])
        except KeyError:
            continue
        reads += 1
        n = int.from_bytes(v[:4], "little")
        if len(v) != n or zlib.crc32(v[8:]) != int.from_bytes(v[4:8], "little"):
            bad += 1
    assert reads > 1000
    assert bad == 0, f"{bad} torn reads of {reads}"


EXIT_WITH_MERGER = textwrap.dedent("""
    import sys, numpy as np, dedupshm
    s = dedupshm.Store(sys.argv[1])
    a = s.mergeable_array((8 << 20) // 8, np.float64)
    a[:] = 1.5
    b = s.mergeable_array((8 << 20) // 8, np.float64)
    b[:] = 1.5
    s.merger.start(pages_to_scan=1 << 20, sleep_ms=0)
    import time; time.sleep(float(sys.argv[2]))
    # exit with the merger thread inside the C scan: finalizers must wait
""")


def test_exit_with_merger_running_is_clean(store):
    """#9: exiting while the merger thread is in the C scan must not crash."""
    codes = []
    for i in range(12):
        p = subprocess.run([sys.executable, "-c", EXIT_WITH_MERGER, store.name, str(0.01 * (i % 4))],
                           capture_output=True, timeout=60)
        codes.append((p.returncode, p.stderr.decode()[-300:]))
    assert all(c == 0 for c, _ in codes), codes
    store.gc()
    assert store.check().ok


def test_close_waits_and_refuses(store):
    """ds_close waits for calls in flight; a closed handle's views stay valid."""
    ref = store.put(np.arange(1 << 18))
    v = store.get(ref)
    core = store._core
    store.close()
    del ref
    import gc as _gc
    _gc.collect()
    assert v[12345] == 12345                 # the view keeps its attachment
    with pytest.raises(dedupshm.StoreClosedError):
        store.get("x")


# ---------------------------------------------------------------- Ctrl-C

def _maps_count():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.limit(120)
def test_keyboard_interrupt_leaks_nothing(make_store):
    """#12: KeyboardInterrupt landing anywhere in put, get (of a fragmented
    value) or create leaves no reference held and no mapping behind."""
    s = make_store(capacity="256MiB")
    rng = np.random.default_rng(5)
    base = rng.integers(0, 255, 4 * MiB, dtype=np.uint8)
    s["base"] = base
    frag = base.copy()
    frag[::8192] ^= 1                         # every other page differs: many runs
    s["frag"] = frag
    import gc as _gc
    _gc.collect()
    maps0 = _maps_count()
    handles0 = s.stats()["handles"]
    objects0 = s.stats()["objects"]

    stop = threading.Event()
    main = threading.main_thread().ident
    in_op = [False]

    def on_sigint(signum, frame):
        # a real KeyboardInterrupt, raised wherever the main thread is in
        # the store's code; outside it (the test's own loop) it is dropped
        if in_op[0]:
            raise KeyboardInterrupt

    def interrupter():
        r = np.random.default_rng(6)
        while not stop.is_set():
            time.sleep(float(r.uniform(0.0001, 0.003)))
            signal.pthread_kill(main, signal.SIGINT)

    old = signal.signal(signal.SIGINT, on_sigint)
    t = threading.Thread(target=interrupter, daemon=True)
    interrupted = done = 0
    t.start()
    deadline = time.monotonic() + 8
    try:
        while time.monotonic() < deadline:
            try:
                in_op[0] = True
                op = done % 4
                if op == 0:
                    r = s.put(frag)
                    del r
                elif op == 1:
                    v = s.get("frag")
                    del v
                elif op == 2:
                    with s.create(f"c{done % 3}", 1 * MiB) as buf:
                        buf[:4] = b"abcd"
                    del buf
                else:
                    v = s.get("frag", writable=True)
                    del v
                in_op[0] = False
                done += 1
            except KeyboardInterrupt:
                in_op[0] = False
                interrupted += 1
    finally:
        in_op[0] = False
        stop.set()
        t.join()
        signal.signal(signal.SIGINT, old)
    assert interrupted > 20, (interrupted, done)
    for k in ("c0", "c1", "c2"):
        if k in s:
            del s[k]
    _gc.collect()
    st = s.stats()
    assert st["handles"] == handles0, st
    assert st["objects"] == objects0, st
    assert _maps_count() <= maps0 + 4
    assert s.check().ok


# ---------------------------------------------------------------- containers

NS_READER = textwrap.dedent("""
    import hashlib, os, sys, time, dedupshm
    s = dedupshm.Store(sys.argv[1])
    v = s.get("data")
    d = hashlib.sha256(v).hexdigest()
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()            # the parent deleted, gc'd and re-filled the store
    print("same" if hashlib.sha256(v).hexdigest() == d else "CHANGED", flush=True)
""")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare(1) for a PID namespace")
def test_client_in_another_pid_namespace_is_alive(store):
    """#13: a client in another PID namespace (a container sharing
    /dev/shm) is never taken for dead: its data stays while it reads."""
    rng = np.random.default_rng(7)
    store["data"] = rng.integers(0, 255, 2 * MiB, dtype=np.uint8)
    p = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", NS_READER, store.name],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        assert line and line[0] == "ready", line
        assert int(line[1]) < 10           # it really is in a new namespace
        del store["data"]
        info = store.gc()
        assert info["dead_clients"] == 0, info
        for i in range(4):
            store[f"other{i}"] = rng.integers(0, 255, 2 * MiB, dtype=np.uint8)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "same"
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    info = store.gc()                       # now it is gone: reaped
    assert store.stats()["clients"] == 1
    assert store.check().ok


def test_dead_client_is_reaped_at_once(store, procs):
    """OFD liveness: a SIGKILLed client is dead for gc immediately."""
    code = "import sys, time, dedupshm; s = dedupshm.Store(sys.argv[1]); r = s.put(b'x' * 100000);" \
           " print('ok', flush=True); time.sleep(60)"
    p = procs.add(subprocess.Popen([sys.executable, "-c", code, store.name], stdout=subprocess.PIPE, text=True))
    assert p.stdout.readline().strip() == "ok"
    assert store.stats()["clients"] == 2
    assert store.gc()["dead_clients"] == 0
    p.kill()
    p.wait()
    info = store.gc()
    assert info["dead_clients"] == 1 and info["handles_released"] == 1, info
    st = store.stats()
    assert st["clients"] == 1 and st["objects"] == 0


PARENT_EXITS = textwrap.dedent("""
    import os, sys, time, dedupshm
    s = dedupshm.Store(sys.argv[1])
    r = s.put(b"p" * 100000)
    v = s.get(r)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)             # let the test read the parent's output to EOF
        os.dup2(null, 2)
        time.sleep(30)
        os._exit(0)
    print(pid, flush=True)
    os._exit(0)                      # dies without closing: only the kernel lets go
""")


def test_dead_parent_is_reaped_while_its_child_lives(store, procs):
    """The child's inherited mappings must not keep its dead parent's
    slot alive (a mapping holds the open file description of the index)."""
    p = subprocess.run([sys.executable, "-c", PARENT_EXITS, store.name], capture_output=True,
                       text=True, timeout=60)
    child = int(p.stdout.split()[0])
    try:
        assert store.stats()["clients"] == 3
        info = store.gc()
        assert info["dead_clients"] == 1, info
        assert store.stats()["clients"] == 2     # us and the live child
    finally:
        os.kill(child, signal.SIGKILL)
    for _ in range(200):
        if store.gc()["dead_clients"] or store.stats()["clients"] == 1:
            break
        time.sleep(0.05)
    assert store.stats()["clients"] == 1
    assert store.stats()["objects"] == 0


# ---------------------------------------------------------------- planted files

def _planted(tmp_path, mode, content=b""):
    name = f"tp{os.getpid()}x{time.monotonic_ns() % 10**8}"
    paths = store_paths(name, str(tmp_path))
    for p in paths:
        with open(p, "wb") as f:
            f.write(content)
        os.chmod(p, mode)
    return name, paths


def test_planted_world_writable_files_are_refused(tmp_path):
    """#14: pre-created files with mode 0666 are never adopted."""
    name, paths = _planted(tmp_path, 0o666)
    with pytest.raises(PermissionError) as e:
        dedupshm.Store(name, create=True, directory=str(tmp_path), capacity="16MiB")
    assert e.value.filename in paths
    assert "0666" in str(e.value)
    for p in paths:
        assert os.stat(p).st_size == 0 and (os.stat(p).st_mode & 0o777) == 0o666


def test_planted_symlink_is_refused(tmp_path):
    name = f"tl{os.getpid()}"
    index, pool = store_paths(name, str(tmp_path))
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, index)
    with pytest.raises(PermissionError):
        dedupshm.Store(name, create=True, directory=str(tmp_path), capacity="16MiB")
    assert target.read_bytes() == b"precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another owner")
def test_planted_file_of_another_user_is_refused(tmp_path):
    name, paths = _planted(tmp_path, 0o600)
    for p in paths:
        os.chown(p, 65534, 65534)
    with pytest.raises(PermissionError) as e:
        dedupshm.Store(name, create=True, directory=str(tmp_path), capacity="16MiB")
    assert "65534" in str(e.value)


def test_create_over_a_non_store_file_does_not_truncate(tmp_path):
    """#14: create=True over a file that is not a store raises and leaves it."""
    content = b"not a store, do not truncate me " * 300
    name, paths = _planted(tmp_path, 0o600, content)
    with pytest.raises(dedupshm.CorruptStoreError):
        dedupshm.Store(name, create=True, directory=str(tmp_path), capacity="16MiB")
    for p in paths:
        with open(p, "rb") as f:
            assert f.read() == content


def test_store_files_are_private(store):
    for p in store_paths(store.name):
        assert os.stat(p).st_mode & 0o777 == 0o600


def test_get_racing_close_raises_store_closed(make_store):
    """#18: get() racing close() raises StoreClosedError, never AttributeError."""
    s = make_store()
    s["k"] = np.arange(5000)
    errors = []

    def reader():
        for _ in range(20000):
            try:
                s.get("k")
            except dedupshm.StoreClosedError:
                return
            except Exception as e:  # noqa: BLE001 - the test reports it
                errors.append(repr(e))
                return

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.01)
    s.close()
    t.join()
    assert not errors, errors


def test_failed_create_leaves_no_file(tmp_path):
    """A create that fails (here: capacity beyond the directory) leaves no file."""
    name = f"tf{os.getpid()}"
    with pytest.raises((dedupshm.DedupShmError, ValueError, OSError)):
        dedupshm.Store(name, create=True, directory=str(tmp_path), capacity=1 << 62)
    assert os.listdir(tmp_path) == []


def test_planted_pool_file_alone_is_refused_and_nothing_is_left(tmp_path):
    name = f"tq{os.getpid()}"
    index, pool = store_paths(name, str(tmp_path))
    with open(pool, "wb") as f:
        f.write(b"planted")
    os.chmod(pool, 0o666)
    with pytest.raises(PermissionError) as e:
        dedupshm.Store(name, create=True, directory=str(tmp_path), capacity="16MiB")
    assert e.value.filename == pool
    assert not os.path.exists(index)                 # the half-made index is gone
    with open(pool, "rb") as f:
        assert f.read() == b"planted"                # the planted file is untouched
