"""Regional compilation (what --compile does: ViT.compile_blocks) against compiling the whole model, side by side
in one run: seconds to the end of the first training step (Dynamo + Inductor, every cache off) and training
images/s after it. A fine-tuning-like step: the classifier's forward at one noise level, cross-entropy,
backward, AdamW.

    python bench/compile_time.py                       # GPU: rRCM-B, batch 256, bf16, the fused Triton kernels
    python bench/compile_time.py --preset tiny --batch 32 --steps 20  # CPU: what bench/README.md records

Regional compilation compiles one block (per grad mode and shape) and reuses it across depth; a whole-model graph
can also fuse across block boundaries (the residual add into the next LayerNorm) and the ops around the blocks.
This measures what each costs in compile time and what the whole graph gains in speed.
"""
import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs import autocast, select_kernels  # noqa: E402
from model import ViT, to_model_space, vit_config  # noqa: E402

GPU = torch.cuda.is_available()


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def measure(mode: str, args, device: torch.device) -> tuple[float, float]:
    """(seconds to the end of the first step, images/s over --steps steps after two more) for one mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ViT(vit_config(args.preset, "cifar10")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model, dynamic=False) if mode == "whole" else model
    if mode == "regional":
        model.compile_blocks()
    x = to_model_space(torch.rand(args.batch, 3, 32, 32, device=device))
    y = torch.randint(0, 10, (args.batch,), device=device)
    t = 0.5

    def step() -> None:
        with autocast(device, args.precision):
            loss = F.cross_entropy(net(x + t * torch.randn_like(x), t), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync()
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return first, args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="B" if GPU else "tiny")
    p.add_argument("--batch", type=int, default=256 if GPU else 32)
    p.add_argument("--steps", type=int, default=50 if GPU else 20)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if GPU else "fp32")
    args = p.parse_args()
    device = torch.device("cuda" if GPU else "cpu")
    select_kernels("triton" if GPU else "torch")
    torch._inductor.config.force_disable_caches = True  # cold compiles: each mode pays its own, whichever runs first
    name = torch.cuda.get_device_name() if GPU else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{name} | torch {torch.__version__} | preset {args.preset} | batch {args.batch} | {args.precision} | "
          f"kernels {'triton' if GPU else 'torch'}")
    print("| compile | first step (s) | images/s |\n|---|---|---|")
    # Inductor's one-time costs (its imports, the C++ or Triton toolchain's first build) would land on whichever
    # mode ran first: a small compiled forward and backward pays them before either.
    warm = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).to(device)
    torch.compile(warm)(torch.randn(4, 8, device=device)).sum().backward()
    rates = {}
    for mode in ("regional", "whole"):
        first, rates[mode] = measure(mode, args, device)
        print(f"| {mode} | {first:.1f} | {rates[mode]:.1f} |", flush=True)
    print(f"regional / whole images/s: {rates['regional'] / rates['whole']:.3f}")


if __name__ == "__main__":
    main()
