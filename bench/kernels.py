"""Forward+backward time and peak memory of each fused kernel against its PyTorch reference (and, for
attention, torch's scaled_dot_product_attention), at the shapes of rRCM-B. Ratios come from one run.

    python bench/kernels.py            # on a GPU: the real shapes, bf16 and fp32
On a machine without CUDA it runs every measurement at toy shapes (batch / 64 for attention and
cross-entropy, / 512 for InfoNCE) under the Triton interpreter: that checks that the script and kernels
run, and says nothing about speed.
"""
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


def table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}")
    for shape, results in rows:
        base_name = next(iter(results))
        base_ms, base_mem = results[base_name]
        cells = [f"{name} {ms:8.3f} ms {mem:9.1f} MiB" for name, (ms, mem) in results.items()]
        ratios = [f"{name}/{base_name} time {ms / base_ms:5.2f}x mem {mem / base_mem if base_mem else float('nan'):5.2f}x"
                  for name, (ms, mem) in list(results.items())[1:]]
        print(f"  {shape:34s} | " + " | ".join(cells) + " || " + "; ".join(ratios))


def attention_rows(dtype) -> list:
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    rows = []
    for name, B, L in (("CIFAR-10", 256, 66), ("ImageNet", 64, 198)):
        B = max(1, B // SHRINK)
        make = lambda B=B, L=L: [torch.randn(B, 12, L, 64, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]
        rows.append((f"{name} B={B} L={L} H=12 d=64", {"triton": measure(attention_triton, make), "sdpa": measure(sdpa, make),
                                           "reference": measure(attention_reference, make)}))
    return rows


def info_nce_rows(dtype) -> list:
    rows = []
    for B in (4096, 8192, 32768):
        for D in (256, 768):
            b = B // SHRINK_INFO_NCE
            make = lambda b=b, D=D: [F.normalize(torch.randn(n, D, device=DEVICE), dim=1).to(dtype).requires_grad_() for n in (b, b)] + [0.2]
            results = {"triton": measure(info_nce_triton, make)}
            try:
                results["reference"] = measure(info_nce_reference, make)
            except torch.OutOfMemoryError:
                results["reference"] = (float("nan"), float("nan"))
            rows.append((f"B=M={b} D={D}", results))
    return rows


def cross_entropy_rows(dtype) -> list:
    rows = []
    for C in (10, 1000):
        B = 2048 // SHRINK
        make = lambda B=B, C=C: [torch.randn(B, C, device=DEVICE, dtype=dtype, requires_grad=True), torch.randint(0, C, (B,), device=DEVICE)]
        rows.append((f"B={B} C={C}", {"triton": measure(cross_entropy_triton, make), "reference": measure(cross_entropy_reference, make)}))
    return rows


if __name__ == "__main__":
    where = torch.cuda.get_device_name() if GPU else "CPU, Triton interpreter, toy shapes (timings meaningless)"
    print(f"device: {where}; torch {torch.__version__}")
    for dtype in (torch.bfloat16, torch.float32):
        table(f"attention fwd+bwd, {dtype}", attention_rows(dtype))
        table(f"InfoNCE fwd+bwd (tau 0.2), {dtype}", info_nce_rows(dtype))
        table(f"cross-entropy fwd+bwd, {dtype}", cross_entropy_rows(dtype))
