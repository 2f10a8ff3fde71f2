"""How every kernel in this package is launched: autotuned on a GPU, a fixed config under the CPU interpreter;
what fp32 means inside a kernel; and a way to see every launch an op makes without running it.

Tests run the kernels on CPU with TRITON_INTERPRET=1 (set before triton is imported). The interpreter
executes the same kernel code with numpy, which is slow and has two differences that matter here:
autotuning would only time numpy, and tl.dot on bf16 operands comes out wrong (numpy has no bf16).
"""
import contextlib
import dataclasses
import os
import sys

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import Autotuner
from triton.runtime.jit import KernelInterface

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Every autotuned kernel's shipped configs, also under the interpreter (which launches only the first), so
# that `capture` can show the grid of every config a GPU may pick and bench/compile_report.py build them all.
SHIPPED: dict = {}


@triton.jit
def tile(x, UPCAST: tl.constexpr):
    """Widen a loaded tile to fp32 when UPCAST is set: only under the interpreter with bf16 inputs.
    On a GPU bf16 tiles go to the tensor cores as they are, with fp32 accumulation."""
    if UPCAST:
        return x.to(tl.float32)
    return x


def upcast(t: torch.Tensor) -> bool:
    return INTERPRET and t.dtype == torch.bfloat16


@triton.jit
def dot(a, b):
    """a @ b accumulated in fp32, the one tl.dot of every kernel here: what fp32 means inside a kernel.

    fp32 tiles are multiplied as 3xTF32: each operand is split into a TF32 high part and a TF32 low part and
    three tensor-core products are summed in fp32. Its error is fp32's own (a CPU emulation of products over
    64 to 768 terms: 1e-7 of the sum of |products|, as fp32; plain TF32, Triton's default for fp32, gives
    1e-4, fp16's 10-bit mantissa). IEEE fp32 ("ieee": FMA, no tensor cores) spilled registers in every
    attention dk/dv config we compiled, down to 16 x 16 tiles (bench/README.md). bf16 and fp16 tiles go to
    the tensor cores as they are ("tf32" changes nothing for 16-bit operands). The dtype is known when the
    kernel is compiled, so only one branch is compiled in. (The interpreter ignores input_precision.)"""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision="tf32")


def autotuned(kernel, names: tuple, configs: list, key: list, interpreter: tuple | None = None):
    """Wrap `kernel` in triton.autotune over `configs` (tuples: block sizes in the order of `names`, then
    num_warps, num_stages). Returns (kernel, extra launch kwargs). Under the interpreter the block sizes
    `interpreter` (default: the first config's) are passed explicitly instead, since timing numpy says
    nothing about a GPU. The interpreter runs every program in Python, so its cost is programs x loop
    iterations, whatever the tile size: large tiles that still leave several tiles at the tests' shapes keep
    the tests of the scripts' GPU path (tests/test_gpu_path.py) affordable."""
    tuned = [triton.Config(dict(zip(names, c[: len(names)])), num_warps=c[-2], num_stages=c[-1]) for c in configs]
    SHIPPED[kernel] = tuned
    if INTERPRET:
        return kernel, dict(zip(names, interpreter)) if interpreter else dict(tuned[0].kwargs)
    return triton.autotune(tuned, key=key)(kernel), {}


# ----------------------------------------------------------------------------------------------------
# Seeing launches without running them (tests/test_gpu_compile.py, bench/compile_report.py)

@dataclasses.dataclass
class Launch:
    """One kernel launch an op made: the @triton.jit function, its arguments by name, and for every config
    the launch may run with (all shipped configs of an autotuned kernel), the config and its grid."""
    kernel: object
    args: dict
    configs: list
    grids: list


class _Recorder:
    """Stands in for a kernel (or its autotuner) inside `capture`: `kernel[grid](...)` records, runs nothing."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel
            warps, stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)  # Triton's defaults
            named = dict(zip(fn.arg_names, args)) | kwargs
            configs = SHIPPED.get(fn) or [triton.Config({}, num_warps=warps, num_stages=stages)]
            grids = [tuple(grid(named | c.kwargs)) if callable(grid) else tuple(grid) for c in configs]
            self.launches.append(Launch(fn, named, configs, grids))
        return launch


@contextlib.contextmanager
def capture():
    """Inside the block every kernel of this package records its launches (into the yielded list) instead of
    running. With meta tensors and `body`, an op shows the grids and argument types it would launch with at
    shapes far too large to allocate here."""
    launches: list[Launch] = []
    package = __name__.rpartition(".")[0]
    modules = [m for name, m in list(sys.modules.items()) if name.startswith(package + ".")]
    saved = [(m, name, obj) for m in modules for name, obj in vars(m).items() if isinstance(obj, KernelInterface)]
    for m, name, obj in saved:
        setattr(m, name, _Recorder(obj, launches))
    try:
        yield launches
    finally:
        for m, name, obj in saved:
            setattr(m, name, obj)


def body(op, *args):
    """The Python body of a torch.library custom op, called directly: through the dispatcher, meta tensors
    would reach the op's fake instead. (CustomOpDef keeps the decorated function as _init_fn.)"""
    return op._init_fn(*args)


def _fix_interpreter_index() -> None:
    """Triton's interpreter before 3.7 turns a scalar (a numpy array of shape (1,)) into a Python int with
    int(array), which NumPy >= 2.4 refuses ("only 0-dimensional arrays ..."), so every `range(0, L, BLOCK)`
    over a runtime bound fails. Later Triton squeezes the array first; this does the same for the older one."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patch


if INTERPRET:
    try:
        int(np.zeros(1))
    except TypeError:
        _fix_interpreter_index()
