"""What a GPU would reject, checked without one: every kernel, launched the way the ops launch it, must compile
for sm_80 and sm_90a in every autotune config and dtype without register spills or too much shared memory
(ptxas -v, through bench/compile_report.py), with fp32 products as 3xTF32 (not TF32) and bf16 ones on the
tensor cores; and
every launch grid the ops compute at the largest shapes the scripts make must fit CUDA's limits."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from bench.launches import body, capture
from conftest import ROOT
from kernels import launch
from model import DATASETS, PRESETS

# By module path: the package exports a function named `attention` too.
attention, info_nce, cross_entropy = (importlib.import_module(f"kernels.{m}") for m in ("attention", "info_nce", "cross_entropy"))

# Opt-in dynamic shared memory per block: A100 163 KiB, H100 227 KiB (CUDA programming guide).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
ARCHS = ("sm_80", "sm_90a")


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot emit PTX
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_report.py"), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _name(fn) -> str:
    return f"{fn.fn.__module__.rpartition('.')[2]}.{fn.fn.__name__}"


def test_every_kernel_and_config_is_built(builds):
    """No kernel or config escapes the check: each @triton.jit kernel of kernels/, each shipped autotune config
    of it, every preset's head dim and both datasets' class counts, bf16 and fp32, both GPUs."""
    kernels = {f"{m.__name__.split('.')[-1]}.{name}" for m in (attention, info_nce, cross_entropy)
               for name in vars(m) if name.endswith("_kernel")}
    assert {b["kernel"] for b in builds} == kernels

    def built(kernel: str, dtype: str, arch: str, warps: int = None, stages: int = None, **consts) -> bool:
        return any(b["kernel"] == kernel and dtype in b["cases"] and b["arch"] == arch
                   and warps in (None, b["num_warps"]) and stages in (None, b["num_stages"])
                   and consts.items() <= b["constexprs"].items() for b in builds)

    for dtype in ("bf16", "fp32"):
        for arch in ARCHS:
            for fn, configs in launch.SHIPPED.items():
                for c in configs:
                    assert built(_name(fn), dtype, arch, c.num_warps, c.num_stages, **c.kwargs), (_name(fn), c, dtype, arch)
            for p in PRESETS.values():
                for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
                    assert built(f"attention.{kernel}", dtype, arch, D_PAD=attention.d_pad(p["width"] // p["heads"]))
            for d in DATASETS.values():
                assert built("cross_entropy._cross_entropy_kernel", dtype, arch, BLOCK_C=cross_entropy.block_size(d["num_classes"]))


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


MULTIPLIES_TILES = ("attention.", "info_nce.")  # the kernels with tl.dot; cross-entropy has none


def test_fp32_is_not_plain_tf32(builds):
    """--precision fp32 must not mean TF32 inside the kernels (Triton's default for fp32 tl.dot: fp16's 10-bit
    mantissa). Every fp32 product is 3xTF32 (launch.dot): tf32x3 on every tl.dot of the Triton IR,
    and in the PTX tensor-core products on operands split into TF32 high and low parts (cvt.rna.tf32.f32),
    which plain TF32 never emits."""
    fp32 = [b for b in builds if not b["error"] and b["dtype"] == "fp32" and b["kernel"].startswith(MULTIPLIES_TILES)]
    assert fp32
    plain = [f"{b['kernel']} {b['config']} {b['arch']}: IR {b['dot_precisions']}, PTX {b['mma']}, split {b['tf32_split']}"
             for b in fp32 if not (b["dot_precisions"] == ["tf32x3"] and b["mma"] == ["tf32"] and b["tf32_split"])]
    assert not plain, "\n".join(plain)


def test_bf16_runs_on_tensor_cores(builds):
    """bf16 tiles go to the tensor cores as they are (mma.sync on sm_80, wgmma on sm_90a)."""
    bf16 = [b for b in builds if not b["error"] and b["dtype"] == "bf16" and b["kernel"].startswith(MULTIPLIES_TILES)]
    assert bf16
    assert all(b["mma"] == ["bf16"] for b in bf16), [f"{b['kernel']} {b['config']} {b['arch']}: {b['mma']}" for b in bf16]


def test_info_nce_of_two_dtypes_compiles(builds):
    """What InfoNCE launches for a bf16 query against fp32 keys (and the reverse) is compiled for sm_90a like
    every other launch: one dtype for both operands, or tl.dot would refuse it on the GPU."""
    for case in ("bf16 q + fp32 k", "fp32 q + bf16 k"):
        mixed = [b for b in builds if case in b["cases"] and b["arch"] == "sm_90a"]
        assert {b["kernel"] for b in mixed} == {"info_nce._lse_kernel", "info_nce._weighted_sum_kernel"}, case
        for b in mixed:
            operands = {t for name, t in b["signature"].items() if name in ("Q", "K", "A", "Bm")}
            assert not b["error"] and operands == {"*fp32"}, (case, b["kernel"], b["signature"], b["error"])


# ----------------------------------------------------------------------------------------------------
# Launch grids at the largest shapes the scripts make, as the ops compute them: each op's body runs on meta
# tensors (nothing is allocated) while bench.launches.capture records the grid of every launch under every
# shipped config, the one a GPU's autotuner may pick.

GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA: gridDim.x, gridDim.y, gridDim.z
CERTIFY_BATCH = 10_000  # noisy copies per forward pass: the largest certify.py --batch we plan for (default 1,000)
LENGTHS = sorted({2 + (d["img_size"] // d["patch_size"]) ** 2 for d in DATASETS.values()})  # 66, 198


def meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def launched_grids(op, *args) -> dict[str, list[tuple]]:
    """{kernel name: the grid under each shipped config} of every launch the op's body makes."""
    with capture() as launches:
        body(op, *args)
    grids = {}
    for captured in launches:
        grids.setdefault(captured.kernel.fn.__name__, []).extend(captured.grids)
    return grids


