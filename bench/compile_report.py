"""Compile every Triton kernel in kernels/ for sm_80 (A100) and sm_90a (H100) on a machine without a GPU,
exactly as the ops launch them, in every autotune config the code ships, and read what ptxas -v says about
each build (registers per thread, spill bytes, shared memory) and which tensor-core instructions the PTX uses.

    python bench/compile_report.py            # markdown table (bench/README.md records one)
    python bench/compile_report.py --json     # one JSON object per build (tests/test_gpu_compile.py)

The builds are not listed by hand: each op runs on meta tensors at the dtypes and sizes the scripts use
(bf16 under autocast, fp32 with --precision fp32, and InfoNCE's query and keys in different dtypes) with
bench/launches.capture in place, which records every launch's arguments instead of running it; each launch
is then compiled in every shipped config. So a signature or constexpr the op passes on a GPU is the one
compiled here, mixed-dtype cases included. Triton lowers to PTX on any machine; the cubin comes from the
ptxas binaries shipped in the triton wheel (`ptxas` for sm_80 and `ptxas-blackwell` for sm_90a, the same
choice Triton makes on a GPU). Every run compiles from scratch in a fresh cache directory, so a stale cache
can never vouch for changed code.
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

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.launches import Launch, body, capture  # noqa: E402
from kernels import launch  # noqa: E402
from model import DATASETS, PRESETS  # noqa: E402

ARCHS = {80: "sm_80", 90: "sm_90a"}  # Triton compiles capability 90 as sm_90a
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # autocast on a GPU; --precision fp32
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}
PTXAS_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _module(name: str):
    # By module path: `kernels.attention` as an attribute is the function that kernels/__init__.py exports.
    return importlib.import_module(f"kernels.{name}")


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def cases() -> list[tuple[str, object, tuple]]:
    """(dtype label, custom op, its arguments as meta tensors) for every op at the scripts' sizes: attention at
    every preset's head dim and both datasets' sequence lengths, InfoNCE at every encoder width and projector
    dim with 2 ranks' keys (sizes the recipes keep multiples of 16), cross-entropy at both class counts."""
    att, nce, ce = (_module(m) for m in ("attention", "info_nce", "cross_entropy"))
    head_dims = sorted({p["width"] // p["heads"] for p in PRESETS.values()})
    lengths = sorted({2 + (d["img_size"] // d["patch_size"]) ** 2 for d in DATASETS.values()})
    features = sorted({p[k] for p in PRESETS.values() for k in ("width", "proj_dim")})
    pairs = [(name, dtype, dtype) for name, dtype in DTYPES.items()]
    pairs += [("bf16 q + fp32 k", torch.bfloat16, torch.float32), ("fp32 q + bf16 k", torch.float32, torch.bfloat16)]
    out = []
    for name, dtype in DTYPES.items():
        for D in head_dims:
            for L in lengths:
                q, lse = _meta(8, 12, L, D, dtype=dtype), _meta(8 * 12, L)
                out += [(name, att._attention_fwd, (q, q, q)), (name, att._attention_bwd, (q, q, q, q, q, lse))]
        for C in sorted({d["num_classes"] for d in DATASETS.values()}):
            out.append((name, ce._cross_entropy_fwd, (_meta(1024, C, dtype=dtype), _meta(1024, dtype=torch.int64))))
    for name, q_dtype, k_dtype in pairs:
        for D in features:
            q, k, g, lse2 = _meta(1024, D, dtype=q_dtype), _meta(2048, D, dtype=k_dtype), _meta(1024), _meta(1024)
            out += [(name, nce._info_nce_fwd, (q, k, 0.2, 1024)), (name, nce._info_nce_dq, (g, q, k, lse2, 0.2, 1024)),
                    (name, nce._info_nce_dk, (g, q, k, lse2, 0.2, 1024))]
    return out


def _build(captured: "Launch", config) -> dict:
    """One launch in one config as Triton would specialise it: pointers 16-byte aligned (torch allocations
    are), integer arguments that are multiples of 16 marked so, as Triton marks them."""
    fn, args = captured.kernel, captured.args | config.kwargs
    signature, aligned, constexprs = {}, [], {}
    for p in fn.params:
        value = args[p.name]
        if p.is_constexpr:
            constexprs[p.name] = value
        elif torch.is_tensor(value):
            signature[p.name] = "*" + SHORT[value.dtype]
            aligned.append(p.name)
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(p.name)
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot type argument {p.name} = {value!r}")
    return dict(module=fn.fn.__module__.rpartition(".")[2], kernel=fn.fn.__name__, signature=signature,
                aligned=aligned, constexprs=constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


def builds() -> list[dict]:
    """Every distinct (kernel, signature, config, arch) the ops launch, with the dtype labels of the cases that
    launch it (a mixed-dtype InfoNCE that casts to one dtype shares the fp32 builds)."""
    found: dict[str, dict] = {}
    for label, op, args in cases():
        with capture() as launches:
            body(op, *args)
        for captured in launches:
            for config in captured.configs:
                b = _build(captured, config)
                for arch in ARCHS:
                    key = json.dumps(b | dict(arch=arch), sort_keys=True)
                    found.setdefault(key, b | dict(arch=arch, dtype=label, cases=[]))["cases"].append(label)
    return list(found.values())


def label(build: dict) -> str:
    consts = " ".join(f"{k}={v}" for k, v in build["constexprs"].items() if k != "UPCAST")
    return f"{consts} w{build['num_warps']} s{build['num_stages']}"


def tensor_core_inputs(ptx: str) -> list[str]:
    """Operand types of the PTX's tensor-core instructions (mma.sync on sm_80, wgmma on sm_90a): e.g. ["bf16"],
    ["tf32"], or [] where every product is an ordinary fp32 FMA."""
    found = set()
    for instr in re.findall(r"\b(?:wgmma|mma)\.[\w.]+", ptx):
        found |= {part for part in instr.split(".") if part in ("tf32", "bf16", "f16", "e4m3", "e5m2", "s8", "u8")}
    return sorted(found)


def compile_one(build: dict) -> dict:
    """Compile one build to a cubin; returns the build's row with registers, spills, shared memory, how its
    products are computed (each tl.dot's input precision in the Triton IR; the tensor-core operand types in
    the PTX, and whether it splits fp32 operands into TF32 high and low parts, as 3xTF32 does), or an error."""
    from triton import knobs
    fn = getattr(_module(build["module"]), build["kernel"])
    row = dict(kernel=f"{build['module']}.{build['kernel']}", config=label(build), dtype=build["dtype"],
               cases=build["cases"], arch=ARCHS[build["arch"]], signature=build["signature"],
               constexprs=build["constexprs"], num_warps=build["num_warps"], num_stages=build["num_stages"],
               regs=None, spill_stores=None, spill_loads=None, shared=None, dot_precisions=None, mma=None,
               tf32_split=None, error=None)
    log = io.StringIO()
    try:
        types = {name: "constexpr" if name in build["constexprs"] else build["signature"][name] for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in build["aligned"]}
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
    ptx = compiled.asm["ptx"]
    row.update(regs=int(regs[1]), spill_stores=int(spills[1]), spill_loads=int(spills[2]), shared=compiled.metadata.shared,
               dot_precisions=sorted(set(re.findall(r"tt\.dot .*inputPrecision = (\w+)", compiled.asm["ttir"]))),
               mma=tensor_core_inputs(ptx), tf32_split="cvt.rna.tf32.f32" in ptx)
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
    lines = [f"triton {triton.__version__}; registers / spill stores+loads (bytes) / shared memory (bytes) / "
             "products: tensor-core operand type, x3 for 3xTF32 (fma: no tensor cores)",
             "", "| kernel | config | dtype | sm_80 | sm_90a |", "|---|---|---|---|---|"]
    cells = {}
    for r in rows:
        cell = r["error"] or (f"{r['regs']} / {r['spill_stores']}+{r['spill_loads']} / {r['shared']} / "
                              f"{'+'.join(r['mma']) or 'fma'}{' x3' if r['tf32_split'] else ''}")
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
