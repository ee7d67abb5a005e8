"""The CUDA attention kernels as torch.library custom ops (``torch.ops.s2v_fast.*``): registered
on import, fake implementations that give the kernels' output metadata, and the Python wrappers
traced by torch.compile(fullgraph=True) into one op call. The kernels need an sm_90 GPU; on a CPU
everything here runs on fake CUDA tensors (FakeTensorMode) or meta tensors, never launching them.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from s2v_fast.kernels import cuda_attention as ca
from s2v_fast.kernels import fp8_quant

OPS = ("flash_attention_sm90", "fp8_attention_sm90")


def _bf16(*shape, device="cuda"):
    return torch.empty(*shape, dtype=torch.bfloat16, device=device)


def _cuda_like(t):
    """Inside FakeTensorMode: a fake CUDA tensor with ``t``'s shape, strides and dtype."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


def _compiled_graph(fn, *args):
    """torch.compile(fn, fullgraph=True) called on ``args``; (output, the traced FX graph)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert len(graphs) == 1
    return out, graphs[0].graph


def _op_calls(graph, name):
    return [n for n in graph.nodes if n.op == "call_function" and name in str(n.target)]


@pytest.mark.parametrize("name", OPS)
def test_ops_are_registered_in_the_s2v_fast_namespace(name):
    op = getattr(torch.ops.s2v_fast, name).default
    assert op._schema.name == f"s2v_fast::{name}"
    assert not op._schema.is_mutable and len(op._schema.returns) == 1


def test_flash_op_schema():
    schema = str(torch.ops.s2v_fast.flash_attention_sm90.default._schema)
    assert "Tensor q, Tensor k, Tensor v, float? softmax_scale, str defines) -> Tensor" in schema


@pytest.mark.parametrize("shape_q,lk", [((2, 64, 4, 128), 96), ((1, 1, 40, 128), 512),
                                        ((3, 130, 2, 128), 7)])
def test_flash_fake_gives_the_kernel_output(shape_q, lk):
    B, Lq, H, D = shape_q
    with FakeTensorMode():
        q, k = _bf16(*shape_q), _bf16(B, lk, H, D)
        out = torch.ops.s2v_fast.flash_attention_sm90(q, k, k, None, "")
    # the kernel writes a new contiguous [B, Lq, H, D] bf16 tensor on q's device
    assert out.shape == shape_q and out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert out.is_contiguous()


def test_flash_fake_refuses_mismatched_keys_and_values():
    with FakeTensorMode():
        q, k, v = _bf16(1, 8, 2, 128), _bf16(1, 16, 2, 128), _bf16(1, 12, 2, 128)
        with pytest.raises(Exception, match="k and v"):
            torch.ops.s2v_fast.flash_attention_sm90(q, k, v, None, "")


def _quantized(B=2, Lq=40, Lk=70, H=3, k_scale="channel"):
    """quantize_qkv's CUDA-kernel layout (k_perm32), computed by its torch path on the CPU."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, H, 128, generator=g).to(torch.bfloat16) for L in (Lq, Lk, Lk))
    qz = fp8_quant.quantize_qkv(q, k, v, 128 ** -0.5, "fp8", use_kernels=False, k_perm32=True,
                                k_scale=k_scale)
    return q, k, v, qz


def _fp8_args(qz, B, H, Lk):
    return (qz["q8"], qz["qs"], qz["k8"], qz["ks"], qz["vt"], qz["vs"], B, H, Lk, qz["Lkp"],
            qz["Lp"])


@pytest.mark.parametrize("k_scale", ["channel", "token"])
def test_fp8_fake_gives_the_kernel_output(k_scale):
    B, Lq, Lk, H = 2, 40, 70, 3
    _, _, _, qz = _quantized(B, Lq, Lk, H, k_scale)
    assert (qz["ks"] is None) == (k_scale == "channel")
    with FakeTensorMode():
        fake = {n: (_cuda_like(t) if isinstance(t, torch.Tensor) else t) for n, t in qz.items()}
        out = torch.ops.s2v_fast.fp8_attention_sm90(*_fp8_args(fake, B, H, Lk))
    assert out.shape == (B, Lq, H, 128) and out.dtype == torch.bfloat16
    assert out.device.type == "cuda" and out.is_contiguous()


