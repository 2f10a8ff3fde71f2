"""Every kernel launch an op makes, seen without running it (tests/test_gpu_compile.py, bench/compile_report.py):
inside `capture()` each @triton.jit kernel of the kernels package records its arguments and, for every
shipped config (kernels.launch.SHIPPED), the grid it would launch with. With meta tensors and `body`, an op
shows its launches at shapes far too large to allocate here.
"""
import contextlib
import dataclasses
import sys

import triton
from triton.runtime import Autotuner
from triton.runtime.jit import KernelInterface

from kernels.launch import SHIPPED

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
    package = "kernels"
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
