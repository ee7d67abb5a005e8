"""CPU tests of s2v_fast.offload (issue 9): offload modes give the outputs of no offload.

Layerwise offload runs its full hook / slot / prefetch bookkeeping on the CPU with synchronous
copies between two CPU buffers; the CUDA stream path is covered by the gpu-marked tests.
"""
import pytest
import torch
import torch.nn as nn

from s2v_fast import offload as off_mod
from s2v_fast.config import DiTConfig
from s2v_fast.models.dit import S2VTransformer
from s2v_fast.offload import (LayerwiseOffloader, ModelOffloader, enable_layerwise_offload,
                              peak_memory_summary)
from s2v_fast.fast import set_precision


def _tiny(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return S2VTransformer(DiTConfig.preset("tiny")).to(device, dtype).eval()


def _inputs(model, batch=2, frames=2, lh=8, lw=8, seed=1):
    c = model.config
    dev, dt = model.device, model.compute_dtype
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)

    return dict(x=r(batch, 16, frames, lh, lw), t=torch.tensor([700, 700][:batch], device=dev),
                context=[r(5, c.text_dim), r(9, c.text_dim)][:batch],
                ref_latents=r(batch, 16, 1, lh, lw), motion_latents=r(batch, 16, 19, lh, lw),
                cond_states=torch.zeros(batch, 16, frames, lh, lw, device=dev, dtype=dt),
                audio_input=r(batch, 25, c.audio_dim, 4 * frames))


