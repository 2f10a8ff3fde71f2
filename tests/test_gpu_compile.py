"""What a GPU would reject, checked without one: every kernel must compile for sm_80 and sm_90a in every
autotune config and dtype without register spills or too much shared memory (ptxas -v, through
bench/compile_report.py), and every launch grid must fit the hardware's limits at the largest shapes the
scripts produce."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import triton

from conftest import ROOT
from model import DATASETS, PRESETS

# By module path: the package exports a function named `attention` too.
attention, info_nce, cross_entropy = (importlib.import_module(f"kernels.{m}") for m in ("attention", "info_nce", "cross_entropy"))

# Opt-in dynamic shared memory per block: A100 163 KiB, H100 227 KiB (CUDA programming guide).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot emit PTX
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_report.py"), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_every_kernel_and_config_is_built(builds):
    """No kernel or config escapes the check: each @triton.jit kernel of kernels/, each shipped config,
    bf16 and fp32, both GPUs."""
    kernels = {f"{m.__name__.split('.')[-1]}.{name}" for m in (attention, info_nce, cross_entropy)
               for name in vars(m) if name.endswith("_kernel")}
    assert {b["kernel"] for b in builds} == kernels
    per_kernel = {"attention": len(attention.CONFIGS) * 2,   # x 2 head dims (64; 32 for B-Deep)
                  "info_nce._lse_kernel": len(info_nce.FWD_CONFIGS),
                  "info_nce._weighted_sum_kernel": len(info_nce.BWD_CONFIGS) * 2,  # x LSE_ON_ROWS
                  "cross_entropy": 2}                         # 10 and 1000 classes
    for kernel in kernels:
        expected = next(n for prefix, n in per_kernel.items() if kernel.startswith(prefix)) * 2 * 2  # dtypes x archs
        assert sum(b["kernel"] == kernel for b in builds) == expected, kernel


def test_every_build_compiles(builds):
    errors = [f"{b['kernel']} {b['config']} {b['dtype']} {b['arch']}: {b['error']}" for b in builds if b["error"]]
    assert not errors, "\n".join(errors)


def test_no_register_spills(builds):
    spills = [f"{b['kernel']} {b['config']} {b['dtype']} {b['arch']}: {b['spill_stores']} B stored, "
              f"{b['spill_loads']} B loaded" for b in builds if not b["error"] and b["spill_stores"] + b["spill_loads"]]
    assert not spills, "\n".join(spills)


def test_shared_memory_fits(builds):
    over = [f"{b['kernel']} {b['config']} {b['dtype']} {b['arch']}: {b['shared']} B" for b in builds
            if not b["error"] and b["shared"] > SHARED_LIMIT[b["arch"]]]
    assert not over, "\n".join(over)


# ----------------------------------------------------------------------------------------------------
# Launch grids at the largest shapes. Images per GPU: 8192 (certify --batch 8000 rounds up to this),
# times 2 for pre-training's two views; heads: B-Deep's 24; L: 2 + patches for CIFAR-10 and ImageNet.

IMAGES = 2 * 8192
HEADS = max(p["heads"] for p in PRESETS.values())
LENGTHS = sorted({2 + (d["img_size"] // d["patch_size"]) ** 2 for d in DATASETS.values()})


def fits(grid: tuple) -> bool:
    return len(grid) <= 3 and all(1 <= n <= limit for n, limit in zip(grid, GRID_LIMITS))


def test_grid_limits_are_those_of_cuda():
    """The old attention layout, B * H on axis 1, is rejected at these shapes: the check has teeth."""
    assert LENGTHS == [66, 198] and HEADS == 24
    assert not fits((triton.cdiv(198, 32), IMAGES * HEADS))


@pytest.mark.parametrize("L", LENGTHS)
def test_attention_grids_fit(L):
    for config in attention.CONFIGS:
        meta = dict(zip(attention.BLOCKS, config))
        for block in attention.BLOCKS:  # forward and dq tile queries (BLOCK_M), dk/dv keys (BLOCK_N)
            assert fits(attention.grid(L, IMAGES * HEADS, meta[block])), (L, config, block)


@pytest.mark.parametrize("D", [256, 768])  # projector output; encoder width of B
def test_info_nce_grids_fit(D):
    rows = 65536  # B = M = 32768 per GPU and beyond
    for config in info_nce.FWD_CONFIGS:
        assert fits(info_nce.lse_grid(rows, dict(zip(info_nce.FWD_BLOCKS, config))))
    for config in info_nce.BWD_CONFIGS:
        assert fits(info_nce.weighted_sum_grid(rows, D, dict(zip(info_nce.BWD_BLOCKS, config))))


def test_cross_entropy_grid_fits():
    assert fits(cross_entropy.grid(IMAGES))
    assert cross_entropy.block_size(1000) <= cross_entropy.MAX_CLASSES
