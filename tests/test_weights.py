"""Model weights in the store (issue 11): share_module keeps identity and
tying and makes writes private; torch.load / safetensors.load_file /
numpy.load read a file into the store once and map it in every later
process; fine-tunes share their base's pages; a loader SIGKILLed mid-load
or a truncated/corrupt file leaves nothing half-made; fork, spawn,
forkserver and DataLoader workers all map one copy."""
import gc
import hashlib
import multiprocessing as mp
import os
import signal
import time
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dedupshm  # noqa: E402
import dedupshm.numpy as dnp  # noqa: E402
import dedupshm.safetensors as dst  # noqa: E402
import dedupshm.torch as dt  # noqa: E402
from dedupshm import _weights  # noqa: E402
from helpers import MiB, in_store, smaps_rollup, store_bytes, wait_for  # noqa: E402

pytestmark = pytest.mark.limit(120)


class Net(torch.nn.Module):
    """About 8 MiB of float32: embedding tied to the output head, a norm
    with buffers, and a buffer that is a view of another buffer."""

    def __init__(self, seed=0, vocab=4096, dim=256, layers=4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.norm = torch.nn.BatchNorm1d(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight                     # tied
        table = torch.randn(64, dim, generator=g)
        self.register_buffer("table", table)
        self.register_buffer("table_head", table[:8])          # a view of table
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.eval()

    def forward(self, ids):
        x = self.emb(ids).mean(1)
        for lin in self.layers:
            x = torch.relu(lin(x)) + self.table_head.mean(0)
        return self.head(self.norm(x))


IDS = torch.arange(64).reshape(8, 8) * 37 % 4096


def nbytes_of(sd):
    seen, n = set(), 0
    for t in sd.values():
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            n += st.nbytes()
    return n


def digest(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- share_module

def test_share_module_in_place_keeps_identity_tying_and_outputs(store):
    ref_out = Net()(IDS)
    m = Net()
    params = {n: p for n, p in m.named_parameters()}
    bufs = {n: b for n, b in m.named_buffers()}
    keys = list(m.state_dict())
    size = nbytes_of(m.state_dict())
    assert dt.share_module(m, store) is m
    assert {n: p for n, p in m.named_parameters()} == params          # same objects
    assert all(a is b for a, b in zip(params.values(), m.parameters()))
    assert all(b is bufs[n] for n, b in m.named_buffers())
    assert list(m.state_dict()) == keys
    assert m.head.weight is m.emb.weight
    assert m.table_head.untyped_storage().data_ptr() == m.table.untyped_storage().data_ptr()
    assert torch.equal(m.table_head, m.table[:8])
    for t in list(m.parameters()) + list(m.buffers()):
        # tiny values (<= 2 KiB, a bias) live in the index and are copied
        assert in_store(t, store.name) or t.untyped_storage().nbytes() <= 2048
    assert torch.equal(m(IDS), ref_out)                                 # bit-identical
    # one copy in the store (the tied weight and the view once)
    assert store.stats()["physical_bytes"] <= size + 64 * 4096
    # a second identical model costs nothing more
    m2 = dt.share_module(Net(), store)
    assert store.stats()["physical_bytes"] <= size + 64 * 4096
    assert torch.equal(m2(IDS), ref_out)


def test_share_module_refuses_non_cpu_dense_before_moving(store):
    m = torch.nn.Linear(4, 4)
    m.register_buffer("sp", torch.eye(4).to_sparse())
    w = m.weight.data_ptr()
    with pytest.raises(TypeError, match="dense CPU"):
        dt.share_module(m, store)
    assert m.weight.data_ptr() == w and len(store) == 0


def _train_child(name, q):
    store = dedupshm.Store(name)
    m = dt.share_module(Net(), store)
    before = store.stats()["physical_bytes"]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    m(IDS).sum().backward()
    opt.step()
    q.put((digest(m.layers[0].weight), before, store.stats()["physical_bytes"]))


def test_write_to_shared_parameter_stays_private(store, procs):
    m = dt.share_module(Net(), store)
    w0 = digest(m.layers[0].weight)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = procs.start(ctx, _train_child, store.name, q)
    child_w, before, after = q.get(timeout=90)
    p.join(30)
    assert child_w != w0                               # the child trained its copy
    assert digest(m.layers[0].weight) == w0            # ours did not move
    assert after == before                             # the write made no store page
    m3 = dt.share_module(Net(), store)                 # the stored value is the original
    assert digest(m3.layers[0].weight) == w0
    # a write here is private too
    with torch.no_grad():
        m.layers[0].weight.add_(1.0)
    assert digest(m3.layers[0].weight) == w0
    assert store.check().ok


# ---------------------------------------------------------------- torch.load

@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(Net().state_dict(), path)
    return str(path)


def test_load_matches_torch_load_and_keeps_sharing(store, ckpt):
    ref = torch.load(ckpt, weights_only=True)
    sd = dt.load(ckpt, store)
    assert list(sd) == list(ref) and type(sd) is type(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]) and sd[k].dtype == ref[k].dtype
        assert sd[k].stride() == ref[k].stride()
        assert in_store(sd[k], store.name) or sd[k].untyped_storage().nbytes() <= 2048
    assert sd["head.weight"].untyped_storage().data_ptr() == \
        sd["emb.weight"].untyped_storage().data_ptr()
    net = Net(seed=5)
    net.load_state_dict(sd)
    assert torch.equal(net(IDS), Net()(IDS))
    assert store.stats()["physical_bytes"] <= nbytes_of(ref) + 64 * 4096
    with pytest.raises(ValueError, match="CPU"):
        dt.load(ckpt, store, map_location="meta")


def _load_child(name, path, q, method):
    # torch's own rule for forked children (DataLoader workers do the same):
    # its thread pool does not survive fork.  dedupshm.torch.load itself
    # runs no parallel torch op.
    torch.set_num_threads(1)
    store = dedupshm.Store(name)
    net = Net(seed=9)
    before = smaps_rollup()["Anonymous"]
    sd = dt.load(path, store)
    net.load_state_dict(sd, assign=True)     # the module takes the store's tensors
    after = smaps_rollup()["Anonymous"]
    q.put((method, digest(net(IDS)), after - before, in_store(sd["emb.weight"], name)))


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_of_every_start_method_share_one_copy(store, ckpt, procs, method):
    ctx = mp.get_context(method)
    q = ctx.Queue()
    ps = [procs.start(ctx, _load_child, store.name, ckpt, q, method) for _ in range(3)]
    got = [q.get(timeout=100) for _ in ps]
    for p in ps:
        p.join(30)
    size = nbytes_of(torch.load(ckpt, weights_only=True))
    want = digest(Net()(IDS))
    for m, d, anon, mapped in got:
        assert d == want and mapped
        # copy-on-write mappings of the store: loading allocated no private copy
        assert anon < size // 2, f"a worker grew its private memory by {anon / MiB:.1f} MiB"
    assert store.stats()["physical_bytes"] <= size + 64 * 4096
    assert store_bytes(store.name) <= size + 4 * MiB         # from outside: the store's files
    assert store.check().ok


def _restart_child(name, path, q):
    store = dedupshm.Store(name)

    def no_read(*a, **k):
        raise AssertionError("torch.load called: the file was read again")
    torch.load = no_read
    t0 = time.perf_counter()
    sd = dt.load(path, store)
    q.put((time.perf_counter() - t0, digest(sd["layers.0.weight"])))


def test_restarted_worker_maps_without_reading(store, ckpt, procs):
    sd = dt.load(ckpt, store)
    want = digest(sd["layers.0.weight"])
    del sd
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs.start(ctx, _restart_child, store.name, ckpt, q)
    _, d = q.get(timeout=90)
    assert d == want


def test_changed_file_is_loaded_again(store, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(1000)}, path)
    assert torch.equal(dt.load(path, store)["w"], torch.ones(1000))
    torch.save({"w": torch.full((1000,), 2.0)}, path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # even a later mtime
    assert torch.equal(dt.load(path, store)["w"], torch.full((1000,), 2.0))
    # forget drops every version of the file
    assert dt.forget(path, store) >= 4
    assert not [k for k in store.keys() if k.startswith(_weights.PREFIX)]


def test_fine_tunes_share_their_base_pages(store, tmp_path):
    base = Net()
    paths = []
    for k in range(3):
        ft = Net()
        with torch.no_grad():
            ft.layers[k].weight.add_(0.01 * (k + 1))          # one changed layer
            ft.emb.weight[k * 7] += 1.0                         # and one row of the embedding
        p = tmp_path / f"ft{k}.pt"
        torch.save(ft.state_dict(), p)
        paths.append(p)
    size = nbytes_of(base.state_dict())
    layer = base.layers[0].weight.numel() * 4
    sds = [dt.load(p, store) for p in paths]
    for k, sd in enumerate(sds):
        assert torch.equal(sd["layers.%d.weight" % k], base.layers[k].weight + 0.01 * (k + 1))
    # the base once, plus per fine-tune its changed layer and one embedding page
    assert store.stats()["physical_bytes"] <= size + 3 * (layer + 2 * 4096) + 64 * 4096


# ---------------------------------------------------------------- crashes and bad files

def _killed_loader(name, path, committed, in_fill):
    store = dedupshm.Store(name)
    orig = _weights.Writer.buffer

    def slow(self, nbytes, fill):
        if len(self.keys) == 2:
            def stuck(buf):
                fill(buf)
                in_fill.set()               # the third buffer is filled, not committed
                time.sleep(120)
            return orig(self, nbytes, stuck)
        idx = orig(self, nbytes, fill)
        if len(self.keys) == 2:
            committed.set()
        return idx
    _weights.Writer.buffer = slow
    dt.load(path, store)


@pytest.mark.limit(150)
def test_loader_sigkilled_mid_load_leaves_store_clean(store, ckpt, procs):
    ctx = mp.get_context("forkserver")
    committed, in_fill = ctx.Event(), ctx.Event()
    p = procs.start(ctx, _killed_loader, store.name, ckpt, committed, in_fill)
    assert committed.wait(90) and in_fill.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    def reaped():
        store.gc()
        return len(store.clients()) == 1           # only this process is left
    wait_for(reaped, timeout=20, msg="the killed loader is reaped")
    assert store.check().ok
    leftovers = [k for k in store.keys() if k.startswith(_weights.PREFIX)]
    assert len(leftovers) == 2            # two committed buffers, no manifest, no half buffer
    sd = dt.load(ckpt, store)             # the next loader takes over and cleans up
    assert torch.equal(sd["layers.1.weight"], torch.load(ckpt, weights_only=True)["layers.1.weight"])
    m = store.get(next(k for k in store.keys() if k.count("/") == 1))
    assert sorted(m["keys"]) == sorted(k for k in store.keys() if k.count("/") == 3)
    assert store.check().ok


def _nothing_stored(store):
    store.gc()
    return [k for k in store.keys() if k.startswith(_weights.PREFIX)] == [] and \
        store.stats()["physical_bytes"] == 0


def test_truncated_or_corrupt_torch_checkpoint(store, ckpt, tmp_path):
    data = open(ckpt, "rb").read()
    for name, blob in [("trunc", data[: len(data) // 2]), ("garbage", os.urandom(50000)),
                       ("empty", b""), ("tail", data[:-30])]:
        p = tmp_path / f"{name}.pt"
        p.write_bytes(blob)
        with pytest.raises(_weights.WeightsFileError, match="not a loadable torch checkpoint"):
            dt.load(p, store)
        assert _nothing_stored(store), name


def test_truncated_or_corrupt_safetensors(store, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = {"a": torch.randn(256, 256), "b": torch.arange(100)}
    good = tmp_path / "good.safetensors"
    st.save_file(sd, good)
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = {
        "trunc": data[:-1000],
        "short": data[:5],
        "hugeheader": (10**12).to_bytes(8, "little") + data[8:],
        "notjson": data[:8] + b"x" * n + data[8 + n:],
        "trailing": data + b"\0" * 16,
        "badoffs": data.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1),
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(_weights.WeightsFileError):
            dst.load_file(p, store)
        assert _nothing_stored(store), name
    got = dst.load_file(good, store)
    ref = st.load_file(good)
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)


def test_truncated_or_corrupt_numpy(store, tmp_path):
    a = np.random.default_rng(0).standard_normal((300, 300))
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "z.npz", x=a, y=np.arange(5000))
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-8])
    z = (tmp_path / "z.npz").read_bytes()
    i = z.index(a.tobytes()[:64])
    bad = bytearray(z)
    bad[i + 1000] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(bad))
    np.save(tmp_path / "o.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for name, what in [("t.npy", "truncated"), ("crc.npz", "CRC|Bad"), ("o.npy", "pickle")]:
        with pytest.raises(_weights.WeightsFileError, match=what):
            dnp.load(tmp_path / name, store)
        assert _nothing_stored(store), name
    got = dnp.load(tmp_path / "a.npy", store)
    assert np.array_equal(got, a) and not got.flags.writeable and in_store(got, store.name)
    zz = dnp.load(tmp_path / "z.npz", store)
    assert np.array_equal(zz["x"], a) and np.array_equal(zz["y"], np.arange(5000))
    with pytest.raises(ValueError):
        zz["x"][0, 0] = 1.0


def test_safetensors_matches_reference_and_maps_on_reload(store, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = {"f32": torch.randn(128, 64), "bf16": torch.randn(3000).to(torch.bfloat16),
          "i64": torch.arange(10), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
          "bool": torch.rand(5000) > 0.5}
    path = tmp_path / "m.safetensors"
    st.save_file(sd, path)
    got = dst.load_file(path, store)
    for k, v in sd.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype and got[k].shape == v.shape
    got["f32"][0, 0] = 99.0                              # private
    n = len(store)
    again = dst.load_file(path, store)
    assert torch.equal(again["f32"], sd["f32"])
    assert len(store) == n and in_store(again["f32"], store.name)
    with pytest.raises(TypeError, match="BF16"):
        dst.load_file(path, store, framework="np")       # numpy has no bfloat16
    del sd["bf16"]
    st.save_file(sd, tmp_path / "np.safetensors")
    arrs = dst.load_file(tmp_path / "np.safetensors", store, framework="np")
    assert np.array_equal(arrs["f32"], sd["f32"].numpy()) and not arrs["f32"].flags.writeable
    assert in_store(arrs["f32"], store.name)


# ---------------------------------------------------------------- DataLoader

class TableDataset(torch.utils.data.Dataset):
    """Rows of an embedding table loaded (once per machine) from a file."""

    def __init__(self, path, name):
        self.path, self.name, self.table = path, name, None

    def __len__(self):
        return 32

    def __getitem__(self, i):
        if self.table is None:
            self.table = dt.load(self.path, dedupshm.Store(self.name))["emb.weight"]
        return self.table[i * 3].clone(), in_store(self.table, self.name)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_read_the_table_zero_copy(store, ckpt, method):
    ds = TableDataset(ckpt, store.name)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                         multiprocessing_context=method)
    rows = torch.cat([b[0] for b in loader])
    flags = torch.cat([b[1] for b in loader])
    ref = torch.load(ckpt, weights_only=True)["emb.weight"]
    assert torch.equal(rows, ref[torch.arange(32) * 3]) and bool(flags.all())
    assert store.stats()["physical_bytes"] <= nbytes_of(torch.load(ckpt, weights_only=True)) \
        + 64 * 4096


def test_zip_member_offsets_are_not_trusted(store, tmp_path):
    """A .npz whose member claims more data than the archive has: a clear error."""
    p = tmp_path / "lie.npz"
    with zipfile.ZipFile(p, "w") as zf:
        buf = bytearray()
        hdr = b"\x93NUMPY\x01\x00" + (0x76).to_bytes(2, "little")
        d = "{'descr': '<f8', 'fortran_order': False, 'shape': (100000,), }"
        hdr += (d + " " * (0x76 - len(d) - 1) + "\n").encode()
        buf += hdr + b"\0" * 800
        zf.writestr("x.npy", bytes(buf))
    with pytest.raises(_weights.WeightsFileError, match="truncated"):
        dnp.load(p, store)
    assert _nothing_stored(store)


def test_load_from_a_file_object_dedups_with_the_path_load(store, ckpt):
    sd = dt.load(ckpt, store)
    phys = store.stats()["physical_bytes"]
    with open(ckpt, "rb") as f:
        sd2 = dt.load(f, store)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert in_store(sd2["emb.weight"], store.name)
    assert sd2["head.weight"].untyped_storage().data_ptr() == \
        sd2["emb.weight"].untyped_storage().data_ptr()
    assert store.stats()["physical_bytes"] <= phys + 64 * 4096      # page-aligned: same pages


def _inherited_child(sd, q, name, forgotten):
    torch.set_num_threads(1)
    assert forgotten.wait(60)
    net = Net(seed=9)
    net.load_state_dict(sd, assign=True)
    q.put((digest(net(IDS)), in_store(sd["emb.weight"], name)))


def test_preloaded_weights_survive_fork_and_forget(store, ckpt, procs):
    """gunicorn --preload: the master loads, forked workers use what they
    inherited -- even after the master forgets the file and drops its copy."""
    sd = dt.load(ckpt, store)
    ctx = mp.get_context("fork")
    q, forgotten = ctx.Queue(), ctx.Event()
    ps = [procs.start(ctx, _inherited_child, sd, q, store.name, forgotten) for _ in range(2)]
    assert dt.forget(ckpt, store) > 0
    del sd
    gc.collect()
    forgotten.set()
    got = [q.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(30)
    assert got == [(digest(Net()(IDS)), True)] * 2
