"""Each Triton kernel (run by the CPU interpreter, or on a GPU under RRCM_TEST_GPU=1) against its plain
PyTorch reference, forward and every gradient, at sizes that are not multiples of the blocks; torch's SDPA,
which the torch backend runs, against the same reference; the references against finite differences; and
each custom op's registration (schema, autograd, fake, compiled) with inputs laid out as the model and the
losses pass them, up to an Inductor-compiled module that calls all three."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from kernels.attention import attention_reference, attention_triton
from kernels.cross_entropy import cross_entropy_reference, cross_entropy_triton
from kernels.info_nce import info_nce_reference, info_nce_triton
from kernels.launch import INTERPRET

DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
# Largest error relative to max(1, |reference|). fp32 is fp32 in the kernels on a GPU too (launch.dot).
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (L, D): 66 = CIFAR-10's 64 patches + 2 tokens; with the interpreter's 128 x 128 tiles (attention.INTERPRETER)
# 66 is one ragged tile and 198 (ImageNet's 196 + 2) two query tiles and two key tiles, the second ragged: the loops
# over several tiles (the online softmax's rescaling, dk/dv summed over query tiles) are checked there.
ATTENTION_SHAPES = [(1, 16), (7, 32), pytest.param(66, 64, marks=pytest.mark.quick), (20, 24), (198, 40)]  # quick: CIFAR-10's


def grads(fn, inputs, g):
    out = fn(*inputs)
    return [out] + list(torch.autograd.grad(out, [t for t in inputs if torch.is_tensor(t) and t.requires_grad], g))


def assert_close(got, want, dtype=None):
    """Each pair within TOL of `dtype`, or of the dtype of what the kernel returned when dtype is None."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        scale = max(1.0, b.float().abs().max().item())
        assert (a.float() - b.float()).abs().max().item() <= TOL[dtype or a.dtype] * scale