def _snapshot(model):
    return {n: (p.detach().clone(), p.device) for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- layerwise
def test_layerwise_bit_identical_two_calls_and_restore():
    model = _tiny()
    inp = _inputs(model)
    ref = [model(**inp) for _ in range(2)]
    orig = _snapshot(model)

    lw = enable_layerwise_offload(model, "cpu")
    assert isinstance(lw, LayerwiseOffloader) and model._s2v_layerwise is lw
    assert all(p.numel() == 0 for p in model.blocks.parameters())  # weights only in host buffers
    assert model.patch_embedding.weight.numel() > 0  # non-block modules resident
    out = [model(**inp) for _ in range(2)]
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    n = len(model.blocks)
    # first block on demand, every other block (incl. block 0 of call 2: wrap-around) prefetched
    assert lw.stats == {"loads": 1 + 2 * n, "hits": 2 * n - 1, "misses": 1}

    lw.disable()
    assert not hasattr(model, "_s2v_layerwise")
    for blk in model.blocks:
        assert not blk._forward_pre_hooks and not blk._forward_hooks
    for name, p in model.named_parameters():
        assert torch.equal(p, orig[name][0]) and p.device == orig[name][1], name
    assert torch.equal(model(**inp), ref[0])


@pytest.mark.parametrize("precision", ["reference", "fast"])
def test_layerwise_forward_step_path_matches(precision):
    """The pipeline path: conditions prepared once, forward_step per sampling step (the fast
    path calls its blocks through their hooks and computes each block's text K/V lazily)."""
    model = _tiny()
    set_precision(model, precision)
    inp = _inputs(model)
    x, t = inp.pop("x"), inp.pop("t")
    cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=x.shape[0], **inp)
    ref = [model.forward_step(x + k, t - 100 * k, cond) for k in range(3)]
    lw = enable_layerwise_offload(model, "cpu")
    out = [model.forward_step(x + k, t - 100 * k, cond) for k in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert lw.stats["misses"] == 1
    lw.disable()


def test_layerwise_at_most_two_blocks_materialised():
    model = _tiny()
    inp = _inputs(model)
    lw = enable_layerwise_offload(model, "cpu")
    seen = []

    def probe(i):
        def hook(module, args):  # runs after the offloader's pre-hook (registered later)
            with_weights = [j for j, b in enumerate(model.blocks)
                            if any(p.numel() > 0 for p in b.parameters())]
            slots = [s for s in lw._slots if s is not None]
            slot_ptrs = {s.untyped_storage().data_ptr() for s in slots}
            for p in module.parameters():  # bound weights are views of a device slot
                assert p.untyped_storage().data_ptr() in slot_ptrs
            seen.append((i, with_weights, sorted(lw.resident_blocks), len(slots)))
        return hook

    handles = [b.register_forward_pre_hook(probe(i)) for i, b in enumerate(model.blocks)]
    for _ in range(2):
        model(**inp)
    for h in handles:
        h.remove()
    n = len(model.blocks)
    assert [s[0] for s in seen] == list(range(n)) * 2
    for i, with_weights, resident, nslots in seen:
        assert with_weights == [i]  # only the running block has its parameters bound
        assert len(resident) <= 2 and i in resident and (i + 1) % n in resident  # + prefetched
        assert nslots <= 2
    # after a forward: no block bound; the last block's slot still holds it, the other slot
    # holds block 0 (prefetched for the next step)
    assert lw.bound_blocks == set() and lw.resident_blocks == {n - 1, 0}
    lw.evict()
    assert lw.resident_blocks == set() and all(s is None for s in lw._slots)
    assert torch.equal(model(**inp), model(**inp))
    lw.disable()


def test_layerwise_without_prefetch_and_out_of_order_calls():
    model = _tiny()
    inp = _inputs(model)
    ref = model(**inp)
    lw = enable_layerwise_offload(model, "cpu", prefetch=False)
    assert torch.equal(model(**inp), ref)
    assert lw.stats["misses"] == len(model.blocks) and lw.stats["hits"] == 0
    lw.disable()

    # out-of-order block calls (e.g. a block re-run) fall back to on-demand loads
    cond = model.prepare_conditions(num_frames=2, batch_size=2, **{k: v for k, v in inp.items()
                                                                   if k not in ("x", "t")})
    _, e0 = model.time_embed(inp["t"])
    tok = torch.randn(2, cond.seq_len, model.config.dim)
    seq = [2, 0, 2, 3, 3]

    def run():
        return [model.blocks[i](tok, e0, cond.num_noisy, cond.rope, cond.context) for i in seq]

    with torch.no_grad():
        want = run()
        lw = enable_layerwise_offload(model, "cpu")
        got = run()
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert len(lw.resident_blocks) <= 2
    lw.disable()


def test_layerwise_recovers_after_exception_in_block():
    model = _tiny()
    inp = _inputs(model)
    ref = model(**inp)
    lw = enable_layerwise_offload(model, "cpu")
    boom = {"on": True}

    def fail(module, args):
        if boom["on"]:
            raise RuntimeError("boom")

    h = model.blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(**inp)
    boom["on"] = False
    assert torch.equal(model(**inp), ref)
    assert len(lw.bound_blocks) == 0
    h.remove()
    lw.disable()


def test_layerwise_rejects_double_enable_and_missing_blocks():
    model = _tiny()
    lw = enable_layerwise_offload(model, "cpu")
    with pytest.raises(RuntimeError):
        enable_layerwise_offload(model, "cpu")
    lw.disable()
    with pytest.raises(ValueError):
        enable_layerwise_offload(nn.Linear(2, 2), "cpu")


def test_packed_layout_aligned_and_one_buffer_per_block():
    model = _tiny()
    lw = enable_layerwise_offload(model, "cpu")
    for pb in lw._packed:
        assert pb.host.dtype == torch.uint8 and pb.host.dim() == 1  # one buffer -> one memcpy
        assert all(o % 256 == 0 for o, _ in pb.layout)
        assert pb.nbytes >= sum(n for _, n in pb.layout)
    n_params = sum(1 for _ in model.blocks[0].parameters())
    assert len(lw._packed[0].tensors) == n_params
    lw.disable()


# ----------------------------------------------------------------------------- pinning
def test_pinned_memory_only_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not off_mod._want_pin(torch.device("cuda"), None)
    assert not off_mod._want_pin(torch.device("cuda"), True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert off_mod._want_pin(torch.device("cuda"), None)
    assert not off_mod._want_pin(torch.device("cpu"), None)
    assert not off_mod._want_pin(torch.device("cuda"), False)
    monkeypatch.undo()

    if not torch.cuda.is_available():
        calls = []
        real_empty = torch.empty

        def spy(*a, **k):
            calls.append(k.get("pin_memory", False))
            return real_empty(*a, **k)

        monkeypatch.setattr(torch, "empty", spy)
        model = _tiny()
        lw = enable_layerwise_offload(model, "cpu")
        mo = ModelOffloader("cpu")
        mo.register("lin", nn.Linear(3, 3))
        monkeypatch.undo()
        assert lw.pin is False and mo.pin is False
        assert not any(calls)
        lw.disable()


# ----------------------------------------------------------------------------- model level
def _on_host(off, name):
    c = off._components[name]
    return all(t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
               for t, h in zip(c.tensors, c.hosts))


def _on_device(off, name):
    c = off._components[name]
    return all(t.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
               for t, h in zip(c.tensors, c.hosts) if t.numel())


def test_model_offloader_moves_and_releases():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    b.register_buffer("scale", torch.arange(4.0))
    wa, wb = a.weight.detach().clone(), b[0].weight.detach().clone()
    off = ModelOffloader("cpu")  # on a CPU-only machine the "device" copy is a separate clone
    assert off.register("a", a) is a and off.register("b", b) is b
    assert _on_host(off, "a") and _on_host(off, "b") and off.on_device == set()
    assert len(off._components["b"].tensors) == 5  # 2 + 2 parameters + 1 buffer

    with off.use("a") as m:
        assert m is a and _on_device(off, "a") and _on_host(off, "b")
        assert off.on_device == {"a"} and torch.equal(a.weight, wa)
    assert off.on_device == {"a"}  # stays until another component needs the device
    with off.use("b"):
        assert _on_device(off, "b") and _on_host(off, "a") and off.on_device == {"b"}
        assert torch.equal(b[0].weight, wb) and torch.equal(b.scale, torch.arange(4.0))
    off.offload_all()
    assert off.on_device == set() and _on_host(off, "b") and torch.equal(b[0].weight, wb)

    off.release("a")
    assert a.weight.numel() == 0 and "a" not in off and off.names == ["b"]
    with pytest.raises(RuntimeError, match="released"):
        with off.use("a"):
            pass
    with pytest.raises(KeyError):
        off.onload("nope")


def test_model_offloader_non_exclusive_resident_and_wrapped_objects():
    class Holder:  # like TextEncoder / AudioFeatureExtractor: the module is `.model`
        def __init__(self):
            self.model = nn.Linear(2, 2)

    h = Holder()
    c = nn.Linear(2, 2)
    off = ModelOffloader("cpu")
    off.register("h", h)
    off.register("c", c, resident=True)
    assert _on_device(off, "c")
    with off.use("h") as obj:
        assert obj is h and _on_device(off, "h")
        assert _on_device(off, "c")  # a resident component never moves
    with pytest.raises(ValueError):
        off.register("c", c)
    off2 = ModelOffloader("cpu")
    off2.register("x", nn.Linear(2, 2))
    off2.register("y", nn.Linear(2, 2))
    with off2.use("x"), off2.use("y", exclusive=False):
        assert off2.on_device == {"x", "y"}
    with off2.use("x"):
        assert off2.on_device == {"x"}
    with pytest.raises(TypeError):
        off2.register("z", object())
    off2.unregister("x")
    assert "x" not in off2


def test_model_offloader_outputs_equal_and_writeback():
    model = _tiny()
    inp = _inputs(model)
    ref = model(**inp)
    off = ModelOffloader("cpu")
    off.register("dit", model)
    off.register("other", nn.Linear(3, 3))
    with off.use("dit"):
        assert torch.equal(model(**inp), ref)
    with off.use("other"):
        pass
    with off.use("dit"):
        assert torch.equal(model(**inp), ref)

    # writeback keeps in-place changes made on the device; without it they are discarded
    lin = nn.Linear(2, 2)
    off.register("lin", lin, writeback=True)
    with off.use("lin"):
        with torch.no_grad():
            lin.weight.fill_(3.0)
    off.offload("lin")
    assert torch.all(lin.weight == 3.0)
    lin2 = nn.Linear(2, 2)
    w2 = lin2.weight.detach().clone()
    off.register("lin2", lin2)
    with off.use("lin2"):
        with torch.no_grad():
            lin2.weight.fill_(3.0)
    off.offload("lin2")
    assert torch.equal(lin2.weight, w2)  # read-only contract: the host copy is authoritative


def test_model_offloader_with_layerwise_dit():
    """Both flags: the offloader moves only the non-block tensors and evicts the block slots."""
    model = _tiny()
    inp = _inputs(model)
    ref = model(**inp)
    lw = enable_layerwise_offload(model, "cpu")
    off = ModelOffloader("cpu")
    off.register("dit", model)
    off.register("vae", nn.Linear(2, 2))
    managed = {id(t) for t in lw.managed_tensors()}
    assert not any(id(t) in managed for t in off._components["dit"].tensors)
    with off.use("dit"):
        assert torch.equal(model(**inp), ref)
        assert lw.resident_blocks == {len(model.blocks) - 1, 0}
    with off.use("vae"):
        assert lw.resident_blocks == set() and all(s is None for s in lw._slots)
    with off.use("dit"):
        assert torch.equal(model(**inp), ref)
    off.release("dit")
    assert not hasattr(model, "_s2v_layerwise")
    assert all(p.numel() == 0 for p in model.parameters())


# ----------------------------------------------------------------------------- summary
def test_peak_memory_summary(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_memory_summary() == "peak GPU memory n/a (no CUDA)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: int(23.4 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 25 * 2**30)
    assert peak_memory_summary() == "peak GPU memory 23.4 GiB"
    assert peak_memory_summary(reserved=True) == "peak GPU memory 23.4 GiB (reserved 25.0 GiB)"


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "reference"), (torch.bfloat16, "reference"),
                                             (torch.bfloat16, "fast")])
