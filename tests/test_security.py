"""A store is one trust domain: owner-only files, no attach by another user,
fingerprints salted per store, and dedup never crosses stores."""
import os
import subprocess
import sys

import numpy as np
import pytest

import dedupshm
from helpers import MiB, PAGE, rand_array, store_bytes, store_files

NOBODY = 65534


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_files_are_owner_only(make_store, store_name, umask):
    old = os.umask(umask)
    try:
        s = make_store(store_name)
        s["a"] = rand_array(1 * MiB, 1)
    finally:
        os.umask(old)
    for path in store_files(store_name):
        st = os.stat(path)
        assert st.st_mode & 0o777 == 0o600, f"{path} has mode {oct(st.st_mode & 0o777)}"
        assert st.st_uid == os.getuid()


def test_custom_directory_files_owner_only(make_store, store_name, tmp_path):
    old = os.umask(0)
    try:
        make_store(store_name, directory=str(tmp_path))
    finally:
        os.umask(old)
    for f in os.listdir(tmp_path):
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o600, f


def _as_other_user(fn):
    """Fork; in the child drop to uid/gid 65534 and run fn(); return what
    it reported (a short string) through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            msg = fn()
        except BaseException as e:  # report, never raise out of the fork
            msg = f"ERROR {type(e).__name__}: {e}"
        try:
            os.write(w, msg.encode()[:4000])
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child status {status}"
    return b"".join(chunks).decode()


def _attempt(name, **kw):
    def fn():
        try:
            s = dedupshm.Store(name, **kw)
        except PermissionError:
            return "PermissionError"
        except Exception as e:
            return f"other {type(e).__name__}: {e}"
        try:
            v = s.get("secret")
            return f"ATTACHED, read {bytes(v)[:10]!r}"
        except Exception as e:
            return f"ATTACHED ({type(e).__name__})"
    return fn


def _create_elsewhere(make_store, name):
    """Create and fill a store in a separate root process, so this process
    has never opened it (nothing cached, no inherited descriptors)."""
    make_store.names.append((name, None))  # cleaned up by the fixture
    r = subprocess.run([sys.executable, "-c", (
        "import dedupshm,sys; s=dedupshm.Store(sys.argv[1], create=True); "
        "s['secret']=b'top secret value'; s.close()"), name],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
@pytest.mark.parametrize("create", [False, True], ids=["attach", "create"])
@pytest.mark.parametrize("opened_here", [True, False], ids=["opened-in-parent", "fresh"])
def test_other_user_cannot_attach(make_store, store_name, create, opened_here):
    """A forked child that switched to uid 65534 gets PermissionError from
    Store(name) -- also when its parent (root) has the store open."""
    if opened_here:
        s = make_store(store_name)
        s["secret"] = b"top secret value"
    else:
        _create_elsewhere(make_store, store_name)
    res = _as_other_user(_attempt(store_name, create=create))
    assert res == "PermissionError", res
    # the owner's store is untouched
    t = make_store(store_name, create=False)
    assert bytes(t["secret"]) == b"top secret value"
    for path in store_files(store_name):
        assert os.stat(path).st_uid == os.getuid()
        assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_other_user_cannot_read_files_directly(make_store, store_name):
    s = make_store(store_name)
    s["secret"] = b"x" * 10000

    def fn():
        out = []
        for p in store_files(store_name):
            try:
                with open(p, "rb") as f:
                    f.read(1)
                out.append("READ")
            except PermissionError:
                out.append("denied")
        return ",".join(out)
    assert _as_other_user(fn) == "denied,denied"


# ================================================================ salt

def _fp(store, page):
    fn = getattr(store, "_fingerprint", None)
    if fn is None:
        pytest.skip("Store._fingerprint hook not available")
    return fn(page)


def test_fingerprints_salted_per_store(make_store, store_name):
    a = make_store(store_name)
    b = make_store()
    page = bytes(rand_array(PAGE, 2))
    other = bytes(rand_array(PAGE, 3))
    fa, fb = _fp(a, page), _fp(b, page)
    assert fa == _fp(a, page), "fingerprint not deterministic within a store"
    assert fa != fb, "same page has the same fingerprint in two stores (salt missing)"
    assert _fp(a, other) != fa
    # the salt is a property of the store, not of the handle
    again = make_store(store_name, create=False)
    assert _fp(again, page) == fa


def test_zero_page_fingerprint_salted(make_store):
    a, b = make_store(), make_store()
    z = bytes(PAGE)
    assert _fp(a, z) != _fp(b, z)


# ================================================================ no cross-store dedup

def test_dedup_never_crosses_stores(make_store):
    a, b = make_store(warm_bytes=0), make_store(warm_bytes=0)
    arr = rand_array(32 * MiB, 4)
    base = store_bytes(a.name, b.name)
    a["x"] = arr
    b["x"] = arr
    grew = store_bytes(a.name, b.name) - base
    assert grew >= 2 * arr.nbytes, f"two stores share pages: their files grew {grew / MiB:.1f} MiB"
    for s in (a, b):
        st = s.stats()
        assert arr.nbytes <= st["physical_bytes"] <= arr.nbytes + 4 * PAGE


def test_ref_of_other_store_not_usable(make_store):
    a, b = make_store(), make_store()
    ra = a.put(b"in a" * 1000)
    b.put(b"in b" * 1000)
    with pytest.raises((ValueError, KeyError, TypeError)):
        b.get(ra)
    with pytest.raises((ValueError, KeyError, TypeError)):
        b.delete(ra)
    assert bytes(a.get(ra)) == b"in a" * 1000


def test_opt_out_value_shares_no_pages(make_store):
    s = make_store()
    arr = rand_array(8 * MiB, 5)
    s["public"] = arr
    before = s.stats()
    s.put(arr, key="private", dedup=False)
    st = s.stats()
    assert st["pages_shared"] == before["pages_shared"]
    assert st["physical_bytes"] - before["physical_bytes"] >= arr.nbytes
    # and later deduplicating puts never land on the opted-out pages
    s["again"] = arr
    del s["public"]
    st2 = s.stats()
    assert st2["physical_bytes"] >= 2 * arr.nbytes


# ================================================================ planted files (issue 9, item 14)
#
# Another user (or a careless one) pre-creates a store's files.  A store
# never adopts a file it did not create: create uses O_EXCL | O_NOFOLLOW and
# never truncates or re-initialises a file that is not a store; attach
# fstat()s both files and refuses (PermissionError naming the file) unless
# they are the caller's own with no group/other permission bits.  These
# tests need no second user, so they run (and mean the same) unprivileged.

def _plant(path, mode, content=b"planted by someone else"):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    os.chmod(path, mode)                 # whatever the umask said
    return content


def _remove(*paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _unchanged(path, content, mode):
    st = os.lstat(path)
    with open(path, "rb") as f:
        got = f.read()
    assert got == content, f"{path} was written to (now {len(got)} bytes)"
    assert st.st_mode & 0o777 == mode, f"{path} mode changed to {oct(st.st_mode & 0o777)}"


@pytest.mark.parametrize("which", ["index", "pool"])
@pytest.mark.parametrize("create", [True, False], ids=["create", "attach"])
def test_planted_world_writable_file_is_refused(store_name, which, create):
    index, pool = store_files(store_name)
    path = index if which == "index" else pool
    try:
        content = _plant(path, 0o666)
        with pytest.raises((PermissionError, FileExistsError, FileNotFoundError)) as ei:
            dedupshm.Store(store_name, create=create)
        if create or which == "index":
            # a planted file must be refused as such, naming it
            assert isinstance(ei.value, PermissionError), repr(ei.value)
            assert path in str(ei.value), f"the error does not name {path}: {ei.value}"
        _unchanged(path, content, 0o666)
    finally:
        _remove(index, pool)


def test_store_with_group_bits_is_refused_on_attach(make_store, store_name):
    s = make_store(store_name)
    s["a"] = b"x" * 5000
    s.close()
    index, pool = store_files(store_name)
    for path in (index, pool):
        os.chmod(path, 0o640)
        try:
            with pytest.raises(PermissionError, match=os.path.basename(path)):
                _fresh_attach(store_name)
        finally:
            os.chmod(path, 0o600)
    assert _fresh_attach(store_name) == "ok"


def _fresh_attach(name):
    """Attach in a new process (this one may have the store cached)."""
    r = subprocess.run([sys.executable, "-c", (
        "import dedupshm, sys\n"
        "try:\n"
        "    dedupshm.Store(sys.argv[1]).stats()\n"
        "except PermissionError as e:\n"
        "    print('PermissionError', e); sys.exit(3)\n"
        "print('ok')\n"), name], capture_output=True, text=True, timeout=60)
    if r.returncode == 3:
        raise PermissionError(r.stdout.strip())
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_symlink_planted_as_index_is_not_followed(store_name, tmp_path):
    index, pool = store_files(store_name)
    target = tmp_path / "victim-file"
    target.write_bytes(b"do not touch")
    os.chmod(target, 0o600)
    os.symlink(target, index)
    try:
        with pytest.raises(OSError):
            dedupshm.Store(store_name, create=True)
        assert target.read_bytes() == b"do not touch"
        assert os.stat(target).st_mode & 0o777 == 0o600
        assert not os.path.exists(pool) or os.path.islink(pool) is False
    finally:
        _remove(index, pool)


def test_create_over_a_file_that_is_not_a_store_does_not_truncate(store_name):
    index, pool = store_files(store_name)
    try:
        content = _plant(index, 0o600, os.urandom(8192))
        with pytest.raises((dedupshm.DedupShmError, OSError)):
            dedupshm.Store(store_name, create=True)
        _unchanged(index, content, 0o600)
        assert not os.path.exists(pool), "create made a pool next to a file it refused"
    finally:
        _remove(index, pool)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant files as another uid")
def test_files_planted_by_another_user_are_refused(store_name):
    """The issue's attack: uid 65534 pre-creates both files 0666; the victim
    (root here) creates the store: it must refuse, and write nothing the
    other user could read."""
    index, pool = store_files(store_name)

    def plant():
        _plant(index, 0o666)
        _plant(pool, 0o666, b"")
        return "planted"
    try:
        assert _as_other_user(plant) == "planted"
        with pytest.raises(PermissionError) as ei:
            dedupshm.Store(store_name, create=True)
        assert index in str(ei.value) or pool in str(ei.value), str(ei.value)
        _unchanged(index, b"planted by someone else", 0o666)
        _unchanged(pool, b"", 0o666)
        assert os.stat(index).st_uid == NOBODY
    finally:
        _remove(index, pool)


# ================================================================ unprivileged, against a real other user

FOREIGN = os.environ.get("DEDUPSHM_CI_FOREIGN_STORE")


@pytest.mark.skipif(not FOREIGN or os.geteuid() == 0,
                    reason="needs DEDUPSHM_CI_FOREIGN_STORE: a store of another user (.ci/run "
                           "creates one as root and runs this file unprivileged)")
def test_store_of_another_user_unprivileged():
    """Run as an unprivileged user against a store root created: no attach,
    no create over it, no direct read of its files, no unlink."""
    index, pool = store_files(FOREIGN)
    assert os.stat(index).st_uid != os.geteuid()
    for create in (False, True):
        with pytest.raises(PermissionError):
            dedupshm.Store(FOREIGN, create=create)
    for path in (index, pool):
        with pytest.raises(PermissionError):
            open(path, "rb")
        with pytest.raises(PermissionError):
            os.remove(path)               # /dev/shm is sticky
    assert os.path.exists(index) and os.path.exists(pool)


def test_unprivileged_store_works_and_is_private(make_store, store_name):
    """The whole lifecycle as whoever runs the suite (CI runs it as root and
    again as an unprivileged user, whose merger has no userfaultfd)."""
    s = make_store(store_name)
    arr = rand_array(2 * MiB, 7)
    s["a"] = arr
    s["b"] = arr
    assert (np.asarray(s["b"]) == arr).all()
    m = s.mergeable_array(arr.nbytes, np.uint8)
    m[:] = arr
    s.merger.scan()
    s.merger.scan()
    assert (m == arr).all()
    m[:PAGE] = 1                          # copy-on-write after a merge
    assert (np.asarray(s["a"]) == arr).all()
    for path in store_files(store_name):
        st = os.stat(path)
        assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o600
    assert s.check().ok
    del m
