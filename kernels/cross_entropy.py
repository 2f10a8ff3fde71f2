"""Fused softmax cross-entropy with integer labels, for the fine-tuning head (10 or 1000 classes).

One program per row reads the logits once and writes both the loss and the gradient
softmax(x) - onehot(y) (the Liger-Kernel trick): backward is then a per-row scale of what forward kept,
with no second pass over the logits. The row maximum is subtracted before exponentiating, so logits of
any magnitude are safe. Rows up to 65536 classes are one tile.
"""
import torch
import triton
import triton.language as tl

from .launch import INTERPRET

MAX_CLASSES = 65536


@triton.jit
def _cross_entropy_kernel(X, Y, LOSS, GRAD, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * C + cols, mask=ok, other=float("-inf")).to(tl.float32)
    y = tl.load(Y + row)
    m = tl.max(x, 0)
    e = tl.exp(x - m)
    denom = tl.sum(e, 0)
    x_y = tl.sum(tl.where(cols == y, x, 0.0), 0)
    tl.store(LOSS + row, m + tl.log(denom) - x_y)
    grad = e / denom - tl.where(cols == y, 1.0, 0.0)
    tl.store(GRAD + row * C + cols, grad.to(GRAD.dtype.element_ty), mask=ok)


def block_size(C: int) -> int:
    return triton.next_power_of_2(C)


def num_warps(block: int) -> int:
    """About 8 logits per thread (32 x 8 = 256 per warp), so the row stays in registers."""
    return min(16, max(1, block // 256))


def grid(B: int) -> tuple[int]:
    """One program per row on axis 0 (up to 2^31 - 1 rows)."""
    return (B,)


# A custom op (see attention.py): torch.compile keeps it as one opaque node. Its outputs are new contiguous
# tensors whatever the logits' strides; the fake allocates them with the same function.
@torch.library.custom_op("rrcm::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss [B], d loss / d logits [B, C]), both in the logits' dtype."""
    B, C = logits.shape
    if C > MAX_CLASSES:
        raise ValueError(f"fused cross-entropy supports at most {MAX_CLASSES} classes, got {C}")
    logits = logits.contiguous()
    loss, grad = _cross_entropy_fwd_outputs(logits, y)
    loss32 = torch.empty(B, device=logits.device, dtype=torch.float32)
    block = block_size(C)
    warps = 1 if INTERPRET else num_warps(block)
    _cross_entropy_kernel[grid(B)](logits, y.contiguous(), loss32, grad, C, BLOCK_C=block, num_warps=warps)
    loss.copy_(loss32)
    return loss, grad


def _cross_entropy_fwd_outputs(logits, y) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape)


_cross_entropy_fwd.register_fake(_cross_entropy_fwd_outputs)


def _cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])  # only the gradient: backward is a per-row scale of it


def _cross_entropy_backward(ctx, g, _dgrad):
    (grad,) = ctx.saved_tensors
    return grad * g[:, None].to(grad.dtype), None


_cross_entropy_fwd.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def cross_entropy_triton(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row softmax cross-entropy [B] of logits [B, C] against labels y [B]; fused forward/backward."""
    return _cross_entropy_fwd(logits, y)[0]


def cross_entropy_reference(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch per-row cross-entropy (fp32 math), the definition the kernel is tested against."""
    wide = torch.promote_types(logits.dtype, torch.float32)  # fp32 math, float64 kept for gradcheck
    return torch.nn.functional.cross_entropy(logits.to(wide), y, reduction="none").to(logits.dtype)
