"""Fused InfoNCE, Eq. (7)-(8) of the paper, forward and backward.

    loss_i = logsumexp_j (q_i . k_j / tau) - q_i . k_{offset + i} / tau

q [B, D] and k [M, D] are L2-normalised by the caller; M >= B because k may hold the keys gathered from
every rank, and row i's positive sits at `offset + i` (offset = rank * B). The kernels tile over k with an
online log-sum-exp, so the B x M similarity matrix is never stored: memory is O((B + M) D), which is what
keeps a global batch of 4096+ cheap (compare Inf-CL, Wang et al. 2024).

Gradients, with g_i the incoming gradient of loss_i and p_ij = softmax_j(q_i . k_j / tau):
    dq_i = g_i / tau * (sum_j p_ij k_j - k_pos(i))
    dk_j = 1 / tau * (sum_i g_i p_ij q_i - g_i q_i [j = pos(i)])
The sums are one kernel run twice (rows = queries, then rows = keys); the positive terms are O(B D)
and done in torch. q and k may come in different dtypes (a bf16 query under autocast, fp32 gathered keys):
both are cast to the wider one before launch; the loss comes back in fp32. fp32 products are 3xTF32
(launch.dot). Autotune configs are a first guess, not yet tuned on a GPU, only known to compile
without spills (see bench/gpu_builds.md).
"""
import torch
import triton
import triton.language as tl

from .launch import autotuned, dot, needs_upcast, upcast_tile

LOG2E = 1.4426950408889634

# Unmeasured guesses (no GPU has run them yet), kept to those that compile without register spills for sm_80
# and sm_90a in bf16 and in fp32 (3xTF32, launch.dot), under Triton 3.6 and 3.9
# (tests/test_gpu_compile.py; bench/gpu_builds.md has the table). In fp32, 64 x 128 x 64 (lse) and 64 x 64 x 64
# x 128 (weighted sum) spilled; a 32-wide reduction chunk is what fits. The first config is the
# interpreter's: small, so the CPU tests loop over several tiles.
# (BLOCK_R rows, BLOCK_C columns, BLOCK_D reduction chunk, warps, stages)
FWD_BLOCKS = ("BLOCK_R", "BLOCK_C", "BLOCK_D")
FWD_CONFIGS = [(32, 32, 32, 4, 2), (128, 64, 32, 8, 3)]
# (BLOCK_R, BLOCK_C, BLOCK_D, BLOCK_O output columns, warps, stages)
BWD_BLOCKS = ("BLOCK_R", "BLOCK_C", "BLOCK_D", "BLOCK_O")
BWD_CONFIGS = [(32, 32, 32, 32, 4, 2), (64, 32, 32, 128, 8, 3)]


