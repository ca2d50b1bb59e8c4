"""Seeing what a store does: `dedupshm top` (in a pseudo-terminal and piped),
`record` + `plot`, `serve-metrics` (Prometheus), `put`/`get`, `demo --record`.

Every command runs as a real subprocess against a real store in /dev/shm."""
import contextlib
import csv
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pexpect
import pytest

from dedupshm.cli import human_bytes
from helpers import MiB, digest, rand_array, wait_for

CMD = [sys.executable, "-m", "dedupshm"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def unique_name():
    return f"tl{os.getpid()}-{uuid.uuid4().hex[:8]}"


def run(*args, timeout=30, check=True, env=None):
    r = subprocess.run(CMD + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, f"{args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def filled(make_store):
    """A store holding deduplicated data: (store, name)."""
    name = unique_name()
    s = make_store(name, capacity="256MiB")
    a = rand_array(8 * MiB, 1)
    s["alpha-key"] = a
    s["beta-key"] = a                      # same pages: dedup ratio 2
    s["gamma-key"] = rand_array(2 * MiB, 2)
    s["small-key"] = {"x": 1}
    return s, name


@pytest.fixture
def spawned():
    """pexpect children, force-terminated at teardown."""
    children = []
    yield children
    for c in children:
        if c.isalive():
            c.terminate(force=True)


def _spawn(spawned, args, rows=40, cols=120):
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
    child = pexpect.spawn(CMD[0], CMD[1:] + list(args), env=env, dimensions=(rows, cols),
                          encoding="utf-8", codec_errors="replace", timeout=10)
    spawned.append(child)
    return child


def _wait_exit(child, deadline=5.0):
    child.expect(pexpect.EOF, timeout=deadline)
    child.wait()
    return child.exitstatus, child.signalstatus


# ---------------------------------------------------------------- top

@pytest.mark.limit(40)
def test_top_live_in_a_terminal_refreshes_and_quits_on_q(filled, spawned):
    s, name = filled
    st = s.stats()
    child = _spawn(spawned, ["top", name, "--interval", "0.2"])
    # the frame: figures of this store
    child.expect_exact(name)
    child.expect_exact(human_bytes(st["logical_bytes"]))          # logical
    child.expect_exact(human_bytes(st["physical_bytes"]))         # physical
    child.expect_exact(f"{st['dedup_ratio']:.2f}x")
    child.expect_exact(f"{st['pages_shared']:,}")
    child.expect_exact("scan rate")
    child.expect_exact(str(os.getpid()))                           # this process is attached
    child.expect_exact("alpha-key")                                # largest objects
    child.expect(r"/s|—")                                          # scan rate (a rate or none yet)
    # it refreshes: a value put now shows up
    s["late-key-zz"] = rand_array(4 * MiB, 3)
    child.expect_exact("late-key-zz", timeout=5)
    child.send("q")
    status, sig = _wait_exit(child)
    assert (status, sig) == (0, None)


@pytest.mark.limit(30)
def test_top_quits_on_ctrl_c(filled, spawned):
    s, name = filled
    child = _spawn(spawned, ["top", name, "--interval", "0.2"], rows=24, cols=80)
    child.expect_exact("alpha-key")
    child.sendintr()
    status, sig = _wait_exit(child)
    assert (status, sig) == (0, None)
    assert "Traceback" not in (child.before or "")


# How `top` can be started without a plain foreground Ctrl-C reaching it; the
# shell ignores SIGINT itself (trap), so it stays to report top's exit status.
# - a script's background job: no job control, so `top` starts with SIGINT
#   ignored and stdin from /dev/null, in the terminal's foreground group;
# - setsid: a session of its own, the terminal is not its controlling one
#   (the terminal's Ctrl-C signals another process group).
_STARTS = {
    "background_job": ('trap "" INT; "$0" -m dedupshm top "$1" --interval 0.2 & pid=$!; '
                       'wait $pid; echo "top-exit=$?"; sleep 2'),
    "setsid": ('trap "" INT; setsid -w "$0" -m dedupshm top "$1" --interval 0.2; '
               'echo "top-exit=$?"; sleep 2'),
}


@pytest.mark.limit(30)
@pytest.mark.parametrize("start", sorted(_STARTS))
@pytest.mark.parametrize("key", ["ctrl_c", "q"])
def test_top_started_without_the_terminal_quits(filled, spawned, start, key):
    s, name = filled
    if start == "setsid" and shutil.which("setsid") is None:
        pytest.skip("no setsid(1) here")
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="80", LINES="24")
    child = pexpect.spawn("sh", ["-c", _STARTS[start], sys.executable, name], env=env,
                          dimensions=(24, 80), encoding="utf-8", codec_errors="replace",
                          timeout=10)
    spawned.append(child)
    try:
        child.expect_exact("alpha-key")
        if key == "q":
            child.send("q")
        else:
            child.sendintr()
        child.expect(r"top-exit=(\d+)", timeout=5)
        assert child.match.group(1) == "0"
        assert "Traceback" not in (child.before or "")
    finally:
        # a `top` that did not quit is outside the pty's session: it is
        # attached to the store, so the store names it
        for c in s.clients():
            if c["pid"] != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c["pid"], signal.SIGKILL)


