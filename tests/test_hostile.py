"""Hostile input and full memory: clear exceptions, never a crash, a hang or
a half object."""
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid

import numpy as np
import pytest

import dedupshm
from helpers import MiB, PAGE


class FailsToUnpickle:
    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise RuntimeError("cannot rebuild me")


def test_value_that_fails_to_unpickle(store):
    ref = store.put({"x": FailsToUnpickle()})
    with pytest.raises(ValueError, match="unpickled"):
        store.get(ref)
    assert store.check().ok


def test_value_that_fails_to_pickle(store):
    before = store.stats()["objects"]
    with pytest.raises(TypeError):
        store.put(x for x in range(3))
    with pytest.raises(TypeError):
        store.put(lambda: 1, key="f")
    assert "f" not in store and store.stats()["objects"] == before


@pytest.mark.parametrize("n", [-1, -(1 << 40), 1.0, "10", None, True])
def test_bad_sizes(store, n):
    with pytest.raises((ValueError, TypeError)):
        with store.create("k", n):
            pass
    with pytest.raises((ValueError, TypeError)):
        store.mergeable(n)


def test_huge_sizes_are_store_full(make_store, store_name):
    s = make_store(store_name, capacity="16MiB")
    with pytest.raises(dedupshm.StoreFullError):
        with s.create("k", 1 << 40):
            pass
    with pytest.raises(dedupshm.StoreFullError):
        # 64 MiB of distinct non-zero pages into 16 MiB (np.ones would be one
        # page repeated: within-value dedup stores it in a single page)
        s.put(np.random.default_rng(5).integers(1, 1 << 62, 8 * MiB))
    assert "k" not in s and s.stats()["objects"] == 0 and s.check().ok


def test_keys_too_long_and_odd(store):
    with pytest.raises(ValueError):
        store.put(b"x", key="k" * 5000)
    store.put(b"nul", key="a\x00b")
    store.put(b"bin", key=b"\xff\x00\xfe")
    store.put(b"uni", key="ключ-🔑")
    assert bytes(store["a\x00b"]) == b"nul"
    assert bytes(store[b"\xff\x00\xfe"]) == b"bin"
    assert set(store) >= {"a\x00b", b"\xff\x00\xfe", "ключ-🔑"}


@pytest.mark.parametrize("name", ["a/b", "..", ".", "x\x00y", "", "a" * 65, "../../etc/passwd", "ä"])
def test_bad_names(name):
    with pytest.raises(ValueError):
        dedupshm.Store(name, create=True)


def test_ref_after_store_unlinked_and_recreated(make_store, store_name):
    s = make_store(store_name)
    ref = s.put(np.arange(10000))
    blob = pickle.dumps(ref)
    s.unlink()
    s2 = make_store(store_name)           # a new store under the same name
    ref2 = pickle.loads(blob)              # refers to the old one: dangling here
    with pytest.raises((KeyError, ValueError)):
        s2.get(ref2)
    assert (s.get(ref) == np.arange(10000)).all()   # the old attachment still works


def test_forged_ref_is_refused(store):
    from dedupshm.store import ObjectRef
    store.put(b"x" * 10000)
    for obj, gen in [(12345678, 99), (0xFFFFFFFF, 99), (0, 0), (1, 1 << 63)]:
        cell = store._core.new_ref()
        cell.obj, cell.gen = obj, gen
        fake = ObjectRef(store._core, cell)      # claims to hold nothing
        with pytest.raises(KeyError):
            store.get(fake)
        with pytest.raises(KeyError):
            store.delete(fake)
        assert fake not in store
        assert pickle.loads(pickle.dumps(fake)) not in store


def test_garbage_file_is_not_a_store(tmp_path):
    name = f"tg{uuid.uuid4().hex[:8]}"
    (tmp_path / f"dedupshm.{name}.index").write_bytes(os.urandom(8192))
    (tmp_path / f"dedupshm.{name}.pool").write_bytes(b"")
    for f in tmp_path.iterdir():
        f.chmod(0o600)                  # ours and private: only the content is wrong
    with pytest.raises(dedupshm.CorruptStoreError):
        dedupshm.Store(name, directory=str(tmp_path))


# ---------------------------------------------------------------- a full tmpfs

@pytest.fixture
def small_tmpfs():
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    d = tempfile.mkdtemp(prefix="dedupshm-full-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", d], capture_output=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d])
        os.rmdir(d)


