"""dedupshm.joblib: the "dedupshm" backend with real joblib Parallel calls
and real scikit-learn estimators.  Large arguments must go through the
caller's store (no memmapping folder anywhere), repeated calls must not
store the same array again, results must equal the default backend's, and
no store file may outlive its caller -- also when a worker or the caller is
SIGKILLed."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

joblib = pytest.importorskip("joblib")
import dedupshm.joblib as dj  # noqa: E402
from helpers import MiB, file_bytes, in_store, shm_files, wait_for  # noqa: E402

dj.register()
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def backend(tmp_path, monkeypatch):
    """The backend in this process, with joblib's temporary folder pointed
    at an empty directory; this process's store is removed afterwards."""
    monkeypatch.setenv("JOBLIB_TEMP_FOLDER", str(tmp_path))
    before = set(memmap_folders())
    with joblib.parallel_config(backend="dedupshm", n_jobs=2):
        yield
    assert os.listdir(tmp_path) == []                  # nothing of joblib's memmapping
    assert not set(memmap_folders()) - before
    c = dj._caller
    dj.release()
    if c is not None:
        assert not shm_files(f"dedupshm.{c.name}.")


def memmap_folders():
    return [f for f in os.listdir("/dev/shm")
            if f.startswith("joblib_memmapping_folder_") and f"_{os.getpid()}_" in f]


def where(x):
    """Whether the worker's argument is in the caller's store, read-only."""
    return in_store(x, x_store_name()), x.flags.writeable, float(x.sum())


def x_store_name():
    return os.environ["DJ_STORE"]


def double(x):
    return x * 2


def test_arguments_and_results_go_through_the_store(backend, monkeypatch):
    c = dj.caller_store()
    monkeypatch.setenv("DJ_STORE", c.name)      # the workers inherit it
    X = np.random.default_rng(0).random(1 << 20)          # 8 MiB
    out = joblib.Parallel()(joblib.delayed(where)(X) for _ in range(4))
    assert out == [(True, False, float(X.sum()))] * 4
    assert 8 * MiB <= c.store.stats()["physical_bytes"] < 9 * MiB      # put once
    # a large result comes back through the store, writable (copy-on-write)
    r = joblib.Parallel()(joblib.delayed(double)(X) for _ in range(2))
    assert all(np.array_equal(a, X * 2) for a in r)
    assert in_store(r[0], c.name) and r[0].flags.writeable
    r[0][0] = -1.0                                # private to this process
    assert r[1][0] == X[0] * 2
    # small arguments are pickled as usual
    small = np.arange(10.0)
    assert joblib.Parallel()(joblib.delayed(float)(small.sum()) for _ in range(2)) == [45.0] * 2


def test_repeated_calls_store_the_array_once(backend):
    c = dj.caller_store()
    X = np.random.default_rng(1).random(2 << 20)          # 16 MiB
    pool = os.path.join(c.store.directory, f"dedupshm.{c.name}.pool")
    sizes = []
    for _ in range(3):
        assert joblib.Parallel()(joblib.delayed(np.sum)(X) for _ in range(4)) == [X.sum()] * 4
        sizes.append((c.store.stats()["physical_bytes"], file_bytes(pool)))
    assert sizes[0][0] >= 16 * MiB
    assert sizes[1] == sizes[2] == sizes[0]       # a dedup hit: no new page, no new file


def kill_self(i):
    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def test_worker_sigkill(backend):
    c = dj.caller_store()
    X = np.random.default_rng(2).random(1 << 20)
    from joblib.externals.loky.process_executor import TerminatedWorkerError
    with pytest.raises(TerminatedWorkerError):
        joblib.Parallel()(joblib.delayed(kill_self)(i) for i in range(4))
    # the backend recovers; references the dead worker held are reclaimed
    assert joblib.Parallel()(joblib.delayed(np.sum)(X) for _ in range(2)) == [X.sum()] * 2
    dj.release()
    assert not shm_files(f"dedupshm.{c.name}.")


# ---- the caller's lifetime (real caller processes)

CALLER = textwrap.dedent("""
    import os, sys, time, numpy as np, joblib
    import dedupshm.joblib as dj
    dj.register()
    X = np.random.default_rng(3).random(1 << 20)
    def nap(x, s):
        time.sleep(s)
        return float(x.sum())
    with joblib.parallel_config(backend="dedupshm", n_jobs=2):
        print(dj.caller_store().name, flush=True)
        r = joblib.Parallel()(joblib.delayed(nap)(X, 0) for _ in range(4))
        assert r == [float(X.sum())] * 4
        print("ok", flush=True)
        if sys.argv[1] == "hang":
            joblib.Parallel()(joblib.delayed(nap)(X, 60) for _ in range(2))
""")