@pytest.mark.limit(30)
def test_top_piped_prints_plain_lines(filled, procs):
    s, name = filled
    p = procs.add(subprocess.Popen(CMD + ["top", name, "--interval", "0.2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    lines = []
    deadline = time.monotonic() + 15
    while len(lines) < 3 and time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], 1.0)
        if r:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
    assert len(lines) == 3, (lines, p.poll())
    st = s.stats()
    for line in lines:
        assert "\x1b" not in line                              # no escape codes
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        assert int(fields["logical"]) == st["logical_bytes"]
        assert int(fields["physical"]) == st["physical_bytes"]
        assert int(fields["objects"]) == st["objects"]
        assert int(fields["shared"]) == st["pages_shared"]
        assert float(fields["ratio"]) == pytest.approx(st["dedup_ratio"], abs=0.01)
    assert fields["scan/s"] != "-"                             # rates from the 2nd line on
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0


@pytest.mark.limit(30)
def test_top_once_prints_one_frame(filled, spawned):
    s, name = filled
    st = s.stats()
    child = _spawn(spawned, ["top", name, "--once", "--interval", "0.1"], rows=40, cols=100)
    status, sig = _wait_exit(child, deadline=15)
    assert (status, sig) == (0, None)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)
    assert name in out
    assert human_bytes(st["logical_bytes"]) in out
    # what dedup saved, said so (the merger's saving is its own figure)
    assert "dedup saved" in out and "merge saved" in out
    assert human_bytes(st["logical_bytes"] - st["physical_bytes"]) in out
    assert f"{st['dedup_ratio']:.2f}x" in out
    for word in ("shared", "sharing", "unshared", "volatile", "scan rate", "CPU"):
        assert word in out, word
    assert str(os.getpid()) in out
    # largest objects first
    assert out.index("alpha-key") < out.index("small-key")
    assert max(len(line) for line in out.splitlines()) <= 100


def test_top_once_piped_prints_one_plain_line(filled):
    s, name = filled
    st = s.stats()
    r = run("top", name, "--once", "--interval", "0.1")
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and "\x1b" not in r.stdout and "─" not in r.stdout
    fields = dict(kv.split("=", 1) for kv in lines[0].split()[1:])
    assert int(fields["logical"]) == st["logical_bytes"]
    assert int(fields["physical"]) == st["physical_bytes"]
    assert int(fields["keys"]) == st["keys"]
    assert int(fields["processes"]) == 1          # this test's process, not the viewer


def test_top_missing_store_is_an_error():
    r = run("top", unique_name(), "--once", check=False)
    assert r.returncode == 1
    assert "no store named" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- record + plot

def _lines(path):
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


