"""Model weights: one physical copy per machine (issue 11).

A transformer-like MLP (embedding, N residual blocks of two Linear layers,
an untied head) is built in code with a fixed seed: ~512 MiB of float32
(--mib; --quick: ~16 MiB), saved with torch.save and with safetensors.
Workers are fresh processes started by multiprocessing's "forkserver"
(Python 3.14's default; the server has torch imported, so a worker starts
in milliseconds, and fork's copy-on-write shares no weights), each building the module skeleton on the meta device and taking the loaded
tensors with ``load_state_dict(assign=True)``; after loading, every worker
reads all its weights once (so lazily mapped peers are resident too) and
runs one inference.

Memory is read from outside: each worker's /proc/PID/smaps_rollup before
loading (after imports) and after its first inference, and the store's own
files' allocated blocks.  Physical memory of a run = sum over workers of
(delta Anonymous + delta Pss_File) + the store's files.  (A worker's
mapping of the store is shmem, counted once in the store's files; file
pages of a peer's mmap are Pss_File, split between the workers that map
them.)

  1. 4 workers load the same checkpoint: dedupshm.torch.load,
     dedupshm.safetensors.load_file, dedupshm.torch.share_module (each
     worker builds the model from the seed and shares it) vs torch.load,
     safetensors.torch.load_file and safetensors mmap (the file mapped
     MAP_PRIVATE, tensors over the mapping) per worker.  Goal <= 1.05 x one copy.
  2. K = 4 fine-tunes, one per worker: (a) new head + 10% of the blocks,
     (b) a few rows of the embedding.  Goal <= 1.1 x the distinct pages of
     the 4 fine-tunes (the base's pages that they keep + the pages each
     changed; <= base + changed pages, as the base's own head is loaded by
     nobody in (a)).  Reference: what Xet-style content-defined
     chunking (~64 KiB chunks) would keep on disk for the 4 safetensors
     files.
  3. A restarted worker (fresh process) whose weights are in the store:
     time from "go" until its weights are loaded, and until its first
     inference, vs torch.load and safetensors (read and mmap); median of 5.
     Goal >= 20x faster than torch.load.
  Every output is compared bit for bit with the unshared model's.

    python benchmarks/bench_weights.py [--quick] [--mib N] [--workers 4]
"""
import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import fmt_bytes, fmt_time, median, note, print_table, temp_store  # noqa: E402

PAGE = 4096


# ---------------------------------------------------------------- the model

def config(mib):
    if mib <= 64:
        dim, vocab = 256, 2000
    else:
        dim, vocab = 1024, 32000
    edge = 2 * vocab * dim * 4
    block = 2 * (dim * dim + dim) * 4
    layers = max(10, round((mib * 2**20 - edge) / block))
    return {"dim": dim, "vocab": vocab, "layers": layers}


