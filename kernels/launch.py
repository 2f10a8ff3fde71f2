"""How every kernel in this package is launched: autotuned on a GPU, a fixed config under the CPU interpreter;
and what fp32 means inside a kernel.

Tests run the kernels on CPU with TRITON_INTERPRET=1 (set before triton is imported). The interpreter
executes the same kernel code with numpy, which is slow and has two differences that matter here:
autotuning would only time numpy, and tl.dot on bf16 operands comes out wrong (numpy has no bf16).
"""
import os

import numpy as np
import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Every autotuned kernel's shipped configs, also under the interpreter (which launches only the first): the
# tests and bench/compile_report.py check the grid and the build of every config a GPU may pick.
SHIPPED: dict = {}


@triton.jit
def upcast_tile(x, UPCAST: tl.constexpr):
    """Widen a loaded tile to fp32 when UPCAST is set: only under the interpreter with bf16 inputs.
    On a GPU bf16 tiles go to the tensor cores as they are, with fp32 accumulation."""
    if UPCAST:
        return x.to(tl.float32)
    return x


def needs_upcast(t: torch.Tensor) -> bool:
    return INTERPRET and t.dtype == torch.bfloat16


@triton.jit
def dot(a, b):
    """a @ b accumulated in fp32, the one tl.dot of every kernel here: what fp32 means inside a kernel.

    fp32 tiles are multiplied as 3xTF32: each operand is split into a TF32 high part and a TF32 low part and
    three tensor-core products are summed in fp32. Its error is fp32's own (a CPU emulation of products over
    64 to 768 terms: 1e-7 of the sum of |products|, as fp32; plain TF32, Triton's default for fp32, gives
    1e-4, fp16's 10-bit mantissa). IEEE fp32 ("ieee": FMA, no tensor cores) spilled registers in every
    attention dk/dv config we compiled, down to 16 x 16 tiles (bench/gpu_builds.md). bf16 and fp16 tiles go to
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
    iterations, whatever the tile size: large tiles keep the tests of the scripts' GPU path
    (tests/test_gpu_path.py) affordable, and tests/test_kernels.py picks shapes that still span several."""
    tuned = [triton.Config(dict(zip(names, c[: len(names)])), num_warps=c[-2], num_stages=c[-1]) for c in configs]
    SHIPPED[kernel] = tuned
    if INTERPRET:
        return kernel, dict(zip(names, interpreter)) if interpreter else dict(tuned[0].kwargs)
    return triton.autotune(tuned, key=key)(kernel), {}


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


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language again at every call of a @triton.jit helper inside a kernel
    (`_patch_lang`: inspect.getmembers over the language's modules), although the kernel's launch has patched
    the same modules already and undoes it at its end; this package's kernels call their helpers (`dot`,
    `upcast_tile`, `_load`, `_scores`) in every loop iteration. A helper whose modules the running launch has
    patched now reuses the launch's patches; everything else goes to Triton's own function. (What it saves:
    bench/README.md, "The test suite".)"""
    import inspect

    from triton.runtime import interpreter
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return  # another Triton: leave it as it is
    original_patch, original_launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched: list[set] = []  # the modules the kernel launch now running has patched
    languages: dict = {}     # each helper's language modules: its module's imports, found once

    def patch_lang(fn):
        if fn not in languages:
            languages[fn] = frozenset(v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        langs = languages[fn]
        if patched and langs <= patched[-1]:
            return interpreter._LangPatchScope()  # nothing to patch, nothing to undo
        scope = original_patch(fn)
        if patched:
            patched[-1] |= langs
        return scope

    def launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return original_launch(self, *args, **kwargs)  # patches, runs the grid, undoes its patches
        finally:
            patched.pop()

    interpreter.GridExecutor.__call__ = launch
    interpreter._patch_lang = patch_lang


if INTERPRET:
    try:
        int(np.zeros(1))
    except TypeError:
        _fix_interpreter_index()
    _patch_language_once_per_launch()
