"""Forward+backward time and peak memory of each fused kernel against its PyTorch reference (and, for
attention, torch's scaled_dot_product_attention), at the shapes of rRCM-B. Ratios come from one run.

    python bench/kernels.py            # on a GPU: the real shapes, bf16 and fp32 (markdown tables)
    python bench/kernels.py --quick    # bf16 only, the shapes bench/gpu_check.py reports (half a minute on a GPU)
    python bench/kernels.py --tiny     # toy shapes, bf16 only: seconds under the interpreter (gpu_check.py --cpu-tiny)
In the fp32 tables the fused kernels multiply as 3xTF32 (kernels/launch.py: dot) and the references
in IEEE fp32 (torch's default, TF32 off). On a machine without CUDA it runs every measurement at toy shapes (batch / 64 for attention and
cross-entropy, / 512 for InfoNCE) under the Triton interpreter: that checks that the script and kernels
run, and says nothing about speed.
"""
import argparse
import os
import sys
import time

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

from kernels.attention import attention_reference, attention_triton  # noqa: E402
from kernels.cross_entropy import cross_entropy_reference, cross_entropy_triton  # noqa: E402
from kernels.info_nce import info_nce_reference, info_nce_triton  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"
SHRINK = 1 if GPU else 64  # the interpreter runs numpy per tile: toy shapes only
SHRINK_INFO_NCE = 1 if GPU else 512
# (name, images, heads, L): rRCM-B's attention on CIFAR-10 (64 patches + 2 tokens) and ImageNet (196 + 2)
ATTENTION = [("CIFAR-10", 256, 12, 66), ("ImageNet", 64, 12, 198)]
INFO_NCE = [(B, D) for B in (4096, 8192, 16384, 32768) for D in (256, 768)]  # B = M; projector 256, width 768
CROSS_ENTROPY = [(2048, 10), (2048, 1000)]
# --quick: InfoNCE at the pre-training batches that matter (rRCM-B's 1024 x 4 views, and 16384), D = the projector's 256
QUICK_INFO_NCE = [(4096, 256), (16384, 256)]
# --tiny: one head, a few rows, so every measurement runs in well under a second in the interpreter
TINY = dict(attention=[("CIFAR-like", 1, 1, 18), ("ImageNet-like", 1, 1, 34)], info_nce=[(8, 32)],
            cross_entropy=[(4, 10), (4, 1000)])


def measure(fn, make_inputs, reps: int = 20 if GPU else 1) -> tuple[float, float]:
    """(milliseconds per forward+backward, peak MiB above the inputs). Inputs are made once; their
    gradients are dropped between repetitions."""
    inputs = make_inputs()
    leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]

    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    step()  # compile / autotune / warm caches
    if GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    if GPU:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / reps * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if GPU else float("nan")
    return ms, peak


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    """A markdown table: time and peak memory of each implementation, then each one's ratio to the first."""
    names = list(rows[0][1])
    head = ["shape"] + [f"{n} ms" for n in names] + [f"{n} MiB" for n in names] + [f"{n} / {names[0]} time, mem" for n in names[1:]]
    lines = [f"\n{title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, results in rows:
        base_ms, base_mem = results[names[0]]
        cells = [shape] + [f"{results[n][0]:.3f}" for n in names] + [f"{results[n][1]:.1f}" for n in names]
        cells += [f"{results[n][0] / base_ms:.2f}x, {results[n][1] / base_mem if base_mem else float('nan'):.2f}x" for n in names[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attention_rows(dtype, shapes: list) -> list:
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    rows = []
    for name, B, H, L in shapes:
        make = lambda B=B, H=H, L=L: [torch.randn(B, H, L, 64, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]
        rows.append((f"{name} B={B} L={L} H={H} d=64", {"triton": measure(attention_triton, make), "sdpa": measure(sdpa, make),
                                                         "reference": measure(attention_reference, make)}))
    return rows


def info_nce_rows(dtype, shapes: list) -> list:
    rows = []
    for b, D in shapes:
        make = lambda b=b, D=D: [F.normalize(torch.randn(n, D, device=DEVICE), dim=1).to(dtype).requires_grad_() for n in (b, b)] + [0.2]
        results = {"triton": measure(info_nce_triton, make)}
        try:
            results["reference"] = measure(info_nce_reference, make)
        except torch.OutOfMemoryError:
            results["reference"] = (float("nan"), float("nan"))
        rows.append((f"B=M={b} D={D}", results))
    return rows


def cross_entropy_rows(dtype, shapes: list) -> list:
    rows = []
    for B, C in shapes:
        make = lambda B=B, C=C: [torch.randn(B, C, device=DEVICE, dtype=dtype, requires_grad=True), torch.randint(0, C, (B,), device=DEVICE)]
        rows.append((f"B={B} C={C}", {"triton": measure(cross_entropy_triton, make), "reference": measure(cross_entropy_reference, make)}))
    return rows


def shapes(tiny: bool, quick: bool) -> dict:
    if tiny:
        return TINY
    return dict(attention=[(n, max(1, B // SHRINK), H, L) for n, B, H, L in ATTENTION],
                info_nce=[(B // SHRINK_INFO_NCE, D) for B, D in (QUICK_INFO_NCE if quick else INFO_NCE)],
                cross_entropy=[(B // SHRINK, C) for B, C in CROSS_ENTROPY])


def main() -> None:
    p = argparse.ArgumentParser(description="fused kernels against their PyTorch references")
    p.add_argument("--quick", action="store_true", help="bf16 only; InfoNCE at B = M = 4096 and 16384, D 256 (bench/gpu_check.py)")
    p.add_argument("--tiny", action="store_true", help="toy shapes only (seconds under the CPU interpreter)")
    args = p.parse_args()
    sizes = shapes(args.tiny, args.quick)
    where = torch.cuda.get_device_name() if GPU else "CPU, Triton interpreter, toy shapes (timings meaningless)"
    print(f"device: {where}; torch {torch.__version__}")
    for dtype in (torch.bfloat16,) if args.tiny or args.quick else (torch.bfloat16, torch.float32):
        print(table(f"attention fwd+bwd, {dtype}", attention_rows(dtype, sizes["attention"])))
        print(table(f"InfoNCE fwd+bwd (tau 0.2), {dtype}", info_nce_rows(dtype, sizes["info_nce"])))
        print(table(f"cross-entropy fwd+bwd, {dtype}", cross_entropy_rows(dtype, sizes["cross_entropy"])))


if __name__ == "__main__":
    main()