def attention_inputs(L, D, dtype):
    torch.manual_seed(L * D)
    q, k, v = [(torch.randn(2, 2, L, D, device=DEVICE) * 2).to(dtype).requires_grad_() for _ in range(3)]
    return (q, k, v), torch.randn(2, 2, L, D, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D", ATTENTION_SHAPES)
def test_attention_matches_reference(L, D, dtype):
    qkv, g = attention_inputs(L, D, dtype)
    assert_close(grads(attention_triton, qkv, g), grads(attention_reference, qkv, g), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,D", ATTENTION_SHAPES)
def test_sdpa_matches_reference(L, D, dtype):
    """What the torch backend runs for attention meets the same definition, to the same tolerances."""
    qkv, g = attention_inputs(L, D, dtype)
    assert_close(grads(F.scaled_dot_product_attention, qkv, g), grads(attention_reference, qkv, g), dtype)


def test_torch_backend_runs_sdpa_in_autocast_dtype(torch_kernels, monkeypatch):
    """Under bf16 autocast the torch path computes attention in bf16 (the reference would upcast to fp32)."""
    import kernels
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: seen.append(q.dtype) or sdpa(q, k, v))
    x = torch.randn(2, 5, 48)
    layer = torch.nn.Linear(48, 48)
    with torch.autocast("cpu", torch.bfloat16):
        q = layer(x).reshape(2, 5, 3, 16).transpose(1, 2)
        out = kernels.attention(q, q, q)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16


@pytest.mark.quick
def test_attention_reference_is_softmax_attention():
    q, k, v = torch.randn(3, 1, 1, 5, 8, dtype=torch.float64)
    want = torch.stack([sum(math.exp(q[0, 0, i] @ k[0, 0, j] / math.sqrt(8)) * v[0, 0, j] for j in range(5)) /
                        sum(math.exp(q[0, 0, i] @ k[0, 0, j] / math.sqrt(8)) for j in range(5)) for i in range(5)])
    assert torch.allclose(attention_reference(q, k, v)[0, 0], want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,M,D,tau,offset", [(1, 1, 16, 0.2, 0), (7, 21, 40, 0.05, 14), (33, 70, 65, 0.2, 37), (16, 16, 256, 0.05, 0)])
def test_info_nce_matches_reference(B, M, D, tau, offset, dtype):
    torch.manual_seed(B + M)
    q = F.normalize(torch.randn(B, D, device=DEVICE), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(M, D, device=DEVICE), dim=1).to(dtype).requires_grad_()
    g = torch.rand(B, device=DEVICE).to(dtype)
    want = grads(lambda q, k: info_nce_reference(q, k, tau, offset), (q, k), g)
    assert_close(grads(lambda q, k: info_nce_triton(q, k, tau, offset), (q, k), g), want, dtype)


@pytest.mark.quick
def test_info_nce_without_key_gradient():
    q = F.normalize(torch.randn(5, 32, device=DEVICE), dim=1).requires_grad_()
    k = F.normalize(torch.randn(9, 32, device=DEVICE), dim=1)
    (dq,) = torch.autograd.grad(info_nce_triton(q, k, 0.1, 4).sum(), q)
    (want,) = torch.autograd.grad(info_nce_reference(q, k, 0.1, 4).sum(), q)
    assert torch.allclose(dq, want, atol=1e-5 if DEVICE == "cpu" else TOL[torch.float32])


@pytest.mark.parametrize("q_dtype,k_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_info_nce_of_two_dtypes(q_dtype, k_dtype, triton_kernels):
    """A bf16 query (autocast) against fp32 gathered keys, and the reverse, through the public kernels.info_nce:
    computed in the wider dtype, the loss returned in fp32, each gradient in its input's dtype. (On a GPU tl.dot
    refuses operands of two dtypes; the interpreter would silently upcast one, so the dtypes are checked too.)"""
    import kernels
    torch.manual_seed(0)
    q = F.normalize(torch.randn(7, 40, device=DEVICE), dim=1).to(q_dtype).requires_grad_()
    k = F.normalize(torch.randn(21, 40, device=DEVICE), dim=1).to(k_dtype).requires_grad_()
    g = torch.rand(7, device=DEVICE)
    got = grads(lambda q, k: kernels.info_nce(q, k, 0.05, 14), (q, k), g)
    want = grads(lambda q, k: info_nce_reference(q, k, 0.05, 14), (q, k), g)
    assert [t.dtype for t in got] == [torch.float32, q_dtype, k_dtype] == [t.dtype for t in want]
    assert_close(got, want)  # the loss and the fp32 gradient to fp32's tolerance, the bf16 one to bf16's


@pytest.mark.quick
def test_info_nce_reference_is_eq_7():
    q = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    tau, offset = 0.2, 2
    for i in range(3):
        sims = [float(q[i] @ k[j]) / tau for j in range(5)]
        want = math.log(sum(math.exp(s) for s in sims)) - sims[offset + i]
        assert abs(info_nce_reference(q, k, tau, offset)[i].item() - want) < 1e-12


@pytest.mark.quick
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,scale", [(1, 10, 1.0), (9, 1000, 3.0), (5, 13, 1e4), (4, 10, 80.0)])
def test_cross_entropy_matches_reference(B, C, scale, dtype):
    torch.manual_seed(C)
    x = (torch.randn(B, C, device=DEVICE) * scale).to(dtype).requires_grad_()
    y = torch.randint(0, C, (B,), device=DEVICE)
    g = torch.rand(B, device=DEVICE).to(dtype)
    got = grads(lambda x: cross_entropy_triton(x, y), (x,), g)
    assert all(torch.isfinite(t).all() for t in got)
    assert_close(got, grads(lambda x: cross_entropy_reference(x, y), (x,), g), dtype)


def test_references_pass_gradcheck():
    q, k, v = [torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(attention_reference, (q, k, v))
    a, b = torch.randn(3, 6, dtype=torch.float64, requires_grad=True), torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce_reference(a, b, 0.05, 2), (a, b))
    logits = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: cross_entropy_reference(x, torch.tensor([0, 3, 9, 3])), (logits,))


@pytest.mark.quick
def test_dispatch_uses_triton_when_selected(triton_kernels, monkeypatch):
    import kernels
    calls = []
    monkeypatch.setattr(kernels, "attention_triton", lambda *a: calls.append(1) or attention_reference(*a))
    kernels.attention(*torch.randn(3, 1, 1, 4, 16, device=DEVICE))
    assert calls == [1]


# ----------------------------------------------------------------------------------------------------
# The custom ops' registrations. Inputs are laid out the way the scripts pass them: q, k, v are strided views
# of one qkv projection (model.py), the incoming attention gradient is a permuted view (rearrange's backward),
# InfoNCE gets F.normalize outputs against keys gathered from 2 ranks (the positive at offset B) and the
# stride-0 gradient of .mean(), cross-entropy the output of a linear head.

OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_DTYPES = [torch.float32, torch.bfloat16]


def qkv_views(B: int, L: int, H: int, D: int, dtype, requires_grad: bool = True) -> list[torch.Tensor]:
    x = torch.randn(B, L, 3 * H * D, device=DEVICE).to(dtype)
    q, k, v = rearrange(x, "b l (three h d) -> three b h l d", three=3, h=H)
    assert not q.is_contiguous()
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def info_nce_inputs(q_dtype, k_dtype, B: int = 5, D: int = 24) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    q = F.normalize(torch.randn(B, D, device=DEVICE), dim=1).to(q_dtype).requires_grad_()
    keys = torch.cat([F.normalize(torch.randn(B, D, device=DEVICE), dim=1), F.normalize(q.detach().float() + 0.1, dim=1)])
    return q, keys.to(k_dtype).requires_grad_(), 0.2, B


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES)
def test_attention_ops_opcheck(dtype):
    torch.manual_seed(0)
    q, k, v = qkv_views(1, 7, 2, 16, dtype)
    torch.library.opcheck(torch.ops.rrcm.attention_fwd.default, (q, k, v), test_utils=OPCHECKS)
    o, lse = torch.ops.rrcm.attention_fwd(q, k, v)
    do = torch.randn(1, 7, 2, 16, device=DEVICE).to(dtype).transpose(1, 2)
    args = (do, *(t.detach() for t in (q, k, v)), o.detach(), lse.detach())
    torch.library.opcheck(torch.ops.rrcm.attention_bwd.default, args, test_utils=OPCHECKS)


@pytest.mark.parametrize("q_dtype,k_dtype", [(d, d) for d in OPCHECK_DTYPES] + [(torch.bfloat16, torch.float32)])
def test_info_nce_ops_opcheck(q_dtype, k_dtype):
    torch.manual_seed(0)
    q, k, tau, offset = info_nce_inputs(q_dtype, k_dtype)
    torch.library.opcheck(torch.ops.rrcm.info_nce_fwd.default, (q, k, tau, offset), test_utils=OPCHECKS)
    _, lse2 = torch.ops.rrcm.info_nce_fwd(q, k, tau, offset)
    g = torch.full((), 1 / q.shape[0], device=DEVICE).expand(q.shape[0])  # what .mean() sends back
    for op in (torch.ops.rrcm.info_nce_dq.default, torch.ops.rrcm.info_nce_dk.default):
        torch.library.opcheck(op, (g, q.detach(), k.detach(), lse2.detach(), tau, offset), test_utils=OPCHECKS)


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES)
def test_cross_entropy_op_opcheck(dtype):
    torch.manual_seed(0)
    logits = F.linear(torch.randn(6, 32, device=DEVICE), torch.randn(10, 32, device=DEVICE)).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (6,), device=DEVICE)
    torch.library.opcheck(torch.ops.rrcm.cross_entropy_fwd.default, (logits, y), test_utils=OPCHECKS)


