"""Fork campaign: a process forks at random instants while its threads work
on one store -- puts, gets and deletes (keyed and by ObjectRef, small and
large values), create()/commit, the merger scanning mergeable memory that
another thread keeps rewriting, gc(), and attaching/closing Store handles --
in either write-protection mode of the merger.

Before each fork the main thread holds views (``get`` results, keyed and by
ObjectRef, small (< 2 KiB) and large values, some of them deleted already)
and knows what their bytes must be.  After the fork:

  * the parent deletes those objects, drops its views and puts other values
    of the same sizes (so their pages and chunks get reused), then tells
    the child;
  * the child checks every inherited view is byte-exact, keeps checking
    while the parent does the above, and once more after it (issue 9,
    item 1), then drops its views, checks and rewrites its inherited
    mergeable memory (a fork inside a merge window must not leave pages
    protected: item 7), attaches, puts, gets and deletes, and exits 0.

Each child has a deadline (counted from the parent's "reused" message);
past it, it is SIGKILLed and counted as a hang.  Counted: forks, ok, hangs,
wrong_bytes (children that saw a changed view or mergeable page; also the
number of bad views), crashes (child killed by a signal), child_errors
(exceptions), and in the parent: wrong bytes read by its threads, thread
errors.  At the end: gc(), check() clean, everything deleted -> no object
left.

    python tests/fork_campaign.py --forks 500 --mode both      # the campaign
    python tests/fork_campaign.py --forks 100 --seed 1 --json  # CI round, per mode

The mprotect mode is the merger's fallback (no userfaultfd): it runs with
DEDUPSHM_NO_UFFD=1 in the environment of a subprocess; every mode runs in a
subprocess of its own (the write-protection mode is fixed per process).
Exit status 0 only if every mode was clean.
"""
import argparse
import gc
import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np

PAGE = 4096
SMALL_SIZES = [40, 333, 1000, 1900]                   # small-value path (< 2 KiB)
LARGE_SIZES = [2500, 3 * PAGE + 5, 64 * 1024, 1 << 20, 3 << 20]
MERGE_PAGES = 1024                                     # mergeable memory per process (4 MiB)
TEMPLATES = 6                                         # distinct page contents written there
HOLD_DEADLINE = 5.0                                   # default child deadline (s)


# ---------------------------------------------------------------- values