@triton.jit
def _scores(A, Bm, rows, cols, row_ok, col_ok, D, scale_log2,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """s[r, c] = (A[r] . Bm[c]) * scale_log2, reducing over D in chunks (D may be 768: too wide for one tile)."""
    s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        a = upcast_tile(tl.load(A + rows[:, None].to(tl.int64) * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0), UPCAST)
        b = upcast_tile(tl.load(Bm + cols[:, None].to(tl.int64) * D + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0), UPCAST)
        s += dot(a, tl.trans(b))
    return s * scale_log2


@triton.jit
def _lse_kernel(Q, K, LSE, B, M, D, scale_log2,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, M, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < M
        s = _scores(Q, K, rows, cols, row_ok, col_ok, D, scale_log2, BLOCK_R, BLOCK_C, BLOCK_D, UPCAST)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)  # log2 units


@triton.jit
def _weighted_sum_kernel(A, Bm, LSE, G, OUT, R, C, D, scale_log2,
                         LSE_ON_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, UPCAST: tl.constexpr):
    """OUT[r, o] = sum_c w * exp2(s[r, c] - lse) * Bm[c, o] over one tile of output columns o.
    LSE_ON_ROWS: rows are queries (lse and g belong to r; gives dq). Otherwise rows are keys and the
    softmax normaliser and weight belong to the column c (gives dk)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < R
    out_ok = outs < D
    if LSE_ON_ROWS:
        lse_r = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
        g_r = tl.load(G + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_O], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        s = _scores(A, Bm, rows, cols, row_ok, col_ok, D, scale_log2, BLOCK_R, BLOCK_C, BLOCK_D, UPCAST)
        if LSE_ON_ROWS:
            p = tl.exp2(s - lse_r[:, None])
        else:
            lse_c = tl.load(LSE + cols, mask=col_ok, other=float("inf"))
            g_c = tl.load(G + cols, mask=col_ok, other=0.0)
            p = tl.exp2(s - lse_c[None, :]) * g_c[None, :]
        p = tl.where(col_ok[None, :], p, 0.0)
        b = upcast_tile(tl.load(Bm + cols[:, None].to(tl.int64) * D + outs[None, :], mask=col_ok[:, None] & out_ok[None, :], other=0.0), UPCAST)
        acc += dot(p.to(b.dtype), b)
    if LSE_ON_ROWS:
        acc = acc * g_r[:, None]
    tl.store(OUT + rows[:, None].to(tl.int64) * D + outs[None, :], acc, mask=row_ok[:, None] & out_ok[None, :])


_lse, _lse_blocks = autotuned(_lse_kernel, FWD_BLOCKS, FWD_CONFIGS, ["B", "M", "D"])
_wsum, _wsum_blocks = autotuned(_weighted_sum_kernel, BWD_BLOCKS, BWD_CONFIGS, ["R", "C", "D", "LSE_ON_ROWS"])


def lse_grid(B: int, meta: dict) -> tuple[int]:
    """One program per BLOCK_R query rows, on axis 0 (up to 2^31 - 1 programs)."""
    return (triton.cdiv(B, meta["BLOCK_R"]),)


def weighted_sum_grid(R: int, D: int, meta: dict) -> tuple[int, int]:
    """Row tiles on axis 0 (up to 2^31 - 1); output-column tiles on axis 1, D / BLOCK_O: 24 for D = 768."""
    return triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_O"])


def _weighted_sum(a, b, lse, g, lse_on_rows: bool, scale_log2: float) -> torch.Tensor:
    out = torch.empty(a.shape, device=a.device, dtype=torch.float32)
    _wsum[lambda meta: weighted_sum_grid(a.shape[0], a.shape[1], meta)](a, b, lse, g, out, a.shape[0], b.shape[0], a.shape[1], scale_log2,
                LSE_ON_ROWS=lse_on_rows, UPCAST=needs_upcast(a), **_wsum_blocks)
    return out


def _common(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k contiguous in one dtype, the wider of the two (torch.promote_types): tl.dot needs operands of
    one dtype, and a bf16 query (autocast) against fp32 gathered keys is then computed in fp32, as the
    reference computes it, never rounded down to bf16."""
    dtype = torch.promote_types(q.dtype, k.dtype)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous()


# Custom ops (see attention.py): torch.compile keeps each as one opaque node. Outputs are new contiguous
# tensors; each fake allocates them with the same function as the op, so their layout and dtype agree.
@torch.library.custom_op("rrcm::info_nce_fwd", mutates_args=())
def _info_nce_fwd(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss [B] in fp32, row log-sum-exp [B] in fp32, log2 units)."""
    B, D = q.shape
    q, k = _common(q, k)
    loss, lse2 = _info_nce_fwd_outputs(q, k, tau, offset)
    _lse[lambda meta: lse_grid(B, meta)](q, k, lse2, B, k.shape[0], D, LOG2E / tau, UPCAST=needs_upcast(q), **_lse_blocks)
    positive = (q.float() * k[offset:offset + B].float()).sum(-1) / tau
    loss.copy_(lse2 / LOG2E - positive)
    return loss, lse2


def _info_nce_fwd_outputs(q, k, tau, offset) -> tuple[torch.Tensor, torch.Tensor]:
    B = q.shape[0]
    # The loss in fp32 (float64 for gradcheck) whatever the inputs: it is computed in fp32, and a bf16 loss would
    # round what the scripts log and sum to 3 significant digits.
    loss_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    return q.new_empty(B, dtype=loss_dtype), q.new_empty(B, dtype=torch.float32)


_info_nce_fwd.register_fake(_info_nce_fwd_outputs)


@torch.library.custom_op("rrcm::info_nce_dq", mutates_args=())
def _info_nce_dq(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse2: torch.Tensor, tau: float, offset: int) -> torch.Tensor:
    """d loss / dq [B, D] in q's dtype, contiguous."""
    dq = _info_nce_dq_outputs(g, q, k, lse2, tau, offset)
    g, (q, k), lse2 = g.float().contiguous(), _common(q, k), lse2.contiguous()
    ws = _weighted_sum(q, k, lse2, g, True, LOG2E / tau)
    ws -= g[:, None] * k[offset:offset + q.shape[0]].float()
    return torch.div(ws, tau, out=dq)  # written into q's dtype, no temporary


def _info_nce_dq_outputs(g, q, k, lse2, tau, offset) -> torch.Tensor:
    return q.new_empty(q.shape)


_info_nce_dq.register_fake(_info_nce_dq_outputs)


@torch.library.custom_op("rrcm::info_nce_dk", mutates_args=())
def _info_nce_dk(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse2: torch.Tensor, tau: float, offset: int) -> torch.Tensor:
    """d loss / dk [M, D] in k's dtype, contiguous."""
    dk_out = _info_nce_dk_outputs(g, q, k, lse2, tau, offset)
    g, (q, k), lse2 = g.float().contiguous(), _common(q, k), lse2.contiguous()
    dk = _weighted_sum(k, q, lse2, g, False, LOG2E / tau)
    dk[offset:offset + q.shape[0]] -= g[:, None] * q.float()
    return torch.div(dk, tau, out=dk_out)  # written into k's dtype, no temporary


def _info_nce_dk_outputs(g, q, k, lse2, tau, offset) -> torch.Tensor:
    return k.new_empty(k.shape)


_info_nce_dk.register_fake(_info_nce_dk_outputs)


def _info_nce_setup(ctx, inputs, output):
    q, k, tau, offset = inputs
    ctx.save_for_backward(q, k, output[1])
    ctx.tau, ctx.offset = tau, offset


def _info_nce_backward(ctx, g, _dlse):
    q, k, lse2 = ctx.saved_tensors
    dq = _info_nce_dq(g, q, k, lse2, ctx.tau, ctx.offset) if ctx.needs_input_grad[0] else None
    dk = _info_nce_dk(g, q, k, lse2, ctx.tau, ctx.offset) if ctx.needs_input_grad[1] else None  # keys are usually stop-grad
    return dq, dk, None, None


_info_nce_fwd.register_autograd(_info_nce_backward, setup_context=_info_nce_setup)


def info_nce_triton(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """Per-row InfoNCE loss [B] of Eq. (7)-(8); fused, never stores the B x M similarities. q and k may differ
    in dtype: both are computed in the wider one; the loss comes back in fp32."""
    return _info_nce_fwd(q, k, float(tau), int(offset))[0]


def info_nce_reference(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """Plain PyTorch InfoNCE (stores the B x M logits), the definition the kernel is tested against. Computed as the
    kernel computes it on every device: products of the given values summed in fp32, the log-sum-exp in fp32 (autocast
    is off here, or it would round the logits to bf16 on a CPU)."""
    wide = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)  # fp32 (float64 for gradcheck)
    with torch.autocast(q.device.type, enabled=False):
        logits = q.to(wide) @ k.to(wide).T / tau
        positive = logits[torch.arange(q.shape[0], device=q.device), offset + torch.arange(q.shape[0], device=q.device)]
        return torch.logsumexp(logits, dim=1) - positive