def test_inductor_compiled_ops_match_eager(triton_kernels):
    """torch.compile(fullgraph=True) with Inductor keeps the three fused ops as single nodes (no graph break),
    checks their real outputs against the fakes' sizes and strides (assert_size_stride), and gives eager
    PyTorch's outputs and gradients with the torch kernels (SDPA and the references) to fp32's tolerance.
    The compiled function holds only the ops, so that Inductor has almost no C++ to build (a few seconds,
    not a minute); its inputs and incoming gradients are laid out as the scripts make them. Inductor's caches
    are off: a graph cached before a fake changed would replay the old strides."""
    import kernels
    from torch._inductor.utils import run_and_get_code

    def three_ops(q, k, v, z, keys, logits, y):
        return kernels.attention(q, k, v), kernels.info_nce(z, keys, 0.2, z.shape[0]), kernels.cross_entropy(logits, y)

    torch.manual_seed(0)
    q, k, v = qkv_views(3, 7, 2, 16, torch.float32)
    z, keys, _, _ = info_nce_inputs(torch.float32, torch.float32, B=3)
    logits = F.linear(torch.randn(3, 32, device=DEVICE), torch.randn(10, 32, device=DEVICE)).requires_grad_()
    y = torch.randint(0, 10, (3,), device=DEVICE)
    mean_grad = torch.full((), 1 / 3, device=DEVICE).expand(3)
    incoming = (torch.randn(3, 7, 2, 16, device=DEVICE).transpose(1, 2), mean_grad, mean_grad)
    inputs = (q, k, v, z, keys, logits)

    def outputs_and_grads(fn):
        outs = fn(q, k, v, z, keys, logits, y)
        return [*outs, *torch.autograd.grad(outs, inputs, incoming)]

    with torch._inductor.config.patch(fx_graph_cache=False, **{"cpp.vec_isa_ok": False}), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got, code = run_and_get_code(outputs_and_grads, torch.compile(three_ops, fullgraph=True))
    code = "\n".join(code)
    for op in ("attention_fwd", "attention_bwd", "info_nce_fwd", "info_nce_dq", "info_nce_dk", "cross_entropy_fwd"):
        assert f"rrcm.{op}" in code, op
    assert "assert_size_stride(buf" in code  # the real outputs are checked against the fakes
    kernels.use("torch")
    assert_close(got, outputs_and_grads(three_ops), torch.float32)