def test_opcheck_on_meta_tensors():
    q, k = _bf16(2, 64, 4, 128, device="meta"), _bf16(2, 96, 4, 128, device="meta")
    torch.library.opcheck(torch.ops.s2v_fast.flash_attention_sm90.default, (q, k, k, 0.1, ""))
    torch.library.opcheck(torch.ops.s2v_fast.flash_attention_sm90.default, (q, k, k, None, ""))
    _, _, _, qz = _quantized()
    meta = {n: (t.to("meta") if isinstance(t, torch.Tensor) else t) for n, t in qz.items()}
    torch.library.opcheck(torch.ops.s2v_fast.fp8_attention_sm90.default, _fp8_args(meta, 2, 3, 70))


def test_ops_have_no_cpu_kernel():
    """CUDA only: a CPU call is refused instead of reaching the ctypes launcher."""
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError):
        torch.ops.s2v_fast.flash_attention_sm90(q, q, q, None, "")


def test_compile_traces_cuda_attention_into_one_op_call():
    def f(q, k, v):
        return ca.cuda_attention(q, k, v, softmax_scale=0.05, defines=("-DS2V_LAZY_RESCALE=0",)) * 2

    with FakeTensorMode():
        q, k = _bf16(2, 64, 4, 128), _bf16(2, 96, 4, 128)
        out, graph = _compiled_graph(f, q, k, k)
    assert out.shape == (2, 64, 4, 128) and out.dtype == torch.bfloat16
    (call,) = _op_calls(graph, "s2v_fast.flash_attention_sm90")
    assert list(call.args[3:]) == [0.05, "-DS2V_LAZY_RESCALE=0"]  # scale and variant reach it


def test_compile_of_uncovered_inputs_takes_sdpa():
    """Head dim 64 is not the kernel's: the trace holds SDPA and no kernel op, as eager does."""
    with FakeTensorMode():
        q = _bf16(1, 32, 2, 64)
        out, graph = _compiled_graph(ca.cuda_attention, q, q, q)
    assert out.shape == q.shape
    assert not _op_calls(graph, "s2v_fast.")
    assert _op_calls(graph, "scaled_dot_product_attention")


def test_compile_traces_cuda_fp8_attention_into_one_op_call():
    B, Lq, Lk, H = 2, 40, 70, 3
    q, k, v, qz = _quantized(B, Lq, Lk, H)
    tensors = {n: t for n, t in qz.items() if isinstance(t, torch.Tensor)}
    names = sorted(tensors)

    def f(q, k, v, *ts):
        quantized = dict(qz, **dict(zip(names, ts)))
        return ca.cuda_fp8_attention(q, k, v, quantized=quantized) + 1

    with FakeTensorMode():
        out, graph = _compiled_graph(f, *map(_cuda_like, (q, k, v)),
                                     *(_cuda_like(tensors[n]) for n in names))
    assert out.shape == (B, Lq, H, 128) and out.dtype == torch.bfloat16
    (call,) = _op_calls(graph, "s2v_fast.fp8_attention_sm90")
    assert list(call.args[6:]) == [B, H, Lk, qz["Lkp"], qz["Lp"]]


@pytest.mark.gpu
@pytest.mark.skipif(ca.unavailable_reason() is not None, reason="needs sm_90 and nvcc")
def test_op_under_compile_and_cuda_graph_equals_eager():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, L, 4, 128, device="cuda", generator=g).to(torch.bfloat16)
               for L in (256, 384, 384))
    eager = ca.cuda_attention(q, k, v)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(ca.cuda_attention, fullgraph=True)(q, k, v), eager)
    ca.cuda_attention(q, k, v)  # built and loaded before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ca.cuda_attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