def run_caller(procs, mode, tmp_path):
    env = dict(os.environ, JOBLIB_TEMP_FOLDER=str(tmp_path))
    return procs.add(subprocess.Popen([sys.executable, "-c", CALLER, mode], env=env,
                                      stdout=subprocess.PIPE, text=True))


def test_caller_exit_removes_the_store(procs, tmp_path):
    p = run_caller(procs, "exit", tmp_path)
    out, _ = p.communicate(timeout=120)
    name, ok = out.split()
    assert p.returncode == 0 and ok == "ok"
    assert not shm_files(f"dedupshm.{name}.")
    assert os.listdir(tmp_path) == []


def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read()
            kids.setdefault(int(st[st.rindex(b")") + 2:].split()[1]), []).append(int(d))
        except (OSError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out += kids.get(p, [])
        todo += kids.get(p, [])
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.limit(150)
def test_caller_sigkill_then_next_user_reclaims(procs, tmp_path):
    p = run_caller(procs, "hang", tmp_path)
    name = p.stdout.readline().strip()
    assert p.stdout.readline().strip() == "ok"
    assert shm_files(f"dedupshm.{name}.")
    # loky's workers, busy in the 60 s task (not its resource tracker: it
    # removes loky's own semaphores once they are gone)
    orphans = [q for q in descendants(p.pid) if b"resource_tracker" not in cmdline(q)]
    try:
        p.kill()
        p.wait(10)
        assert shm_files(f"dedupshm.{name}.")     # nobody removed it yet
        assert [q for q in orphans if os.path.exists(f"/proc/{q}")]
        # the workers outlive their caller (loky's idle timeout) and stay
        # attached: the store is reclaimed all the same
        q = run_caller(procs, "exit", tmp_path)   # the next user of the backend
        out, _ = q.communicate(timeout=120)
        assert q.returncode == 0
        assert not shm_files(f"dedupshm.{name}.")
        assert not shm_files(f"dedupshm.{out.split()[0]}.")
        assert os.listdir(tmp_path) == []
    finally:
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # loky's resource tracker, its last client gone, removes loky's semaphores
        wait_for(lambda: not shm_files(f"sem.loky-{p.pid}-"), timeout=30,
                 msg="loky's semaphores of the killed caller to go")


# ---- scikit-learn

def data(n=6000, d=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))                # 9.6 MB: through the store
    y = (X[:, :5].sum(axis=1) + 0.5 * rng.standard_normal(n) > 0).astype(int)
    return X, y


@pytest.mark.limit(240)
def test_sklearn_grid_search_same_as_default(backend):
    sk = pytest.importorskip("sklearn")  # noqa: F841
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    X, y = data()
    grid = {"C": [0.01, 0.1, 1.0, 10.0, 100.0]}

    def fit():
        return GridSearchCV(LogisticRegression(max_iter=200), grid, cv=2, n_jobs=2).fit(X, y)
    ours = fit()
    with joblib.parallel_config(backend="loky"):
        ref = fit()
    assert ours.best_params_ == ref.best_params_
    np.testing.assert_array_equal(ours.cv_results_["mean_test_score"],
                                  ref.cv_results_["mean_test_score"])
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    assert dj.caller_store().store.stats()["physical_bytes"] >= X.nbytes


@pytest.mark.limit(240)
def test_sklearn_random_forest_same_as_default(backend):
    pytest.importorskip("sklearn")
    from sklearn.ensemble import RandomForestClassifier
    X, y = data(4000, 200, 1)

    def fit():
        return RandomForestClassifier(n_estimators=8, max_depth=6, random_state=0,
                                      n_jobs=2).fit(X, y)
    ours = fit()
    with joblib.parallel_config(backend="loky"):
        ref = fit()
    # the same trees, split for split
    for a, b in zip(ours.estimators_, ref.estimators_):
        np.testing.assert_array_equal(a.tree_.feature, b.tree_.feature)
        np.testing.assert_array_equal(a.tree_.threshold, b.tree_.threshold)
        np.testing.assert_array_equal(a.tree_.value, b.tree_.value)
    # predict_proba sums the trees in threads, in no fixed order: equal up to rounding
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-12)