def test_gpu_layerwise_matches_and_frees_memory(dtype, precision):
    model = _tiny("cuda", dtype)
    set_precision(model, precision)
    inp = _inputs(model)
    ref = [model(**inp) for _ in range(2)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
    lw = enable_layerwise_offload(model, "cuda")
    assert all(pb.host.is_pinned() for pb in lw._packed)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before - block_bytes + 1024
    for _ in range(2):
        out = [model(**inp) for _ in range(2)]
        for a, b in zip(ref, out):
            assert torch.equal(a, b)
    assert lw.stats["misses"] == 1
    lw.disable()
    assert all(p.is_cuda and p.numel() > 0 for p in model.parameters())
    assert torch.equal(model(**inp), ref[0])


@pytest.mark.gpu
def test_gpu_model_offloader_pinned_roundtrip():
    model = _tiny("cpu")
    inp = _inputs(model)
    ref = model(**inp)
    off = ModelOffloader("cuda")
    off.register("dit", model)
    assert all(h.is_pinned() for h in off._components["dit"].hosts)
    with off.use("dit"):
        assert model.device.type == "cuda"
        out = model(**{k: (v.cuda() if torch.is_tensor(v) else [c.cuda() for c in v]
                           if isinstance(v, list) else v) for k, v in inp.items()})
    off.offload_all()
    assert model.device.type == "cpu"
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-2, atol=2e-2)  # TF32 convs on GPU
    assert "peak GPU memory" in peak_memory_summary()


@pytest.mark.gpu
def test_gpu_dropped_registered_packs_unlock_their_memory():
    """A page-locked pack dropped without free() (an offloaded pipeline let go) unregisters its
    buffer before the memory is returned: the next pack of that size, often at the same address,
    pins without "resource already mapped" (the error the GPU smoke stage hit when layerwise
    offload followed model offload in one process)."""
    from s2v_fast.offload import _HostPack, _REGISTER_MIN

    src = [torch.randn(_REGISTER_MIN // 4 + 1024, device="cuda")]  # fp32: just over the minimum
    for _ in range(3):
        pack = _HostPack(src, pin=True)
        assert pack.pinned and pack._registered
        del pack  # no free(): the finalizer unlocks
        torch.cuda.synchronize()
    pack = _HostPack(src, pin=True)
    assert torch.equal(pack.views(pack.host)[0], src[0].cpu())
    pack.free()
    assert pack.host is None and not pack._registered
    torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)  # the pinned allocator still works
    torch.cuda.synchronize()
