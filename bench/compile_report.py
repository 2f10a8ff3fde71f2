"""Compile every Triton kernel in kernels/ for sm_80 (A100) and sm_90a (H100) on a machine without a GPU,
in every autotune config the code ships and every dtype and head size the scripts use, and read what
ptxas -v says about each build: registers per thread, spill bytes, shared memory.

    python bench/compile_report.py            # markdown table (bench/README.md records one)
    python bench/compile_report.py --json     # one JSON object per build (tests/test_gpu_compile.py)

Triton lowers to PTX on any machine; the cubin comes from the ptxas binaries shipped in the triton wheel
(`ptxas` for sm_80 and `ptxas-blackwell` for sm_90a, the same choice Triton makes on a GPU). Every run
compiles from scratch in a fresh cache directory, so a stale cache can never vouch for changed code.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# The interpreter replaces @triton.jit with a numpy emulator that cannot lower to PTX; the tests set it,
# so it is dropped here, before triton is imported (the test runs this file in a subprocess).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from model import DATASETS, PRESETS  # noqa: E402

ARCHS = {80: "sm_80", 90: "sm_90a"}  # Triton compiles capability 90 as sm_90a
DTYPES = ("bf16", "fp32")             # bf16 under autocast on a GPU, fp32 with --precision fp32
PTXAS_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _module(name: str):
    # By module path: `kernels.attention` as an attribute is the function that kernels/__init__.py exports.
    return importlib.import_module(f"kernels.{name}")


def head_dim_pads() -> list[int]:
    """D_PAD of every preset's attention head (64 for tiny, S and B; 32 for B-Deep)."""
    pad = _module("attention").d_pad
    return sorted({pad(p["width"] // p["heads"]) for p in PRESETS.values()})


def _attention_builds() -> list[dict]:
    mod = _module("attention")
    common = dict(Q="*T", K="*T", V="*T", LSE="*fp32", L="i32", D="i32", scale_log2="fp32")
    signatures = {
        "_fwd_kernel": common | dict(O="*T"),
        "_bwd_dkdv_kernel": common | dict(DO="*T", DELTA="*fp32", DK="*T", DV="*T", scale="fp32"),
        "_bwd_dq_kernel": common | dict(DO="*T", DELTA="*fp32", DQ="*T", scale="fp32"),
    }
    return [dict(module="attention", kernel=name, signature=sig, aligned=("D",),
                 constexprs=dict(zip(mod.BLOCKS, c[:2]), D_PAD=d_pad, UPCAST=False), num_warps=c[2], num_stages=c[3])
            for name, sig in signatures.items() for c in mod.CONFIGS for d_pad in head_dim_pads()]


def _info_nce_builds() -> list[dict]:
    mod = _module("info_nce")
    lse = dict(Q="*T", K="*T", LSE="*fp32", B="i32", M="i32", D="i32", scale_log2="fp32")
    wsum = dict(A="*T", Bm="*T", LSE="*fp32", G="*fp32", OUT="*fp32", R="i32", C="i32", D="i32", scale_log2="fp32")
    builds = [dict(module="info_nce", kernel="_lse_kernel", signature=lse, aligned=("D",),
                   constexprs=dict(zip(mod.FWD_BLOCKS, c[:-2]), UPCAST=False), num_warps=c[-2], num_stages=c[-1])
              for c in mod.FWD_CONFIGS]
    # LSE_ON_ROWS is True for dq and False for dk: two different kernels after constant folding.
    builds += [dict(module="info_nce", kernel="_weighted_sum_kernel", signature=wsum, aligned=("D",),
                    constexprs=dict(zip(mod.BWD_BLOCKS, c[:-2]), LSE_ON_ROWS=rows, UPCAST=False),
                    num_warps=c[-2], num_stages=c[-1])
               for c in mod.BWD_CONFIGS for rows in (True, False)]
    return builds


def _cross_entropy_builds() -> list[dict]:
    mod = _module("cross_entropy")
    sig = dict(X="*T", Y="*i64", LOSS="*fp32", GRAD="*T", C="i32")
    classes = sorted({d["num_classes"] for d in DATASETS.values()})
    return [dict(module="cross_entropy", kernel="_cross_entropy_kernel", signature=sig, aligned=(),
                 constexprs=dict(BLOCK_C=mod.block_size(c)), num_warps=mod.num_warps(mod.block_size(c)), num_stages=3)
            for c in classes]


def builds() -> list[dict]:
    """Every (kernel, config, dtype, arch) the code can launch on a GPU."""
    kernel_builds = _attention_builds() + _info_nce_builds() + _cross_entropy_builds()
    return [b | dict(dtype=dtype, arch=arch) for b in kernel_builds for dtype in DTYPES for arch in ARCHS]


def _signature(fn, build: dict) -> tuple[dict, dict]:
    """Triton's signature and alignment attributes for one build ("*T" is a pointer to the build's dtype).
    Pointers are 16-byte aligned (torch allocations are); integers named in `aligned` are multiples of
    16 at the scripts' shapes (head dim 64 or 32, feature dim 256), as Triton would specialise them."""
    sig = build["signature"]
    missing = set(fn.arg_names) - set(sig) - set(build["constexprs"])
    if missing or set(sig) - set(fn.arg_names):
        raise ValueError(f"{build['kernel']}: compile_report's signature is out of date (arguments {fn.arg_names})")
    types = {name: "constexpr" if name in build["constexprs"] else sig[name].replace("T", build["dtype"])
             for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if types[name].startswith("*") or name in build["aligned"]}
    return types, attrs


def label(build: dict) -> str:
    consts = " ".join(f"{k}={v}" for k, v in build["constexprs"].items() if k != "UPCAST")
    return f"{consts} w{build['num_warps']} s{build['num_stages']}"


def compile_one(build: dict) -> dict:
    """Compile one build to a cubin; returns the build's row with registers, spills, shared memory or error."""
    from triton import knobs
    fn = getattr(_module(build["module"]), build["kernel"])
    row = dict(kernel=f"{build['module']}.{build['kernel']}", config=label(build), dtype=build["dtype"],
               arch=ARCHS[build["arch"]], regs=None, spill_stores=None, spill_loads=None, shared=None, error=None)
    log = io.StringIO()
    try:
        types, attrs = _signature(fn, build)
        src = ASTSource(fn=fn, signature=types, constexprs=build["constexprs"], attrs=attrs)
        knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v anyway; this prints its report
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", build["arch"], 32),
                                      options=dict(num_warps=build["num_warps"], num_stages=build["num_stages"]))
    except Exception as e:  # a compile error is a result to report, not a crash of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return row
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if not (spills and regs):
        row["error"] = "no ptxas -v report in the compile log"
        return row
    row.update(regs=int(regs[1]), spill_stores=int(spills[1]), spill_loads=int(spills[2]), shared=compiled.metadata.shared)
    return row


def check_ptxas() -> None:
    """Stop with one line if the wheel lacks the ptxas binaries Triton needs for these targets."""
    for name in ("ptxas", "ptxas-blackwell"):
        path = os.path.join(PTXAS_DIR, name)
        if not os.access(path, os.X_OK):
            raise SystemExit(f"compile_report: {path} not found (it ships in the triton wheel); cannot build cubins")


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"


def run_all(workers: int) -> list[dict]:
    """Compile every build, `workers` at a time, in a fresh cache directory."""
    check_ptxas()
    with tempfile.TemporaryDirectory() as cache, \
            ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cache,)) as pool:
        return list(pool.map(compile_one, builds()))


def markdown(rows: list[dict]) -> str:
    lines = [f"triton {triton.__version__}; regs / spill stores+loads (bytes) / shared memory (bytes)",
             "", "| kernel | config | dtype | sm_80 | sm_90a |", "|---|---|---|---|---|"]
    cells = {}
    for r in rows:
        cell = r["error"] or f"{r['regs']} / {r['spill_stores']}+{r['spill_loads']} / {r['shared']}"
        cells.setdefault((r["kernel"], r["config"], r["dtype"]), {})[r["arch"]] = cell
    for (kernel, config, dtype), by_arch in cells.items():
        lines.append(f"| {kernel} | {config} | {dtype} | {by_arch.get('sm_80', '')} | {by_arch.get('sm_90a', '')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object per build instead of a table")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="compiles in parallel")
    args = p.parse_args()
    rows = run_all(args.workers)
    print("\n".join(json.dumps(r) for r in rows) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
