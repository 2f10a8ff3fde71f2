"""Fused (flash-style) non-causal attention for the ViT, forward and backward.

softmax(q k^T / sqrt(d)) v is computed tile by tile with an online softmax, so the L x L score matrix
is never stored (Dao et al. 2022; the layout follows the Triton tutorial 06-fused-attention).
Forward saves only the output and the row log-sum-exp; backward recomputes the scores tile by tile.

Shapes: q, k, v are [B, H, L, D]. L need not be a multiple of the block (rRCM uses L = 66 on CIFAR-10:
64 patches + class + time token, and 198 on ImageNet); D is any size up to 128 (padded to a power of two
inside the kernel). fp32, fp16 and bf16 inputs; all accumulation in fp32.

fp32 products are 3xTF32 (launch.dot), bf16 and fp16 ones go to the tensor cores as they are.
Autotune configs below are an untuned first guess: no GPU has been available to tune them yet; they are
only known to compile without spills (see bench/gpu_builds.md). Under TRITON_INTERPRET=1 (CPU tests) the
first config is used as is.
"""
import math

import torch
import triton
import triton.language as tl

from .launch import autotuned, dot, needs_upcast, upcast_tile

LOG2E = 1.4426950408889634

# (BLOCK_M query rows, BLOCK_N key rows, warps, stages) of each kernel. Unmeasured guesses (no GPU has run
# them yet), kept to those that compile without register spills for sm_80 and sm_90a, in bf16 and in fp32
# (3xTF32, launch.dot: about twice bf16's registers per tile), at head dims 32 and 64, under
# Triton 3.6 and 3.9 (tests/test_gpu_compile.py; bench/gpu_builds.md has the table). What spilled: 32 x 32 with
# 4 warps in the forward (bf16, D_PAD 32, sm_80, Triton 3.6), and every dk/dv tile over 16 x 32 or 32 x 16
# in fp32. Larger bf16 tiles compile but would need their own fp32 list; a GPU measurement should decide.
FWD_CONFIGS = [(64, 16, 4, 2), (32, 16, 4, 2)]
DKDV_CONFIGS = [(16, 32, 4, 2), (32, 16, 4, 2)]
DQ_CONFIGS = [(32, 32, 8, 2), (32, 16, 4, 2)]
# Under the interpreter (CPU tests) every kernel takes 128 x 128 tiles: at L = 66, CIFAR-10's sequence, every kernel is
# one program per head over one ragged tile, where the configs above make 5-15 programs x iterations per head. The
# interpreter runs every program in Python (~10 ms each), so this is what keeps tests/test_gpu_path.py affordable; the
# loops over several tiles, ragged ones included, are checked at L = 198 (ImageNet's, two tiles each way) by
# tests/test_kernels.py against PyTorch's attention.
INTERPRETER = (128, 128)


@triton.jit
def _load(X, base, rows, cols, row_ok, col_ok, D, UPCAST: tl.constexpr):
    """The [rows, cols] tile of one head's [L, D] matrix; out-of-range rows and columns read as 0."""
    return upcast_tile(tl.load(X + base + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0), UPCAST)


