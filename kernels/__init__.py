"""The three ops the model and the losses call: attention, info_nce, cross_entropy.

Each has a fused Triton kernel and a plain PyTorch reference beside it (one file per family). Which one
runs is chosen once per process with `use("triton" | "torch")` (the scripts' `--kernels` flag):
`triton` is the default when CUDA is available, `torch` otherwise. CPU tensors always take the
torch path unless TRITON_INTERPRET=1 is set, which is how the tests check the kernels without a GPU.
The torch path runs torch's own scaled_dot_product_attention for attention, not attention_reference:
the reference computes in fp32 whatever the input, which would undo bf16 autocast on a CPU. The
references stay the definitions every kernel, SDPA included, is tested against.
"""
import torch
import torch.nn.functional as F

from .attention import attention_triton
from .cross_entropy import cross_entropy_reference, cross_entropy_triton
from .info_nce import info_nce_reference, info_nce_triton
from .launch import INTERPRET

BACKENDS = ("triton", "torch")
_backend = "triton" if torch.cuda.is_available() else "torch"


def use(backend: str) -> None:
    """Select the kernels for this process. Triton needs a GPU, or the CPU interpreter (tests only)."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and not (torch.cuda.is_available() or INTERPRET):
        raise ValueError("--kernels triton needs a CUDA GPU; use --kernels torch on this machine")
    _backend = backend


def backend() -> str:
    return _backend


def _fused(t: torch.Tensor) -> bool:
    return _backend == "triton" and (t.is_cuda or INTERPRET)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape [B, H, L, D]."""
    return attention_triton(q, k, v) if _fused(q) else F.scaled_dot_product_attention(q, k, v)


def info_nce(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """Per-row InfoNCE loss [B], Eq. (7)-(8): row i's positive is k[offset + i], the other keys are negatives.
    q and k may differ in dtype (a bf16 query against fp32 keys): the loss is computed in, and returned in,
    the wider one."""
    return info_nce_triton(q, k, tau, offset) if _fused(q) else info_nce_reference(q, k, tau, offset)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row softmax cross-entropy [B] of logits [B, C] against integer labels y [B]."""
    return cross_entropy_triton(logits, y) if _fused(logits) else cross_entropy_reference(logits, y)