def value_for(vseed, size):
    """The bytes of a value follow from (vseed, size): any view can be verified."""
    rng = np.random.default_rng(vseed)
    v = rng.integers(0, 256, size, dtype=np.uint8)
    if vseed % 4 == 0 and size > 2 * PAGE:
        v[: size // 2] = 0                            # zero pages
    if vseed % 5 == 0 and size > 2 * PAGE:
        v = np.resize(v[:PAGE], size)                 # repeated pages
    return v


def payload(vseed, size):
    """Small values go in as bytes (memoryview back), large ones as arrays."""
    v = value_for(vseed, size)
    return v.tobytes() if size < 2048 else v


def digest(view):
    """Digest of the bytes a view shows (memoryview or ndarray)."""
    a = np.asarray(view)
    a = a.view(np.uint8).reshape(-1) if a.dtype != np.uint8 or a.ndim != 1 else a
    return hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def expected_digest(vseed, size):
    return hashlib.blake2b(value_for(vseed, size).tobytes(), digest_size=16).hexdigest()


def template_page(t):
    """Content of mergeable page template t (0 = zero page)."""
    if t == 0:
        return np.zeros(PAGE, np.uint8)
    return np.frombuffer(hashlib.shake_128(b"tmpl%d" % t).digest(PAGE), np.uint8)


TEMPLATE_PAGES = [template_page(t) for t in range(TEMPLATES)]


# ---------------------------------------------------------------- the parent's threads

class Shared:
    """State of one campaign process (the parent); the children inherit it."""

    def __init__(self, s, name_b, seed, zero_writes=True):
        self.s = s
        self.name_b = name_b
        self.stop = threading.Event()
        self.errors = []               # (thread, message): exceptions in threads
        self.wrong = []                # wrong bytes seen by the parent's threads
        self.ops = {}
        self.lock = threading.Lock()
        self.seed = seed
        # template 0 is the zero page: writing zeros over a merged page is
        # a case of its own (--no-zero-writes leaves it out)
        self.first_template = 0 if zero_writes else 1
        self.held = []                 # the workers' lists of (key or ref, vseed, size)
        self.in_scan = False           # the merger thread is inside scan()
        # the templates live in the store too, so mergeable pages that hold
        # one merge onto its pool page at first sight
        s.put(np.concatenate(TEMPLATE_PAGES), key="templates")
        self.m = s.mergeable_array(MERGE_PAGES * PAGE, np.uint8).reshape(MERGE_PAGES, PAGE)
        # shadow[i] = template written to mergeable page i (-1 while being written)
        self.shadow = np.zeros(MERGE_PAGES, np.int64)
        if not zero_writes:
            for i in range(MERGE_PAGES):
                self.m[i, :] = TEMPLATE_PAGES[1]
                self.shadow[i] = 1

    def count(self, what, n=1):
        with self.lock:
            self.ops[what] = self.ops.get(what, 0) + n

    def error(self, who, e):
        with self.lock:
            if len(self.errors) < 20:
                self.errors.append(f"{who}: {e!r}")
            self.ops["thread_errors"] = self.ops.get("thread_errors", 0) + 1

    def bad(self, msg):
        with self.lock:
            if len(self.wrong) < 20:
                self.wrong.append(msg)
            self.ops["parent_wrong_bytes"] = self.ops.get("parent_wrong_bytes", 0) + 1


def loop(sh, who, body):
    """Run body(rng) until stop; record exceptions and go on."""
    rng = random.Random(f"{sh.seed}-{who}")
    while not sh.stop.is_set():
        try:
            body(rng)
        except Exception as e:        # noqa: BLE001 - counted and reported
            sh.error(who, e)
            time.sleep(0.01)


def worker_body(sh, wid):
    s = sh.s
    mine = []                          # keys and refs of this thread
    sh.held.append(mine)

    def body(rng):
        op = rng.random()
        if op < 0.4 or len(mine) < 4:
            vseed = rng.randrange(1 << 30)
            size = rng.choice(SMALL_SIZES + LARGE_SIZES)
            if rng.random() < 0.5:
                key = f"w{wid}-{vseed}-{size}"
                if size >= 2048 and rng.random() < 0.2:
                    with s.create(key, size) as buf:
                        buf[:] = value_for(vseed, size).tobytes()
                    sh.count("create")
                else:
                    s.put(payload(vseed, size), key=key)
                mine.append((key, vseed, size))
            else:
                mine.append((s.put(payload(vseed, size)), vseed, size))
            sh.count("put")
            if len(mine) > 24:
                op = 0.5                              # make room
        if 0.4 <= op < 0.65 and mine:
            h, _, _ = mine.pop(rng.randrange(len(mine)))
            s.delete(h)
            sh.count("delete")
        elif op >= 0.65 and mine:
            h, vseed, size = rng.choice(mine)
            v = s.get(h)
            if digest(v) != expected_digest(vseed, size):
                sh.bad(f"worker {wid}: get({h!r}) size {size} wrong bytes")
            del v
            if rng.random() < 0.1:
                # replace a keyed value in place (concurrent replacement)
                key = f"w{wid}-r-{rng.randrange(4)}"
                vs = rng.randrange(1 << 30)
                s.put(payload(vs, 1000), key=key)
            sh.count("get")

    return body


def writer_body(sh):
    """Rewrites mergeable pages with templates (duplicates for the merger)
    and checks every write reads back (no write lost, none changed)."""
    m, shadow = sh.m, sh.shadow

    def body(rng):
        for _ in range(32):
            i = rng.randrange(MERGE_PAGES)
            t = rng.randrange(sh.first_template, TEMPLATES)
            shadow[i] = -1
            m[i, :] = TEMPLATE_PAGES[t]
            if not np.array_equal(m[i], TEMPLATE_PAGES[t]):
                sh.bad(f"mergeable page {i}: write of template {t} did not read back")
            shadow[i] = t
        for i in range(MERGE_PAGES):
            t = shadow[i]
            if t >= 0 and not np.array_equal(m[i], TEMPLATE_PAGES[t]):
                sh.bad(f"mergeable page {i}: holds wrong bytes (template {t} expected)")
        sh.count("mergeable_writes", 32)
        time.sleep(rng.random() * 0.002)

    return body


def merger_body(sh):
    s = sh.s

    def body(rng):
        sh.in_scan = True
        try:
            merged = s.merger.scan()
        finally:
            sh.in_scan = False
        sh.count("merged_pages", merged)
        sh.count("merge_scans")
        time.sleep(rng.random() * 0.003)

    return body


def gc_body(sh):
    s = sh.s

    def body(rng):
        s.gc()
        s.stats()
        sh.count("gc")
        time.sleep(rng.random() * 0.005)

    return body


def attach_body(sh):
    """Attach a second store, use it, close and drop the handle (so the
    process really detaches and attaches again); attach to the main store
    by name too."""
    import dedupshm

    def body(rng):
        b = dedupshm.Store(sh.name_b)
        vseed = rng.randrange(1 << 30)
        r = b.put(payload(vseed, 700))
        if digest(b.get(r)) != expected_digest(vseed, 700):
            sh.bad("attach thread: store B get wrong bytes")
        b.delete(r)
        del r
        b.close()
        del b
        a = dedupshm.Store(sh.s.name)
        a.stats()
        a.close()
        del a
        gc.collect()
        sh.count("attach_close")
        time.sleep(rng.random() * 0.003)

    return body


# ---------------------------------------------------------------- held views and the child

def take_views(sh, rng, tag):
    """Put values and take views of them, as the issue's hand-offs do.

    Returns (views, handles): views = [(label, view, vseed, size)];
    handles = what the parent deletes after the fork."""
    s = sh.s
    views, handles = [], []
    for j in range(rng.randint(3, 6)):
        size = rng.choice(SMALL_SIZES) if j % 2 == 0 else rng.choice(LARGE_SIZES)
        vseed = rng.randrange(1 << 30)
        keyed = rng.random() < 0.5
        if keyed:
            key = f"h{tag}-{j}-{vseed}-{size}"
            s.put(payload(vseed, size), key=key)
            v = s[key]
            h = key
        else:
            h = s.put(payload(vseed, size))
            v = s.get(h)
        label = f"{'key' if keyed else 'ref'} size={size}"
        if digest(v) != expected_digest(vseed, size):
            sh.bad(f"held view {label}: wrong bytes before the fork")
        if rng.random() < 0.4:
            # v = s.get(ref); s.delete(ref); fork()  (deleted before the fork)
            s.delete(h)
            label += " deleted-before-fork"
        else:
            handles.append(h)
        views.append((label, v, vseed, size))
    return views, handles


def child_main(sh, views, rd, wr, vwr, name, rng):
    """The forked child.  Exit 0 clean, 3 wrong bytes, 4 exception.
    Reports a JSON line on wr."""
    import dedupshm
    report = {"bad": [], "phase": "start"}
    code = 0

    def phase(p):
        report["phase"] = p
        try:
            os.write(wr, f"phase {p}\n".encode())
        except OSError:
            pass

    try:
        expect = [(label, v, expected_digest(vseed, size)) for label, v, vseed, size in views]

        def verify(when):
            for label, v, d in expect:
                if digest(v) != d and f"{label} ({when})" not in report["bad"]:
                    report["bad"].append(f"{label} ({when})")

        phase("verify-inherited")
        verify("at fork")
        try:
            os.write(vwr, b"V")        # the parent may wait for this before letting go
        except OSError:
            pass                       # it did not wait
        # keep checking while the parent deletes, drops and reuses
        done = False
        t_end = time.monotonic() + 30
        while not done and time.monotonic() < t_end:
            verify("during parent's reuse")
            r, _, _ = select.select([rd], [], [], 0.002)
            if r:
                done = os.read(rd, 1) == b"R"
                break
        time.sleep(0.002)
        verify("after parent's reuse")
        phase("drop-views")
        expect.clear()
        views.clear()
        gc.collect()
        # inherited mergeable memory: the pages whose template is known must
        # read right, and every page must take a write
        phase("mergeable")
        m, shadow = sh.m, sh.shadow
        for i in range(MERGE_PAGES):
            t = shadow[i]
            if t >= 0 and not np.array_equal(m[i], TEMPLATE_PAGES[t]):
                report["bad"].append(f"mergeable page {i} (inherited)")
        for i in range(MERGE_PAGES):
            t = rng.randrange(sh.first_template, TEMPLATES)
            m[i, :] = TEMPLATE_PAGES[t]
            if not np.array_equal(m[i], TEMPLATE_PAGES[t]):
                report["bad"].append(f"mergeable page {i} (child's write)")
        phase("attach")
        s2 = dedupshm.Store(name)
        phase("put-get")
        for size in (rng.choice(SMALL_SIZES), rng.choice(LARGE_SIZES)):
            vseed = rng.randrange(1 << 30)
            key = f"c{os.getpid()}-{vseed}-{size}"
            s2.put(payload(vseed, size), key=key)
            if digest(s2[key]) != expected_digest(vseed, size):
                report["bad"].append(f"child's own put size={size}")
            del s2[key]
        phase("store-b")
        b = dedupshm.Store(sh.name_b)
        r = b.put(b"x" * 100)
        b.delete(r)
        del r
        b.close()
        s2.close()
        phase("exit")
        if report["bad"]:
            code = 3
    except BaseException as e:        # noqa: BLE001 - reported to the parent
        report["error"] = f"{report['phase']}: {e!r}"
        code = 4
    try:
        os.write(wr, (json.dumps(report) + "\n").encode())
    except OSError:
        pass
    os._exit(code)


def reap(pid, deadline):
    """Wait for pid until deadline (monotonic); SIGKILL it past that.
    Returns (status, hung)."""
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status, False
        if time.monotonic() > deadline:
            reap.last_state = proc_state(pid)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return status, True
        time.sleep(0.002)


def read_report(fd):
    chunks = []
    while True:
        r, _, _ = select.select([fd], [], [], 0)
        if not r:
            break
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    text = b"".join(chunks).decode(errors="replace").strip()
    if not text:
        return None
    lines = text.splitlines()
    if lines[-1].startswith("phase "):
        return {"phase": lines[-1][6:]}          # it got no further
    try:
        return json.loads(lines[-1])
    except ValueError:
        return {"error": f"unreadable report {text[-200:]!r}"}


def proc_state(pid):
    """'state wchan' of a process, e.g. 'R 0' (spinning) or 'S futex_wait...'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip() or "0"
        return f"{state} {wchan}"
    except OSError:
        return "?"


# ---------------------------------------------------------------- one mode, in this process

def run_here(forks, seed=0, deadline=HOLD_DEADLINE, workers=2, verbose=False, control=False,
             zero_writes=True):
    """Run the campaign in this process (its write-protection mode is this
    process's: set DEDUPSHM_NO_UFFD before the first merge for mprotect).

    control=True: the parent keeps its views and objects until the child
    has exited (no reuse under the child) -- a check of the campaign itself."""
    import dedupshm
    warnings.simplefilter("ignore", DeprecationWarning)   # fork with threads: that is the point
    rng = random.Random(seed)
    name = f"forkc-{os.getpid()}-{seed}"
    name_b = name + "-b"
    s = dedupshm.Store(name, create=True, capacity="512MiB")
    sb = dedupshm.Store(name_b, create=True, capacity="64MiB")
    res = {"mode": dedupshm.merger.wp_mode(), "forks": 0, "ok": 0, "hangs": 0,
           "wrong_bytes": 0, "bad_views": 0, "crashes": 0, "child_errors": 0, "waited_for_child": 0,
           "children_bad_views": 0, "children_bad_mergeable": 0, "bad_mergeable_pages": 0,
           "forks_in_scan": 0,
           "examples": {}}
    hang_phases = {}
    t0 = time.monotonic()

    def example(kind, msg):
        ex = res["examples"].setdefault(kind, [])
        if len(ex) < 4:
            ex.append(msg)
    sh = Shared(s, name_b, seed, zero_writes)
    threads = [threading.Thread(target=loop, args=(sh, f"worker{w}", worker_body(sh, w)), daemon=True)
               for w in range(workers)]
    threads += [threading.Thread(target=loop, args=(sh, n, f(sh)), daemon=True)
                for n, f in (("writer", writer_body), ("merger", merger_body),
                             ("gc", gc_body), ("attach", attach_body))]
    for t in threads:
        t.start()
    try:
        for i in range(forks):
            try:
                views, handles = take_views(sh, rng, i)
            except Exception as e:     # noqa: BLE001 - counted; fork anyway with none
                sh.error("main: take_views", e)
                views, handles = [], []
            rd, wr = os.pipe()              # parent -> child: "R" = reused
            rrd, rwr = os.pipe()            # child -> parent: JSON report
            vrd, vwr = os.pipe()            # child -> parent: "V" = checked at fork
            if rng.random() < 0.5:
                time.sleep(rng.random() * 0.004)     # a random instant of the threads' work
            else:
                # an instant inside a merge scan (where pages are write-protected)
                end = time.monotonic() + 0.05
                while not sh.in_scan and time.monotonic() < end:
                    time.sleep(0)              # let the merger thread have the GIL
                end = time.perf_counter() + rng.random() * 0.0003
                while time.perf_counter() < end:
                    pass
                res["forks_in_scan"] += sh.in_scan
            child_rng = random.Random(rng.randrange(1 << 30))
            pid = os.fork()
            if pid == 0:
                os.close(wr)
                os.close(rrd)
                os.close(vrd)
                child_main(sh, views, rd, rwr, vwr, name, child_rng)   # never returns
            os.close(rd)
            os.close(rwr)
            os.close(vwr)
            res["forks"] += 1
            # half the time wait until the child checked its views at fork
            # (or give up); else let go at once, racing the child's start
            if rng.random() < 0.5:
                select.select([vrd], [], [], deadline)
                res["waited_for_child"] += 1
            os.close(vrd)
            if control:
                # control run: hold everything until the child is done
                try:
                    os.write(wr, b"R")
                except OSError:
                    pass
                status, hung = reap(pid, time.monotonic() + deadline)
            # the parent lets go of everything the child inherited, and reuses it
            try:
                for h in handles:
                    try:
                        s.delete(h)
                    except KeyError:
                        pass
                h = None                   # the loop variable held the last ref
                sizes = [size for _, _, _, size in views]
                del views, handles
                gc.collect()
                for size in sizes:
                    r = s.put(payload(rng.randrange(1 << 30), size))
                    del r
            except Exception as e:     # noqa: BLE001
                sh.error("main", e)
            if not control:
                try:
                    os.write(wr, b"R")
                except OSError:
                    pass               # the child is gone already
                status, hung = reap(pid, time.monotonic() + deadline)
            rep = read_report(rrd)
            os.close(wr)
            os.close(rrd)
            if hung:
                res["hangs"] += 1
                ph = (rep or {}).get("phase", "?") if rep else "before its first check"
                hang_phases[ph] = hang_phases.get(ph, 0) + 1
                example(f"hang in {ph}", f"fork {i}: state {getattr(reap, 'last_state', '?')}")
            elif os.WIFSIGNALED(status):
                res["crashes"] += 1
                example("crash", f"fork {i}: child killed by signal {os.WTERMSIG(status)}")
            else:
                code = os.WEXITSTATUS(status)
                if code == 0:
                    res["ok"] += 1
                elif code == 3:
                    res["wrong_bytes"] += 1
                    bad = (rep or {}).get("bad", [])
                    nm = sum(1 for b in bad if b.startswith("mergeable"))
                    res["bad_views"] += len(bad) - nm
                    res["bad_mergeable_pages"] += nm
                    res["children_bad_views"] += len(bad) > nm
                    res["children_bad_mergeable"] += nm > 0
                    views = [b for b in bad if not b.startswith("mergeable")]
                    if views:
                        example("wrong held views", f"fork {i}: {views[:4]}")
                    if nm:
                        example("wrong mergeable pages", f"fork {i}: {bad[-1]} and {nm - 1} more")
                else:
                    res["child_errors"] += 1
                    example("child error", f"fork {i}: exit {code}: {(rep or {}).get('error')}")
            if verbose and (i + 1) % 20 == 0:
                print(f"[{res['mode']}] {i + 1}/{forks} forks: ok {res['ok']} hangs {res['hangs']} "
                      f"wrong {res['wrong_bytes']} crashes {res['crashes']} "
                      f"errors {res['child_errors']}", file=sys.stderr, flush=True)
    finally:
        sh.stop.set()
        for t in threads:
            t.join(timeout=30)
        stuck = [t.name for t in threads if t.is_alive()]
    res["hang_phases"] = hang_phases
    res["stuck_threads"] = len(stuck)
    res["parent_wrong_bytes"] = sh.ops.pop("parent_wrong_bytes", 0)
    res["thread_errors"] = sh.ops.pop("thread_errors", 0)
    res["parent_examples"] = sh.wrong[:6] + sh.errors[:6]
    res["ops"] = dict(sh.ops)
    # the end: everything deleted -> nothing left; gc and check clean
    for mine in sh.held:
        for h, _, _ in mine:
            try:
                s.delete(h)
            except KeyError:
                pass
        mine.clear()
    h = mine = None                    # loop variables hold refs too
    del sh, threads
    for k in s.keys():
        try:
            del s[k]
        except KeyError:
            pass
    left = None
    end = time.monotonic() + 15
    while time.monotonic() < end:
        gc.collect()
        s.gc()
        left = s.stats()["objects"]
        if left == 0:
            break
        time.sleep(0.1)
    rep = s.check()
    res["objects_left"] = left
    if left:
        res["keys_left"] = s.keys()[:10]
        st = s.stats()
        res["stats_left"] = {k: st[k] for k in ("objects", "physical_bytes", "logical_bytes")
                             if k in st}
        res["clients_left"] = [{k: c.get(k) for k in ("pid", "handles")} for c in s.clients()][:10]
        res["my_pid"] = os.getpid()
    res["check_errors"] = list(rep.errors)[:10]
    res["seconds"] = round(time.monotonic() - t0, 1)
    s.unlink()
    sb.unlink()
    s.close()
    sb.close()
    res["clean"] = clean(res)
    return res


def clean(res):
    return (res.get("forks", 0) > 0 and res["ok"] == res["forks"] and res["hangs"] == 0
            and res["wrong_bytes"] == 0 and res["crashes"] == 0 and res["child_errors"] == 0
            and res["parent_wrong_bytes"] == 0 and res["thread_errors"] == 0
            and res["stuck_threads"] == 0 and res["objects_left"] == 0 and not res["check_errors"])


# ---------------------------------------------------------------- one mode, in a subprocess

def run_mode(mode, forks, seed=0, deadline=HOLD_DEADLINE, timeout=None, verbose=False,
             control=False, zero_writes=True):
    """Run one mode ("uffd" or "mprotect") in a subprocess; returns its result
    dict.  A campaign process that does not finish within timeout is killed
    and reported (campaign_hang)."""
    env = dict(os.environ)
    env.pop("DEDUPSHM_NO_UFFD", None)
    if mode == "mprotect":
        env["DEDUPSHM_NO_UFFD"] = "1"
    if timeout is None:
        timeout = 120 + forks * (deadline + 1.0)
    cmd = [sys.executable, os.path.abspath(__file__), "--inner", "--forks", str(forks),
           "--seed", str(seed), "--deadline", str(deadline)]
    if verbose:
        cmd.append("--verbose")
    if control:
        cmd.append("--control")
    if not zero_writes:
        cmd.append("--no-zero-writes")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return {"mode": mode, "clean": False, "campaign_hang": True,
                "error": f"campaign process did not finish within {timeout:.0f}s",
                "stderr_tail": (err or "")[-2000:]}
    for line in reversed((out or "").splitlines()):
        if line.startswith("{"):
            r = json.loads(line)
            r["requested_mode"] = mode
            if mode == "uffd" and r.get("mode") != "userfaultfd":
                r["note"] = "userfaultfd unavailable here: ran the mprotect fallback"
            return r
    return {"mode": mode, "clean": False, "error": f"campaign process exited {p.returncode}",
            "signal": -p.returncode if p.returncode < 0 else None,
            "stderr_tail": (err or "")[-2000:]}


def summary(r):
    if "forks" not in r:
        return f"{r.get('requested_mode', r.get('mode'))}: FAILED to run: {r.get('error')}"
    line = (f"{r['requested_mode']} ({r['mode']}): forks {r['forks']}, ok {r['ok']}, "
            f"hangs {r['hangs']}, wrong bytes {r['wrong_bytes']} (children with bad held views "
            f"{r['children_bad_views']}, with bad mergeable pages {r['children_bad_mergeable']}), "
            f"crashes {r['crashes']}, child errors {r['child_errors']}, "
            f"parent wrong bytes {r['parent_wrong_bytes']}, thread errors {r['thread_errors']}, "
            f"objects left {r['objects_left']}, check errors {len(r['check_errors'])}, "
            f"{r['seconds']}s -> {'CLEAN' if r['clean'] else 'NOT CLEAN'}")
    extra = []
    if r.get("hang_phases"):
        extra.append(f"  hangs by child phase: {r['hang_phases']}")
    for kind, ex in r.get("examples", {}).items():
        extra += [f"  {kind}: {e}" for e in ex]
    extra += [f"  parent: {e}" for e in sorted(set(r.get("parent_examples", [])))[:6]]
    extra += [f"  check: {e}" for e in r.get("check_errors", [])[:3]]
    if r.get("objects_left"):
        extra.append(f"  left: keys {r.get('keys_left')}, {r.get('stats_left')}, clients "
                     f"{r.get('clients_left')} (campaign pid {r.get('my_pid')})")
    return "\n".join([line] + extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forks", type=int, default=200, help="forks per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["uffd", "mprotect", "both"], default="both")
    ap.add_argument("--deadline", type=float, default=HOLD_DEADLINE,
                    help="seconds a child may take after the parent's reuse before it counts as hung")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--verbose", action="store_true", help="progress on stderr")
    ap.add_argument("--control", action="store_true",
                    help="control run: the parent keeps what the child inherited until the child exits")
    ap.add_argument("--no-zero-writes", dest="zero_writes", action="store_false",
                    help="never write zero pages over mergeable memory (isolates that case)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.forks <= 0:
        ap.error("--forks must be positive")
    if a.inner:
        r = run_here(a.forks, a.seed, a.deadline, verbose=a.verbose, control=a.control,
                     zero_writes=a.zero_writes)
        print(json.dumps(r), flush=True)
        return 0 if r["clean"] else 1
    modes = ["uffd", "mprotect"] if a.mode == "both" else [a.mode]
    results = {m: run_mode(m, a.forks, a.seed, a.deadline, verbose=a.verbose, control=a.control,
                           zero_writes=a.zero_writes)
               for m in modes}
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        for m in modes:
            print(summary(results[m]))
    return 0 if all(r.get("clean") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
