"""Serving one torch model from many worker processes, with one copy of its
weights per machine.

Builds a small model in code (an MLP of ~48 MiB, fixed seed), saves it as
a safetensors file, then:

1. gunicorn with 4 workers (no --preload: each worker loads the model
   itself) serves it on 127.0.0.1; a few requests are sent; the workers'
   total Pss is printed -- with every worker loading its own copy
   (``torch.load``), with ``safetensors.torch.load_file`` (which maps the
   file: identical files share the page cache) and with
   ``dedupshm.safetensors.load_file`` (the first worker reads the file into
   the store, the others map it; fine-tunes of one model would share their
   equal pages too, which no file mapping does);
2. a ``multiprocessing`` pool of 4 workers started with "forkserver"
   (Python 3.14's default start method, where fork's copy-on-write cannot
   share anything) runs the same model from the store.

    python examples/serve_model.py [--mib 48] [--workers 4]

This file is also the WSGI app gunicorn runs (``serve_model:app``),
configured by SERVE_MODE (torch.load, safetensors or store), SERVE_MODEL (the file),
SERVE_STORE (the store's name) and SERVE_READY (a directory where each
worker leaves a file once it has loaded the model).
"""
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
DIM = 1024


def make_model(layers):
    import torch
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.ReLU())
                                 for _ in range(layers)])


def layers_for(mib):
    return max(1, mib * MiB // ((DIM * DIM + DIM) * 4))


def load_model(path, mode, store_name):
    """The model with its weights from ``path`` (a .safetensors file with a
    .pt twin): a private copy (torch.load), the file's page cache mapped
    (safetensors), or mapped from the store."""
    import torch
    if mode == "torch.load":
        sd = torch.load(path[:-len(".safetensors")] + ".pt", weights_only=True)
    elif mode == "safetensors":
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        import dedupshm
        import dedupshm.safetensors
        sd = dedupshm.safetensors.load_file(path, dedupshm.Store(store_name))
    with torch.device("meta"):                    # no weights allocated here...
        model = make_model(len(sd) // 2)
    model.load_state_dict(sd, assign=True)        # ...the module takes the loaded tensors
    return model.eval()


def predict(model, seed):
    import torch
    x = torch.sin(torch.arange(DIM, dtype=torch.float32) * (seed + 1)).unsqueeze(0)
    with torch.no_grad():
        return float(model(x).sum())


# ------------------------------------------------------------------ the app

MODEL = None
if os.environ.get("SERVE_MODE"):
    import torch
    torch.set_num_threads(1)
    MODEL = load_model(os.environ["SERVE_MODEL"], os.environ["SERVE_MODE"],
                       os.environ.get("SERVE_STORE"))
    open(os.path.join(os.environ["SERVE_READY"], str(os.getpid())), "w").close()


def app(environ, start_response):
    """GET /?x=N -> {"pid", "y"}: the model's output for input N."""
    n = int((environ.get("QUERY_STRING") or "x=0").partition("=")[2] or 0)
    body = json.dumps({"pid": os.getpid(), "y": predict(MODEL, n)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


# ------------------------------------------------------------------ the runner
# (the process helpers are examples/prefork.py's)

def serve(mode, path, store_name, workers, requests=20):
    """Run gunicorn in ``mode``; returns (workers' total Pss, outputs by x)."""
    from prefork import _children as children
    from prefork import free_port, pss
    ready = tempfile.mkdtemp(prefix="serve-ready-")
    port = free_port()
    env = dict(os.environ, SERVE_MODE=mode, SERVE_MODEL=path, SERVE_STORE=store_name,
               SERVE_READY=ready, PYTHONPATH=os.pathsep.join(filter(None, [
                   HERE, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
           "--timeout", "120", "--graceful-timeout", "5", "--log-level", "warning",
           "serve_model:app"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(ready)) < workers:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("the workers did not load the model in time")
            time.sleep(0.05)
        outputs = {}
        for x in range(requests):
            for attempt in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/?x={x}",
                                                timeout=10) as r:
                        outputs[x] = json.loads(r.read())["y"]
                    break
                except OSError:
                    if attempt == 99 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        total = sum(pss(p) for p in children(proc.pid))
        return total, outputs
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for f in os.listdir(ready):
            os.remove(os.path.join(ready, f))
        os.rmdir(ready)


_POOL_MODEL = None


def _pool_init(path, store_name):
    global _POOL_MODEL
    import torch
    torch.set_num_threads(1)
    _POOL_MODEL = load_model(path, "store", store_name)


def _pool_predict(x):
    return os.getpid(), predict(_POOL_MODEL, x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    try:
        import gunicorn  # noqa: F401
        import safetensors.torch
        import torch
    except ImportError as e:
        print(f"{e.name} is not installed (pip install torch==2.13.0 safetensors gunicorn): "
              f"skipped")
        return
    import multiprocessing as mp

    import prefork

    import dedupshm
    tmp = tempfile.mkdtemp(prefix="serve-model-")
    path = os.path.join(tmp, "model.safetensors")
    torch.manual_seed(0)
    model = make_model(layers_for(a.mib))
    safetensors.torch.save_file(model.state_dict(), path)
    torch.save(model.state_dict(), path[:-len(".safetensors")] + ".pt")
    size = os.path.getsize(path)
    expect = {x: predict(model, x) for x in range(20)}
    del model
    name = f"serve{os.getpid()}"
    store = dedupshm.Store(name, create=True, capacity=2 * size + 64 * MiB)
    try:
        print(f"model: {size / MiB:.0f} MiB of weights, {a.workers} workers")
        res = {}
        for mode in ("torch.load", "safetensors", "store"):
            total, outputs = serve(mode, path, name, a.workers)
            assert outputs == expect, f"{mode}: outputs differ from the model's"
            res[mode] = total
            print(f"gunicorn, {mode:11s}: workers' total Pss {total / MiB:7.1f} MiB")
        saved = res["torch.load"] - res["store"]
        print(f"  dedupshm vs torch.load: {saved / MiB:.1f} MiB less = {saved / size:.2f} copies "
              f"of the model (store: {store.stats()['physical_bytes'] / MiB:.1f} MiB physical)")

        ctx = mp.get_context("forkserver")
        with ctx.Pool(a.workers, initializer=_pool_init, initargs=(path, name)) as pool:
            got = pool.map(_pool_predict, range(20), chunksize=1)
            pids = [p.pid for p in mp.active_children()]      # the pool's workers
            total = sum(prefork.pss(p) for p in pids)
        assert [y for _, y in got] == [expect[x] for x in range(20)]
        print(f"forkserver pool: {len(pids)} workers; workers' total Pss "
              f"{total / MiB:.1f} MiB; store still {store.stats()['physical_bytes'] / MiB:.1f} "
              f"MiB physical (one copy)")
    finally:
        store.unlink()
        store.close()
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
