"""Each Triton kernel (run by the CPU interpreter, or on a GPU under RRCM_TEST_GPU=1) against its plain
PyTorch reference, forward and every gradient, at sizes that are not multiples of the blocks; torch's SDPA,
which the torch backend runs, against the same reference; and the references against finite differences."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import attention_reference, attention_triton
from kernels.cross_entropy import cross_entropy_reference, cross_entropy_triton
from kernels.info_nce import info_nce_reference, info_nce_triton
from kernels.launch import INTERPRET

DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
# On a GPU tl.dot takes fp32 operands as TF32, which keeps fp16's 10-bit mantissa: fp16's tolerance.
TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 4e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATTENTION_SHAPES = [(1, 16), (7, 32), (66, 64), (20, 24)]  # (L, D); 66 = CIFAR-10's 64 patches + 2 tokens


def grads(fn, inputs, g):
    out = fn(*inputs)
    return [out] + list(torch.autograd.grad(out, [t for t in inputs if torch.is_tensor(t) and t.requires_grad], g))


def assert_close(got, want, dtype):
    for a, b in zip(got, want):
        scale = max(1.0, b.float().abs().max().item())
        assert (a.float() - b.float()).abs().max().item() <= TOL[dtype] * scale


def attention_inputs(L, D, dtype):
    torch.manual_seed(L * D)
    q, k, v = [(torch.randn(2, 3, L, D, device=DEVICE) * 2).to(dtype).requires_grad_() for _ in range(3)]
    return (q, k, v), torch.randn(2, 3, L, D, device=DEVICE).to(dtype)


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


def test_info_nce_without_key_gradient():
    q = F.normalize(torch.randn(5, 32, device=DEVICE), dim=1).requires_grad_()
    k = F.normalize(torch.randn(9, 32, device=DEVICE), dim=1)
    (dq,) = torch.autograd.grad(info_nce_triton(q, k, 0.1, 4).sum(), q)
    (want,) = torch.autograd.grad(info_nce_reference(q, k, 0.1, 4).sum(), q)
    assert torch.allclose(dq, want, atol=1e-5 if DEVICE == "cpu" else TOL[torch.float32])


def test_info_nce_reference_is_eq_7():
    q = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    tau, offset = 0.2, 2
    for i in range(3):
        sims = [float(q[i] @ k[j]) / tau for j in range(5)]
        want = math.log(sum(math.exp(s) for s in sims)) - sims[offset + i]
        assert abs(info_nce_reference(q, k, tau, offset)[i].item() - want) < 1e-12


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


def test_dispatch_uses_triton_when_selected(triton_kernels, monkeypatch):
    import kernels
    calls = []
    monkeypatch.setattr(kernels, "attention_triton", lambda *a: calls.append(1) or attention_reference(*a))
    kernels.attention(*torch.randn(3, 1, 1, 4, 16, device=DEVICE))
    assert calls == [1]


def test_kernels_compile_as_opaque_ops(triton_kernels):
    """torch.compile(fullgraph=True) must take the three fused ops as single nodes (no graph break) and
    give the references' values and gradients."""
    import kernels

    def step(q, k, v, a, b, logits, y):
        return (kernels.attention(q, k, v).square().mean()
                + kernels.info_nce(F.normalize(a, dim=1), F.normalize(b, dim=1), 0.2, 0).mean()
                + kernels.cross_entropy(logits, y).mean())

    torch.manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, device=DEVICE, requires_grad=True)
    args = [leaf(1, 2, 7, 16) for _ in range(3)] + [leaf(5, 16) for _ in range(2)] + \
        [leaf(5, 10), torch.randint(0, 10, (5,), device=DEVICE)]
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    got_grads = torch.autograd.grad(got, args[:6])
    kernels.use("torch")
    want = step(*args)
    atol = 1e-5 if DEVICE == "cpu" else TOL[torch.float32]
    for a, b in zip(got_grads, torch.autograd.grad(want, args[:6])):
        assert torch.allclose(a, b, atol=atol)
    assert torch.allclose(got, want, atol=atol / 10)