def _fill_child(d, name):
    """In a child: keep putting until the tmpfs is full; the parent checks
    that we got StoreFullError, not SIGBUS."""
    code = f"""
import numpy as np, dedupshm, sys
s = dedupshm.Store({name!r}, directory={d!r})
n = 0
try:
    for i in range(1000):
        s.put(np.random.default_rng(i).integers(0, 255, 1 << 20, dtype=np.uint8), key=f"k{{i}}")
        n += 1
except dedupshm.StoreFullError:
    print("full after", n)
    sys.exit(0)
sys.exit(3)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.limit(180)
def test_full_tmpfs_is_store_full_never_sigbus(small_tmpfs):
    name = f"tf{uuid.uuid4().hex[:8]}"
    s = dedupshm.Store(name, create=True, capacity="1GiB", directory=small_tmpfs)   # more than fits
    try:
        r = _fill_child(small_tmpfs, name)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)   # -7 would be SIGBUS
        assert "full after" in r.stdout
        s.gc()
        assert s.check().ok
        n = len(s)
        assert n >= 5
        # creates, small values and merges fail cleanly too
        with pytest.raises(dedupshm.StoreFullError):
            with s.create("big", 32 * MiB) as buf:
                # new pages (a buffer of zero pages would need none)
                buf[:] = np.random.default_rng(2).bytes(32 * MiB)
        assert "big" not in s
        m = s.mergeable_array(4 * MiB, np.uint8) if _try_mergeable(s) else None
        if m is not None:
            m[:] = np.random.default_rng(1).integers(0, 255, m.size, dtype=np.uint8)
            s.merger.scan()
            s.merger.scan()
        # content that is already stored still goes in (all pages dedup)
        again = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
        s.put(again, key="again")
        assert (s["again"] == again).all()
        # and the store is usable once space is freed
        for k in list(s)[: n // 2]:
            del s[k]
        s.put(np.random.default_rng(999).integers(0, 255, 1 << 20, dtype=np.uint8), key="after")
        assert s.check().ok
    finally:
        s.close()
        s.unlink()


def _try_mergeable(s):
    try:
        s.mergeable(PAGE).release()
        return True
    except dedupshm.StoreFullError:
        return False


_FULL_UNPRIVILEGED = r"""
import sys
import numpy as np
import dedupshm
d = sys.argv[1]
s = dedupshm.Store("full", create=True, capacity="1GiB", directory=d)   # more than fits
n = 0
try:
    for i in range(1000):
        s.put(np.random.default_rng(i).integers(0, 255, 1 << 20, dtype=np.uint8), key=f"k{i}")
        n += 1
except dedupshm.StoreFullError:
    pass
else:
    sys.exit("never full")
assert n >= 5, n
s.gc()
assert s.check().ok
try:
    with s.create("big", 32 << 20) as buf:
        # new pages (a buffer of zero pages would need none)
        buf[:] = np.random.default_rng(2).bytes(32 << 20)
    sys.exit("create past full did not raise")
except dedupshm.StoreFullError:
    pass
assert "big" not in s
again = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
s.put(again, key="again")                      # all its pages are stored already
assert (s["again"] == again).all()
for k in list(s)[: n // 2]:
    del s[k]
s.put(np.random.default_rng(999).integers(0, 255, 1 << 20, dtype=np.uint8), key="after")
assert s.check().ok
print("ok full after", n, dedupshm.merger.wp_mode())
"""


@pytest.mark.limit(180)
def test_full_tmpfs_unprivileged(tmp_path):
    """What test_full_tmpfs_is_store_full_never_sigbus checks as root, for an
    unprivileged user: a 24 MiB tmpfs mounted in a user+mount namespace of
    its own (unshare -Urm), filled until StoreFullError -- never SIGBUS."""
    if os.geteuid() == 0:
        pytest.skip("root runs test_full_tmpfs_is_store_full_never_sigbus")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    d = tmp_path / "tmpfs"
    d.mkdir()
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged user namespaces here: {probe.stderr.decode().strip()}")
    r = subprocess.run(
        ["unshare", "-Urm", "sh", "-c",
         'mount -t tmpfs -o size=24m tmpfs "$1" && exec "$2" -c "$3" "$1"', "sh",
         str(d), sys.executable, _FULL_UNPRIVILEGED],
        capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])   # -7 would be SIGBUS
    assert "ok full after" in r.stdout, r.stdout