def make_model(cfg):
    import torch

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.up = torch.nn.Linear(d, d)
            self.down = torch.nn.Linear(d, d)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x))) * 0.1

    class TinyLM(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.emb = torch.nn.Embedding(c["vocab"], c["dim"])
            self.blocks = torch.nn.ModuleList(Block(c["dim"]) for _ in range(c["layers"]))
            self.head = torch.nn.Linear(c["dim"], c["vocab"], bias=False)

        def forward(self, ids):
            x = self.emb(ids).mean(1)
            for b in self.blocks:
                x = b(x)
            return self.head(torch.nn.functional.layer_norm(x, x.shape[-1:]))

    return TinyLM(cfg)


def seeded_state(cfg, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        m = make_model(cfg)
    return {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in m.state_dict().items()}


def ids(cfg):
    import torch
    return (torch.arange(64).reshape(4, 16) * 7919) % cfg["vocab"]


def infer_digest(model, cfg):
    import torch
    with torch.no_grad():
        out = model(ids(cfg))
    return hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- workers

def _rollup(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _mmap_safetensors(path):
    """The classic zero-copy safetensors load: the file mapped privately,
    each tensor a view of the mapping (page cache shared by every process)."""
    import json
    import mmap
    import struct
    import torch
    from dedupshm.safetensors import DTYPES
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    (n,) = struct.unpack("<Q", mm[:8])
    header = json.loads(mm[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, DTYPES[e["dtype"]][0])
        b, end = e["data_offsets"]
        count = (end - b) // DTYPES[e["dtype"]][2]
        out[name] = torch.frombuffer(mm, dtype=dtype, count=count,
                                     offset=8 + n + b).reshape(e["shape"])
    return out


def load_with(mode, paths, store_name, cfg, seed):
    import torch
    if mode == "dedupshm torch.load":
        import dedupshm
        import dedupshm.torch as dt
        return dt.load(paths["pt"], dedupshm.Store(store_name))
    if mode == "dedupshm safetensors":
        import dedupshm
        import dedupshm.safetensors as dst
        return dst.load_file(paths["st"], dedupshm.Store(store_name))
    if mode == "dedupshm share_module":
        import dedupshm
        import dedupshm.torch as dt
        m = make_model(cfg)
        m.load_state_dict(seeded_state(cfg, seed), assign=True)
        return dt.share_module(m, dedupshm.Store(store_name))
    if mode == "torch.load":
        return torch.load(paths["pt"], weights_only=True)
    if mode == "safetensors":
        from safetensors.torch import load_file
        return load_file(paths["st"])
    if mode == "safetensors mmap":
        return _mmap_safetensors(paths["st"])
    raise ValueError(mode)


def worker(mode, paths, store_name, cfg, seed, conn):
    import torch
    torch.set_num_threads(1)
    import dedupshm.safetensors  # noqa: F401  (imports done before the baseline)
    import dedupshm.torch  # noqa: F401
    import safetensors.torch  # noqa: F401
    with torch.device("meta"):
        model = make_model(cfg)
    # the baseline with the heap trimmed (share_module trims it after
    # sharing; without this its delta would include the forkserver's
    # inherited free heap given back)
    import dedupshm.torch as dt
    dt._trim_heap()
    conn.send("ready")
    conn.recv()                                     # go
    t0 = time.perf_counter()
    got = load_with(mode, paths, store_name, cfg, seed)
    if isinstance(got, torch.nn.Module):
        model = got
    else:
        model.load_state_dict(got, assign=True)
    del got
    loaded = time.perf_counter() - t0
    digest = infer_digest(model, cfg)
    first = time.perf_counter() - t0
    touched = 0.0
    for t in model.state_dict().values():         # every weight resident, for every mode
        touched += float(t.float().sum())
    conn.send((loaded, first, digest))
    conn.recv()                                     # exit
    conn.close()


def run_workers(modes_paths, store_name, cfg, seed=0):
    """Start one worker per (mode, paths); returns (physical bytes: the
    workers' growth + the store's files, [load seconds], [load + first
    inference seconds], [digests])."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "safetensors.torch", "dedupshm.torch",
                                "dedupshm.safetensors"])
    procs, conns = [], []
    for mode, paths in modes_paths:
        a, b = ctx.Pipe()
        p = ctx.Process(target=worker, args=(mode, paths, store_name, cfg, seed, b), daemon=True)
        p.start()
        procs.append(p)
        conns.append(a)
    try:
        for c in conns:
            if not c.poll(300) or c.recv() != "ready":
                raise RuntimeError("a worker did not start")
        before = [_rollup(p.pid) for p in procs]
        for c in conns:
            c.send("go")
        res = []
        for c in conns:
            if not c.poll(900):
                raise RuntimeError("a worker did not finish")
            res.append(c.recv())
        after = [_rollup(p.pid) for p in procs]
        mem = sum((a["Anonymous"] - b["Anonymous"]) + (a["Pss_File"] - b["Pss_File"])
                  for a, b in zip(after, before))
        mem += store_blocks(store_name)        # while the workers still map it
        for c in conns:
            c.send("exit")
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return mem, [r[0] for r in res], [r[1] for r in res], [r[2] for r in res]


def store_blocks(name):
    n = 0
    for suffix in ("index", "pool"):
        try:
            n += os.stat(f"/dev/shm/dedupshm.{name}.{suffix}").st_blocks * 512
        except FileNotFoundError:
            pass
    return n


# ---------------------------------------------------------------- files

def save_both(sd, d, name):
    import torch
    from safetensors.torch import save_file
    paths = {"pt": os.path.join(d, name + ".pt"), "st": os.path.join(d, name + ".safetensors")}
    torch.save(sd, paths["pt"])
    save_file(sd, paths["st"])
    return paths


def distinct_pages(sds):
    """Bytes of the distinct pages (4 KiB, each tensor page-aligned, as
    the store lays them out) of these state dicts together: the least any
    page-deduplicating holder of all of them needs."""
    import numpy as np
    n = 0
    for k in sds[0]:
        versions = []
        for sd in sds:
            a = sd[k].contiguous().view(-1).numpy().view(np.uint8)
            pad = (-a.size) % PAGE
            versions.append(np.concatenate([a, np.zeros(pad, np.uint8)]).reshape(-1, PAGE))
        new_page = np.ones(versions[0].shape[0], dtype=np.int64)        # version 0
        for i in range(1, len(versions)):
            fresh = np.ones(versions[0].shape[0], dtype=bool)
            for j in range(i):
                fresh &= (versions[i] != versions[j]).any(axis=1)
            new_page += fresh
        n += int(new_page.sum())
    return n * PAGE


def nbytes(sd):
    return sum(t.numel() * t.element_size() for t in sd.values())


# ---------------------------------------------------------------- Xet-style CDC

CDC_WINDOW = 48
CDC_BITS = 16                   # 64 KiB average chunk
CDC_MIN, CDC_MAX = 8 << 10, 128 << 10


def cdc_unique_bytes(paths):
    """Bytes Xet-style content-defined chunking keeps for these files: the
    sum of the distinct chunks' sizes.  Boundaries: a rolling hash (the sum
    of per-byte random 64-bit values over a 48-byte window, mod 2^64) whose
    top 16 bits are zero, chunks clamped to 8-128 KiB."""
    import numpy as np
    gear = np.random.default_rng(42).integers(0, 2**32, 256, dtype=np.uint32)
    seen = set()
    total = 0
    block = 16 << 20
    limit = np.uint32(1 << (32 - CDC_BITS))          # top CDC_BITS bits zero
    for path in paths:
        data = np.fromfile(path, dtype=np.uint8)
        cands = []
        for lo in range(0, data.size, block):
            s = max(lo - CDC_WINDOW, 0)
            g = gear[data[s:lo + block]]
            cs = np.cumsum(g, dtype=np.uint32)
            h = cs[CDC_WINDOW:] - cs[:-CDC_WINDOW]          # window sums ending at s+W+i
            hit = np.flatnonzero(h < limit) + s + CDC_WINDOW + 1
            cands.extend(int(x) for x in hit if x > lo)
        cuts, last = [], 0
        for c in cands + [data.size]:
            while c - last > CDC_MAX:
                last += CDC_MAX
                cuts.append(last)
            if c - last >= CDC_MIN or c == data.size:
                cuts.append(c)
                last = c
        start = 0
        mv = memoryview(data)
        for c in cuts:
            if c <= start:
                continue
            h = hashlib.blake2b(mv[start:c], digest_size=16).digest()
            if h not in seen:
                seen.add(h)
                total += c - start
            start = c
        del data, mv
    return total


# ---------------------------------------------------------------- main

OURS = ["dedupshm torch.load", "dedupshm safetensors"]
PEERS = ["torch.load", "safetensors", "safetensors mmap"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="~16 MiB model, 1 restart repeat")
    ap.add_argument("--mib", type=int, default=None, help="model size (default 512)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    a = ap.parse_args()
    try:
        import torch
        import safetensors  # noqa: F401
    except ImportError as e:
        print(f"{e.name} not installed (pip install 'dedupshm[torch,safetensors]'): skipped")
        return
    mib = a.mib or (16 if a.quick else 512)
    repeats = 1 if a.quick else 5
    cfg = config(mib)
    W = a.workers
    tmp = tempfile.mkdtemp(prefix="bench-weights-", dir=a.dir)
    try:
        t0 = time.perf_counter()
        base = seeded_state(cfg)
        one = nbytes(base)
        print(f"model: {cfg['layers']} blocks of {cfg['dim']}, vocab {cfg['vocab']}: "
              f"{fmt_bytes(one)} float32, {len(base)} tensors; {W} workers (forkserver)")
        ref_model = make_model(cfg)
        ref_model.load_state_dict(base, assign=True)
        want = infer_digest(ref_model, cfg)
        del ref_model
        base_paths = save_both(base, tmp, "base")
        g = torch.Generator().manual_seed(1)
        fts = {"a": [], "b": []}
        nl = max(1, round(cfg["layers"] / 10))
        for k in range(4):
            # (a) a new head and 10% of the blocks
            ft = dict(base)
            ft["head.weight"] = torch.randn(base["head.weight"].shape, generator=g) * 0.02
            for j in range(nl):
                i = (k * nl + j) % cfg["layers"]
                for part in ("up", "down"):
                    for kind in ("weight", "bias"):
                        name = f"blocks.{i}.{part}.{kind}"
                        ft[name] = base[name] + torch.randn(base[name].shape, generator=g) * 1e-3
            fts["a"].append(ft)
            # (b) a few rows of the embedding only
            ft = dict(base)
            emb = base["emb.weight"].clone()
            rows = torch.randint(0, cfg["vocab"], (8,), generator=g)
            emb[rows] += 0.01
            ft["emb.weight"] = emb
            fts["b"].append(ft)
        files = {v: [save_both(ft, tmp, f"ft{v}{k}") for k, ft in enumerate(fts[v])] for v in fts}
        wants = {}
        for v in fts:
            wants[v] = []
            for ft in fts[v]:
                m = make_model(cfg)
                m.load_state_dict(ft, assign=True)
                wants[v].append(infer_digest(m, cfg))
        ideal = {v: distinct_pages(fts[v]) for v in fts}
        print(f"files written in {time.perf_counter() - t0:.1f} s ({tmp})")
        del fts

        # ---- 1. same checkpoint, W workers
        rows = []
        identical = True
        for mode in OURS + ["dedupshm share_module"] + PEERS:
            with temp_store("w1", capacity=max(4 * one, 256 << 20)) as st:
                phys, times, _, digests = run_workers([(mode, base_paths)] * W, st.name, cfg)
            ok = all(d == want for d in digests)
            identical &= ok
            rows.append([mode, fmt_bytes(phys), f"{phys / one:.2f}x", fmt_time(max(times)),
                         "yes" if ok else "NO"])
        print_table(f"1. {W} workers, the same checkpoint: physical memory (goal <= 1.05x one copy "
                    f"= {fmt_bytes(one)})",
                    ["mode", "physical", "x one copy", "slowest load", "bit-identical"],
                    rows)

        # ---- 2. K = 4 fine-tunes, one per worker
        for v, what in (("a", "new head + 10% of the blocks"), ("b", "8 embedding rows")):
            rows = []
            for mode in OURS + PEERS:
                with temp_store("w2", capacity=max(6 * one, 256 << 20)) as st:
                    phys, times, _, digests = run_workers([(mode, p) for p in files[v]],
                                                          st.name, cfg)
                ok = digests == wants[v]
                identical &= ok
                rows.append([mode, fmt_bytes(phys), f"{phys / ideal[v]:.2f}x",
                             f"{phys / one:.2f}x", fmt_time(max(times)), "yes" if ok else "NO"])
            t1 = time.perf_counter()
            xet = cdc_unique_bytes([p["st"] for p in files[v]])
            rows.append(["(Xet-style chunk dedup, on disk)", fmt_bytes(xet),
                         f"{xet / ideal[v]:.2f}x", f"{xet / one:.2f}x",
                         f"({time.perf_counter() - t1:.1f} s to chunk)", "-"])
            print_table(f"2{v}. 4 fine-tunes ({what}), one per worker: physical memory "
                        f"(goal <= 1.1x their distinct pages = {fmt_bytes(ideal[v])})",
                        ["mode", "physical", "x distinct pages", "x one copy",
                         "slowest load", "bit-identical"], rows)

        # ---- 3. restart: time to first inference of a fresh worker
        rows = []
        loads, firsts = {}, {}
        with temp_store("w3", capacity=max(2 * one, 256 << 20)) as st:
            for mode in OURS:                       # the weights are in the store already
                run_workers([(mode, base_paths)], st.name, cfg)
            for mode in OURS + PEERS:
                ls, fs = [], []
                for _ in range(repeats):
                    _, lt, ft, digests = run_workers([(mode, base_paths)], st.name, cfg)
                    identical &= digests == [want]
                    ls.append(lt[0])
                    fs.append(ft[0])
                loads[mode], firsts[mode] = median(ls), median(fs)
        for mode in OURS + PEERS:
            rows.append([mode, fmt_time(loads[mode]),
                         f"{loads['torch.load'] / loads[mode]:.1f}x",
                         fmt_time(firsts[mode]),
                         f"{firsts['torch.load'] / firsts[mode]:.1f}x",
                         f"{firsts['safetensors mmap'] / firsts[mode]:.2f}x"])
        print_table(f"3. restarted worker (fresh process, file in the page cache): median of "
                    f"{repeats} (goal >= 20x faster than torch.load)",
                    ["mode", "weights ready", "vs torch.load", "+ first inference",
                     "vs torch.load", "vs safetensors mmap"], rows)
        note("'+ first inference' includes the forward pass itself, which reads every weight "
             "(page faults of the mapped modes included)")
        print(f"\nall outputs bit-identical to the unshared model's: {'yes' if identical else 'NO'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
