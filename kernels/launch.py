"""How every kernel in this package is launched: autotuned on a GPU, a fixed config under the CPU interpreter.

Tests run the kernels on CPU with TRITON_INTERPRET=1 (set before triton is imported). The interpreter
executes the same kernel code with numpy, which is slow and has two differences that matter here:
autotuning would only time numpy, and tl.dot on bf16 operands comes out wrong (numpy has no bf16).
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def tile(x, UPCAST: tl.constexpr):
    """Widen a loaded tile to fp32 when UPCAST is set: only under the interpreter with bf16 inputs.
    On a GPU bf16 tiles go to the tensor cores as they are, with fp32 accumulation."""
    if UPCAST:
        return x.to(tl.float32)
    return x


def upcast(t: torch.Tensor) -> bool:
    return INTERPRET and t.dtype == torch.bfloat16


def autotuned(kernel, names: tuple, configs: list, key: list):
    """Wrap `kernel` in triton.autotune over `configs` (tuples: block sizes in the order of `names`, then
    num_warps, num_stages). Returns (kernel, extra launch kwargs). Under the interpreter the first
    config is passed explicitly instead, since timing numpy says nothing about a GPU."""
    if INTERPRET:
        return kernel, dict(zip(names, configs[0][: len(names)]))
    tuned = [triton.Config(dict(zip(names, c[: len(names)])), num_warps=c[-2], num_stages=c[-1]) for c in configs]
    return triton.autotune(tuned, key=key)(kernel), {}
