"""Corrupt metadata: random byte flips and truncations of a store's files.
Attaching and using the store afterwards may raise (CorruptStoreError,
KeyError, ValueError, StoreFullError...) or report problems in check(), but
never crashes, never hangs.  Each case runs in a child process so that a
crash would show as a signal."""
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import dedupshm

CHILD = r"""
import sys, numpy as np, dedupshm
name, d = sys.argv[1], sys.argv[2]
try:
    s = dedupshm.Store(name, directory=d)
except (dedupshm.DedupShmError, OSError, ValueError) as e:
    print("refused:", type(e).__name__); sys.exit(0)
errors = []
for step in ("keys", "get", "put", "delete", "check", "gc"):
    try:
        if step == "keys":
            keys = list(s)
        elif step == "get":
            for k in list(s)[:50]:
                v = s.get(k)
                bytes(memoryview(v).cast("B")[:64]) if hasattr(v, "__buffer__") or isinstance(v, (memoryview, np.ndarray)) else v
        elif step == "put":
            s.put(np.arange(50000), key="new")
            s.put(b"small value", key="new-small")
        elif step == "delete":
            for k in list(s)[:5]:
                del s[k]
        elif step == "check":
            rep = s.check()
            print("check:", len(rep.errors))
        else:
            s.gc()
    except Exception as e:
        errors.append(f"{step}: {type(e).__name__}")
print("survived;", errors)
"""


def build_store(directory):
    name = f"tc{uuid.uuid4().hex[:8]}"
    s = dedupshm.Store(name, create=True, capacity="64MiB", directory=directory)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, 1 << 20, dtype=np.uint8)
    s["a"] = a
    s["b"] = a
    s["c"] = np.zeros(300_000)
    for i in range(30):
        s[f"s{i}"] = f"small {i % 7}".encode()
    s["d"] = {"x": rng.random(5000), "y": "text"}
    s.close()
    return name


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    # tmpfs-like semantics are not needed for reading files: copy them around
    shm = f"/dev/shm/tc-{uuid.uuid4().hex[:8]}"
    os.makedirs(shm)
    name = build_store(shm)
    files = {}
    for suf in ("index", "pool"):            # (size, {offset: page}) of the pages in use
        data = open(os.path.join(shm, f"dedupshm.{name}.{suf}"), "rb").read()
        files[suf] = (len(data), {i: data[i:i + 4096] for i in range(0, len(data), 4096)
                                  if any(data[i:i + 4096])})
    shutil.rmtree(shm)
    return name, files


@pytest.mark.limit(1200)
@settings(max_examples=int(os.environ.get("DEDUPSHM_FUZZ_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["index", "index", "index", "pool"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=40),
       truncate=st.one_of(st.none(), st.floats(0, 1)))
def test_corrupt_files_never_crash(template, which, flips, truncate):
    name, files = template
    d = f"/dev/shm/tc-{uuid.uuid4().hex[:8]}"
    os.makedirs(d)
    try:
        for suf, (size, pages) in files.items():
            pages = {off: bytearray(pg) for off, pg in pages.items()}
            if suf == which:
                # most of a store is sparse zeros: aim the flips at the pages in use
                used = sorted(pages) or [0]
                for pos, val in flips:
                    off = used[int(pos * len(used))]
                    pages.setdefault(off, bytearray(4096))[int(pos * 1e6) % 4096] = val
                if truncate is not None:
                    size = int(size * truncate)
            path = os.path.join(d, f"dedupshm.{name}.{suf}")
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                os.ftruncate(fd, size)
                for off, pg in pages.items():
                    if off < size:
                        os.pwrite(fd, bytes(pg[: size - off]), off)
            finally:
                os.close(fd)
        r = subprocess.run([sys.executable, "-c", CHILD, name, d], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
        assert "refused" in r.stdout or "survived" in r.stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_check_finds_changed_page_bytes_while_others_work(make_store):
    """A byte of a stored page changed behind the store's back is reported
    by check() (which hashes pages without holding the lock), and a store
    busy with puts and deletes meanwhile gives no false report."""
    from helpers import store_files
    s = make_store(capacity="256MiB")
    rng = np.random.default_rng(5)
    keep = rng.integers(0, 255, 64 << 20, dtype=np.uint8)
    s["keep"] = keep
    assert s.check().ok
    for i in range(20):                       # churn: pages freed and reused under check
        r = s.put(rng.integers(0, 255, 8 << 20, dtype=np.uint8))
        rep = s.check()
        assert rep.ok, rep.errors[:3]
        s.delete(r)
        del r
    pool = store_files(s.name)[1]
    with open(pool, "r+b") as f:              # the owner can write its own files
        f.seek(4096 * 3 + 100)
        b = f.read(1)
        f.seek(4096 * 3 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    rep = s.check()
    assert any("bytes changed" in e for e in rep.errors), rep.errors[:5]