@triton.jit
def _program(L, BLOCK: tl.constexpr):
    """(head, tile) of this program on the one-axis grid that `grid` builds, tiles of a head adjacent."""
    tiles = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    return pid // tiles, pid % tiles


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, L, D, scale_log2,
                D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    bh, pid_m = _program(L, BLOCK_M)
    base = bh.to(tl.int64) * L * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < L
    col_ok = cols < D
    q = _load(Q, base, rows, cols, row_ok, col_ok, D, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < L
        k = _load(K, base, keys, cols, key_ok, col_ok, D, UPCAST)
        v = _load(V, base, keys, cols, key_ok, col_ok, D, UPCAST)
        s = dot(q, tl.trans(k)) * scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + rows[:, None] * D + cols[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    # Saved in log2 units: backward needs exactly p = exp2(s * scale_log2 - lse).
    tl.store(LSE + bh.to(tl.int64) * L + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, L, D, scale_log2, scale,
                     D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    # One program owns BLOCK_N keys and sweeps all queries, so dk and dv are written once (no atomics).
    bh, pid_n = _program(L, BLOCK_N)
    base = bh.to(tl.int64) * L * D
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    key_ok = keys < L
    col_ok = cols < D
    kv_mask = key_ok[:, None] & col_ok[None, :]
    k = _load(K, base, keys, cols, key_ok, col_ok, D, UPCAST)
    v = _load(V, base, keys, cols, key_ok, col_ok, D, UPCAST)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        q = _load(Q, base, rows, cols, row_ok, col_ok, D, UPCAST)
        do = _load(DO, base, rows, cols, row_ok, col_ok, D, UPCAST)
        # lse = +inf on padded rows makes their p exactly 0.
        lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
        s = dot(q, tl.trans(k)) * scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        dv += dot(tl.trans(p.to(do.dtype)), do)
        dp = dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + base + keys[:, None] * D + cols[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + keys[:, None] * D + cols[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, L, D, scale_log2, scale,
                   D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    bh, pid_m = _program(L, BLOCK_M)
    base = bh.to(tl.int64) * L * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < L
    col_ok = cols < D
    q_mask = row_ok[:, None] & col_ok[None, :]
    q = _load(Q, base, rows, cols, row_ok, col_ok, D, UPCAST)
    do = _load(DO, base, rows, cols, row_ok, col_ok, D, UPCAST)
    lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < L
        k = _load(K, base, keys, cols, key_ok, col_ok, D, UPCAST)
        v = _load(V, base, keys, cols, key_ok, col_ok, D, UPCAST)
        s = dot(q, tl.trans(k)) * scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        dp = dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k)
    tl.store(DQ + base + rows[:, None] * D + cols[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


BLOCKS, _KEY = ("BLOCK_M", "BLOCK_N"), ["L", "D_PAD"]
_fwd, _fwd_blocks = autotuned(_fwd_kernel, BLOCKS, FWD_CONFIGS, _KEY, INTERPRETER)
_bwd_dkdv, _bwd_dkdv_blocks = autotuned(_bwd_dkdv_kernel, BLOCKS, DKDV_CONFIGS, _KEY, INTERPRETER)
_bwd_dq, _bwd_dq_blocks = autotuned(_bwd_dq_kernel, BLOCKS, DQ_CONFIGS, _KEY, INTERPRETER)


def grid(L: int, BH: int, block: int) -> tuple[int]:
    """All B * H heads x cdiv(L, block) tiles on grid axis 0, which allows 2^31 - 1 programs: axes 1 and 2
    stop at 65,535, fewer than the heads of one B-Deep step (4096 images x 24). Tiles of one head are
    neighbours in launch order, so its K and V are read from L2 by all but the first."""
    return (BH * triton.cdiv(L, block),)


def _grid_of(block: str, L: int, BH: int):
    """The launch grid as Triton wants it: a function of the chosen config's block sizes."""
    return lambda meta: grid(L, BH, meta[block])


# Registered as custom ops (forward and backward), so torch.compile keeps each one as a single opaque node
# instead of tracing into the kernel launch, on a GPU and under the CPU interpreter alike. Every output is a
# new contiguous tensor whatever the inputs' strides (model.py passes q, k, v as strided views of one qkv
# projection), and each fake says exactly that: Inductor checks the real outputs against the fake's strides.
@torch.library.custom_op("rrcm::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, H, L, D] in q's dtype, row log-sum-exp [B * H, L] in fp32, log2 units)."""
    B, H, L, D = q.shape
    if D > 128:
        raise ValueError(f"fused attention supports head dim <= 128, got {D}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"fused attention needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, lse = _attention_fwd_outputs(q, k, v)
    scale = 1.0 / math.sqrt(D)
    _fwd[_grid_of("BLOCK_M", L, B * H)](q, k, v, o, lse, L, D, scale * LOG2E, D_PAD=d_pad(D), UPCAST=needs_upcast(q), **_fwd_blocks)
    return o, lse


def _attention_fwd_outputs(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, L, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B * H, L, dtype=torch.float32)


_attention_fwd.register_fake(_attention_fwd_outputs)


@torch.library.custom_op("rrcm::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, each in its input's dtype."""
    B, H, L, D = q.shape
    do, q, k, v, lse = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous()
    # delta_i = sum_d dO_id O_id: the row term of the softmax Jacobian, cheap enough for torch.
    delta = (do.float() * o.float()).sum(-1).reshape(B * H, L)
    dq, dk, dv = _attention_bwd_outputs(do, q, k, v, o, lse)
    scale = 1.0 / math.sqrt(D)
    args = (L, D, scale * LOG2E, scale)
    consts = dict(D_PAD=d_pad(D), UPCAST=needs_upcast(q))
    _bwd_dkdv[_grid_of("BLOCK_N", L, B * H)](q, k, v, do, lse, delta, dk, dv, *args, **consts, **_bwd_dkdv_blocks)
    _bwd_dq[_grid_of("BLOCK_M", L, B * H)](q, k, v, do, lse, delta, dq, *args, **consts, **_bwd_dq_blocks)
    return dq, dk, dv


def _attention_bwd_outputs(do, q, k, v, o, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_attention_bwd.register_fake(_attention_bwd_outputs)


def d_pad(D: int) -> int:
    """The head dim rounded up to a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(D))


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)  # q, k, v, o, lse: all that backward recomputes from


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return _attention_bwd(do, q, k, v, o, lse)


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused non-causal attention, q, k, v: [B, H, L, D] -> [B, H, L, D]."""
    return _attention_fwd(q, k, v)[0]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch attention, the definition the fused kernel is tested against (fp32 math)."""
    wide = torch.promote_types(q.dtype, torch.float32)  # fp32 math, float64 kept for gradcheck
    scores = q.to(wide) @ k.to(wide).transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (scores.softmax(-1) @ v.to(wide)).to(q.dtype)