@pytest.mark.limit(40)
def test_record_csv_then_plot(make_store, tmp_path, procs):
    name = unique_name()
    s = make_store(name, capacity="256MiB")
    base = rand_array(4 * MiB, 7)
    s["base"] = base
    # merger activity: this process's mergeable copy of a stored value
    m = s.mergeable(base.nbytes)
    np.frombuffer(m, dtype=np.uint8)[:] = base
    s.merger.start(target_scan_s=0.05)
    out = tmp_path / "rec.csv"
    p = procs.add(subprocess.Popen(CMD + ["record", name, "--out", str(out), "--interval", "0.1",
                                          "--duration", "1.2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    wait_for(lambda: _lines(out) >= 3, timeout=10, msg="first samples")   # header + 2
    s["added"] = rand_array(2 * MiB, 8)                         # logical grows mid-record
    o, e = p.communicate(timeout=15)
    assert p.returncode == 0, e
    s.merger.stop()
    assert "Traceback" not in e
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert 5 <= len(rows) <= 13, len(rows)      # 1.2 s at 0.1 s: 13 (fewer on a busy machine)
    assert f"recorded {len(rows)} samples" in o
    for field in ("time", "elapsed", "logical_bytes", "physical_bytes", "dedup_ratio",
                  "objects", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                  "pages_merged", "pages_scanned", "merger_cpu_seconds", "full_scans",
                  "store_file_bytes", "shmem_bytes"):
        assert field in rows[0], field
    t = [float(r["time"]) for r in rows]
    el = [float(r["elapsed"]) for r in rows]
    assert t == sorted(t) and el == sorted(el)
    assert 1.1 <= el[-1] < 5
    assert int(rows[0]["logical_bytes"]) == 4 * MiB
    assert int(rows[-1]["logical_bytes"]) == 6 * MiB
    assert int(rows[-1]["pages_merged"]) > 0
    assert int(rows[-1]["pages_scanned"]) >= int(rows[0]["pages_scanned"]) > 0
    assert int(rows[-1]["store_file_bytes"]) >= int(rows[-1]["physical_bytes"])
    st = s.stats()
    assert int(rows[-1]["objects"]) == st["objects"]
    assert int(rows[-1]["physical_bytes"]) == st["physical_bytes"]

    png = tmp_path / "rec.png"
    r = run("plot", str(out), "--out", str(png))
    assert f"plotted {len(rows)} samples" in r.stdout
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and 10_000 < len(data) < 400_000
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[1] > 600
    assert img.shape[0] > 700                                   # memory and merger panels
    assert img[..., :3].std() > 0.05                            # not a blank canvas
    del m


def test_record_jsonl_count(filled, tmp_path):
    s, name = filled
    out = tmp_path / "rec.jsonl"
    run("record", name, "--out", str(out), "--interval", "0.05", "--count", "3")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    st = s.stats()
    for row in rows:
        for k in ("objects", "logical_bytes", "physical_bytes", "pages_shared", "pages_sharing",
                  "full_scans", "pages_scanned"):
            assert row[k] == st[k], k
        assert row["dedup_ratio"] == pytest.approx(st["dedup_ratio"])
        assert isinstance(row["time"], float)


def test_record_and_plot_errors(filled, tmp_path):
    s, name = filled
    r = run("record", name, "--out", str(tmp_path / "x.txt"), "--count", "1", check=False)
    assert r.returncode == 2 and ".csv or .jsonl" in r.stderr
    r = run("record", name, "--out", str(tmp_path / "x.csv"), "--count", "1", "--duration", "1",
            check=False)
    assert r.returncode == 2                                    # mutually exclusive
    r = run("plot", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x.png"), check=False)
    assert r.returncode == 1 and "cannot read" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.limit(60)
def test_demo_record_writes_a_plottable_record(tmp_path):
    out = tmp_path / "demo.jsonl"
    r = run("demo", "--workers", "2", "--mib", "8", "--record", str(out), timeout=60)
    assert "saved" in r.stdout and "recorded" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 2
    assert rows[-1]["logical_bytes"] > rows[-1]["physical_bytes"] > 0     # dedup happened
    assert rows[-1]["logical_bytes"] >= rows[0]["logical_bytes"]
    png = tmp_path / "demo.png"
    run("plot", str(out), "--out", str(png))
    assert png.read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------- Prometheus

def _start_metrics(procs, *names):
    p = procs.add(subprocess.Popen(CMD + ["serve-metrics", *names, "--port", "0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    r, _, _ = select.select([p.stdout], [], [], 15)
    assert r, "serve-metrics printed no address"
    line = p.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
    assert m, (line, p.poll())
    return p, f"http://127.0.0.1:{m.group(1)}/metrics"


def _scrape(url):
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    types = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for smp in fam.samples:
            samples[(smp.name, smp.labels.get("store"))] = smp.value
    return samples, types


@pytest.mark.limit(40)
def test_serve_metrics_matches_stats(filled, make_store, procs):
    s, name = filled
    other_name = unique_name()
    other = make_store(other_name, capacity="64MiB")
    other["one"] = b"x" * 10000
    p, url = _start_metrics(procs, name, other_name)
    samples, types = _scrape(url)
    st = s.stats()
    gauges = {"dedupshm_logical_bytes": "logical_bytes", "dedupshm_physical_bytes": "physical_bytes",
              "dedupshm_pages_shared": "pages_shared", "dedupshm_pages_sharing": "pages_sharing",
              "dedupshm_pages_unshared": "pages_unshared", "dedupshm_pages_volatile": "pages_volatile",
              "dedupshm_pages_merged": "pages_merged", "dedupshm_objects": "objects",
              "dedupshm_keys": "keys", "dedupshm_capacity_bytes": "capacity",
              "dedupshm_clients": "clients", "dedupshm_dedup_ratio": "dedup_ratio"}
    counters = {"dedupshm_full_scans": "full_scans", "dedupshm_pages_scanned": "pages_scanned",
                "dedupshm_merger_cpu_seconds": "merger_cpu_seconds",
                "dedupshm_recoveries": "recoveries"}
    for metric, key in gauges.items():
        assert types[metric] == "gauge", metric
        assert samples[(metric, name)] == pytest.approx(st[key]), metric
    for metric, key in counters.items():
        assert types[metric] == "counter", metric
        assert samples[(metric + "_total", name)] == pytest.approx(st[key]), metric
    assert samples[("dedupshm_up", name)] == 1
    assert st["clients"] == 2                     # this process and the exporter
    ost = other.stats()
    assert samples[("dedupshm_objects", other_name)] == ost["objects"] == 1
    assert samples[("dedupshm_logical_bytes", other_name)] == ost["logical_bytes"]
    # every scrape reads the stats afresh
    s["fresh-key"] = rand_array(3 * MiB, 9)
    samples, _ = _scrape(url)
    st = s.stats()
    assert samples[("dedupshm_logical_bytes", name)] == st["logical_bytes"]
    assert samples[("dedupshm_objects", name)] == st["objects"] == 5
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0


def test_serve_metrics_binds_loopback_by_default():
    from dedupshm.cli import build_parser
    args = build_parser().parse_args(["serve-metrics", "x"])
    assert args.host == "127.0.0.1"


# ---------------------------------------------------------------- put / get

@pytest.mark.limit(40)
def test_put_get_roundtrip_20mib(make_store, tmp_path):
    name = unique_name()
    s = make_store(name, capacity="256MiB")
    src = tmp_path / "blob.bin"
    data = rand_array(20 * MiB, 11)
    data.tofile(src)
    r = run("put", name, "blob", str(src))
    assert r.stderr == ""                                        # not a terminal: no progress bar
    assert "20.0 MiB" in r.stdout
    assert digest(s["blob"]) == digest(data)
    phys = s.stats()["physical_bytes"]
    r = run("put", name, "blob-again", str(src))                 # same bytes: no new pages
    assert s.stats()["physical_bytes"] == phys
    assert "grew by 0 B" in r.stdout
    dst = tmp_path / "out.bin"
    r = run("get", name, "blob", "--out", str(dst))
    assert r.stderr == ""
    assert dst.stat().st_size == 20 * MiB
    assert digest(dst.read_bytes()) == digest(data)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []   # no temp file left
    # an array comes out as its raw bytes
    s["arr"] = np.arange(1000, dtype=np.int32)
    run("get", name, "arr", "--out", str(dst))
    assert np.array_equal(np.fromfile(dst, dtype=np.int32), np.arange(1000))
    # errors
    r = run("get", name, "no-such-key", "--out", str(dst), check=False)
    assert r.returncode == 1 and "no key" in r.stderr and "Traceback" not in r.stderr
    r = run("put", name, "k", str(tmp_path / "missing"), check=False)
    assert r.returncode == 1 and "cannot read" in r.stderr
    s["obj"] = {"a": 1}
    r = run("get", name, "obj", check=False)
    assert r.returncode == 1 and "dict" in r.stderr
    assert s.check().errors == []                               # the CLI left a sound store


def test_put_into_a_full_store_is_an_error(make_store, tmp_path):
    name = unique_name()
    s = make_store(name, capacity="4MiB")
    src = tmp_path / "big.bin"
    rand_array(6 * MiB, 13).tofile(src)
    r = run("put", name, "big", str(src), check=False)
    assert r.returncode == 1 and "full" in r.stderr and "Traceback" not in r.stderr
    assert "big" not in s
    assert s.stats()["physical_bytes"] == 0


def test_put_small_file_and_stdout(make_store, tmp_path):
    name = unique_name()
    s = make_store(name, capacity="64MiB")
    src = tmp_path / "small.txt"
    src.write_bytes(b"hello dedupshm\n")
    run("put", name, "greeting", str(src))
    assert bytes(s["greeting"]) == b"hello dedupshm\n"
    assert s.stats()["small_bytes"] > 0                          # packed, not a whole page
    r = subprocess.run(CMD + ["get", name, "greeting"], capture_output=True, timeout=30)
    assert r.returncode == 0 and r.stdout == b"hello dedupshm\n"


@pytest.mark.limit(40)
def test_put_shows_progress_on_a_terminal(make_store, tmp_path, spawned):
    name = unique_name()
    s = make_store(name, capacity="256MiB")
    src = tmp_path / "blob.bin"
    rand_array(20 * MiB, 12).tofile(src)
    child = _spawn(spawned, ["put", name, "blob", str(src)], rows=10, cols=100)
    child.expect_exact("20.0/20.0 MiB")                          # the rich progress bar
    child.expect_exact("stored 'blob'")
    status, sig = _wait_exit(child)
    assert (status, sig) == (0, None)
    assert s.stats()["logical_bytes"] == 20 * MiB
