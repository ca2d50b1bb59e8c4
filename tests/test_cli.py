"""The command line: console script ``dedupshm`` and ``python -m dedupshm``
(demo, stats [--json], ls, rm, gc), against stores in /dev/shm."""
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import dedupshm
from helpers import MiB, PAGE, SHM_DIR, rand_array, shm_files, store_files
import workers

HERE = os.path.dirname(os.path.abspath(__file__))


def _commands():
    cmds = [("module", [sys.executable, "-m", "dedupshm"])]
    exe = shutil.which("dedupshm")
    if exe is None:
        cand = os.path.join(os.path.dirname(sys.executable), "dedupshm")
        exe = cand if os.path.exists(cand) else None
    cmds.append(("script", [exe] if exe else None))
    return cmds


@pytest.fixture(params=_commands(), ids=lambda c: c[0])
def cli_base(request):
    label, base = request.param
    if base is None:
        pytest.fail("console script 'dedupshm' is not installed on PATH")
    return base


@pytest.fixture
def cli(cli_base):
    base = cli_base

    def run(*args, timeout=60, check=True):
        r = subprocess.run(base + list(args), capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
        return r
    return run


@pytest.fixture
def filled(make_store, store_name):
    s = make_store(store_name)
    a = rand_array(8 * MiB, 1)
    s["alpha-key"] = a
    s["beta-key"] = a            # dedups
    s["gamma-key"] = {"x": 1}
    s[b"delta-bytes"] = b"d" * 100
    return s, store_name


def test_help(cli):
    r = cli("--help")
    for word in ("demo", "stats", "ls", "rm", "gc"):
        assert word in r.stdout


def test_bare_command_prints_help(cli):
    r = cli()
    assert r.returncode == 0 and "usage: dedupshm" in r.stdout
    for word in ("demo", "stats", "top", "put", "get", "--directory"):
        assert word in r.stdout
    assert "error" not in r.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_directory_before_or_after_the_command(cli, make_store, store_name, tmp_path, where):
    s = make_store(store_name, directory=str(tmp_path))
    s["only-here"] = b"x" * 5000
    for cmd in (["ls", store_name], ["stats", store_name, "--json"]):
        args = (["--directory", str(tmp_path)] + cmd if where == "before"
                else cmd + ["--directory", str(tmp_path)])
        r = cli(*args)
        assert ("only-here" in r.stdout) if cmd[0] == "ls" else json.loads(r.stdout)["keys"] == 1
    # not given: the default directory, where there is no such store
    r = cli("ls", store_name, check=False)
    assert r.returncode == 1 and "no store named" in r.stderr


def _attach_and_wait(name, ready, stop):
    with dedupshm.Store(name):
        ready.set()
        stop.wait(60)


def test_stats_does_not_count_itself(cli, make_store, store_name, procs):
    s = make_store(store_name)             # this test process: one attached process
    assert json.loads(cli("stats", store_name, "--json").stdout)["clients"] == 1
    line = [l for l in cli("stats", store_name).stdout.splitlines() if "attached" in l]
    assert line and line[0].split()[-1] == "1"
    # a second user: two
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    p = procs.add(ctx.Process(target=_attach_and_wait, args=(store_name, ready, stop)))
    p.start()
    assert ready.wait(30)
    try:
        assert json.loads(cli("stats", store_name, "--json").stdout)["clients"] == 2
    finally:
        stop.set()
        p.join(30)
    del s


def test_stats_json_matches_api(cli, filled):
    s, name = filled
    r = cli("stats", name, "--json")
    data = json.loads(r.stdout)
    st = s.stats()
    for k in ("objects", "logical_bytes", "physical_bytes", "pages_shared", "pages_sharing"):
        assert data[k] == st[k], k
    assert data["objects"] == 4
    assert data["dedup_ratio"] == pytest.approx(st["dedup_ratio"], rel=1e-3)
    assert data["dedup_ratio"] > 1.9


def test_stats_human_table(cli, filled):
    s, name = filled
    r = cli("stats", name)
    out = r.stdout
    assert "objects" in out.lower()
    assert "dedup" in out.lower()
    lines = [l for l in out.splitlines() if "objects" in l.lower()]
    assert any("4" in l for l in lines), out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_ls_lists_keys(cli, filled):
    s, name = filled
    r = cli("ls", name)
    for k in ("alpha-key", "beta-key", "gamma-key", "delta-bytes"):
        assert k in r.stdout, k
    del s["beta-key"]
    r = cli("ls", name)
    assert "beta-key" not in r.stdout
    assert "alpha-key" in r.stdout


def test_ls_empty_store(cli, make_store, store_name):
    make_store(store_name)
    r = cli("ls", store_name)
    assert "Traceback" not in r.stderr


def test_rm_removes_store(cli, make_store, store_name):
    s = make_store(store_name)
    s["k"] = b"v"
    s.close()
    cli("rm", store_name)
    for p in store_files(store_name):
        assert not os.path.exists(p)
    with pytest.raises(FileNotFoundError):
        dedupshm.Store(store_name)


def test_gc_reclaims_dead_process(cli, make_store, store_name, procs):
    s = make_store(store_name, warm_bytes=0)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = procs.start(ctx, workers.hold_unkeyed, store_name, None, 8 * MiB, 2, child)
    assert parent.poll(60)
    parent.recv()
    assert s.stats()["objects"] == 1
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    cli("gc", store_name)
    st = s.stats()
    assert st["objects"] == 0
    assert st["physical_bytes"] <= PAGE


@pytest.mark.parametrize("sub", ["stats", "ls", "gc", "rm"])
def test_missing_store_is_an_error_not_a_traceback(cli, store_name, sub):
    r = cli(sub, store_name, check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip(), "no error message"
    assert not os.path.exists(store_files(store_name)[0])


def test_invalid_name_is_an_error(cli):
    r = cli("stats", "bad/name", check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr


@pytest.mark.limit(150)
def test_demo_runs_and_cleans_up(cli_base):
    before = set(shm_files(""))
    p = subprocess.Popen(cli_base + ["demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, f"rc={p.returncode}\n{out}\n{err}"
    assert out.strip()
    assert "Traceback" not in err
    # the demo reports a saving
    assert "dedup" in out.lower() or "saved" in out.lower()
    # nothing of the demo's is left (other runs on the machine may add files
    # meanwhile: only look at names that carry the demo process's pid)
    left = sorted(f for f in set(shm_files("")) - before if str(p.pid) in f)
    assert left == [], f"demo left files: {left}"