def assert_fit(grids: dict) -> None:
    bad = [(kernel, g) for kernel, gs in grids.items() for g in gs
           if not (1 <= len(g) <= 3 and all(1 <= n <= limit for n, limit in zip(g, GRID_LIMITS)))]
    assert not bad, bad


@pytest.mark.parametrize("preset", ["B", "B-Deep"])
@pytest.mark.parametrize("L", LENGTHS)
def test_attention_grids_fit(preset, L):
    """certify.py's largest batch through rRCM-B (12 heads of 64) and B-Deep (24 heads of 32): 240,000 heads,
    beyond the 65,535 of grid axes 1 and 2."""
    heads = PRESETS[preset]["heads"]
    q = meta(CERTIFY_BATCH, heads, L, PRESETS[preset]["width"] // heads)
    forward = launched_grids(attention._attention_fwd, q, q, q)
    backward = launched_grids(attention._attention_bwd, q, q, q, q, q, meta(CERTIFY_BATCH * heads, L, dtype=torch.float32))
    assert set(forward) == {"_fwd_kernel"} and set(backward) == {"_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    assert_fit(forward | backward)


@pytest.mark.parametrize("D", [256, 768])  # projector output; encoder width of B
def test_info_nce_grids_fit(D):
    """B = M = 32,768 rows of queries and keys on one GPU."""
    B = 32_768
    q, k, g, lse2 = meta(B, D), meta(B, D), meta(B, dtype=torch.float32), meta(B, dtype=torch.float32)
    forward = launched_grids(info_nce._info_nce_fwd, q, k, 0.2, 0)
    dq = launched_grids(info_nce._info_nce_dq, g, q, k, lse2, 0.2, 0)
    dk = launched_grids(info_nce._info_nce_dk, g, q, k, lse2, 0.2, 0)
    assert set(forward) == {"_lse_kernel"} and set(dq) == set(dk) == {"_weighted_sum_kernel"}
    for grids in (forward, dq, dk):
        assert_fit(grids)


@pytest.mark.parametrize("B,C", [(2 * CERTIFY_BATCH, 10), (4096, 1000)])
def test_cross_entropy_grids_fit(B, C):
    """20,000 rows of CIFAR-10's 10 classes (2 noisy copies of 10,000 images), 4,096 rows of ImageNet's 1,000."""
    grids = launched_grids(cross_entropy._cross_entropy_fwd, meta(B, C), meta(B, dtype=torch.int64))
    assert set(grids) == {"_cross_entropy_kernel"}
    assert_fit(grids)
