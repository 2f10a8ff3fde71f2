"""Noise samples per second of certify.py's loop against a loop written like the original randomized-
smoothing code (Cohen et al. 2019: repeat the image, draw noise, run the model, argmax, count on the host
per batch). Same model, same N, eager and torch.compile'd, measured side by side in one run.

    python bench/certify.py                      # GPU: rRCM-B, N = 100,000, bf16 -> seconds per certified image
    python bench/certify.py --preset tiny        # what bench/README.md records for a 2-core CPU

With --precisions it instead times certify.py's loop in fp32 and under bf16 autocast, side by side, for
each of --presets (default tiny, S, B), naming the CPU: bf16 pays off only where the CPU computes it
natively (AMX-BF16 or AVX512-BF16); elsewhere it is emulated.

    python bench/certify.py --precisions --n 2000                   # the record (minutes for B on 2 cores)
    python bench/certify.py --precisions --presets tiny --n 200 --no-compile --reps 1   # seconds: does it run
    python bench/certify.py --agreement out/finetune_sigma0.25/ckpt.pt --data-dir data --n 1000 --images 20
"""
import argparse
import contextlib
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import certify  # noqa: E402
import smoothing  # noqa: E402
from jobs import autocast, native_bf16  # noqa: E402
from model import ViT, noisy_input, vit_config  # noqa: E402

GPU = torch.cuda.is_available()


@torch.no_grad()
def cohen_counts(model, x: torch.Tensor, num: int, batch: int, sigma: float, num_classes: int) -> np.ndarray:
    """The reference loop, as in locuslab/smoothing core.py `_sample_noise`."""
    counts = np.zeros(num_classes, dtype=int)
    remaining = num
    while remaining > 0:
        b = min(batch, remaining)
        remaining -= b
        xb = x.repeat((b, 1, 1, 1))
        predictions = model(*noisy_input(xb, sigma, torch.randn_like(xb))).argmax(1)
        counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return counts


def ours(model, x, num, batch, sigma, num_classes, compiled):
    """certify.py's loop: smoothing.Smooth over rRCM as a base classifier."""
    smooth = smoothing.Smooth(certify.RRCMClassifier(model, sigma), num_classes, sigma, batch=batch, compile=compiled)
    return lambda: smooth.counts(x, num, key=0)


def timed(fn, reps: int) -> float:
    fn()  # warm-up: compilation, autotuning, allocator
    if GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if GPU:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (lscpu's "Model name")."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def compare_precisions(args, device: torch.device) -> None:
    """certify.py's loop in fp32 and under bf16 autocast for each preset: samples/s and their ratio."""
    where = torch.cuda.get_device_name() if GPU else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"{where}; native bf16: {'yes' if native_bf16(device) else 'no (emulated)'}; certify.py loop, "
          f"{'compiled' if args.compile else 'eager'}, N = {args.n}, batch {args.batch}, torch {torch.__version__}")
    print("| preset | fp32 samples/s | bf16 samples/s | bf16 / fp32 |\n|---|---|---|---|")
    x = torch.rand(3, 32, 32, device=device)
    for preset in args.presets.split(","):
        model = ViT(vit_config(preset, "cifar10")).to(device).eval()
        rates = {}
        for precision in ("fp32", "bf16"):
            loop = ours(model, x, args.n, args.batch, 0.25, model.cfg.num_classes, compiled=args.compile)
            with autocast(device, precision):
                rates[precision] = args.n / timed(loop, args.reps)
        print(f"| {preset} | {rates['fp32']:,.0f} | {rates['bf16']:,.0f} | {rates['bf16'] / rates['fp32']:.2f}x |", flush=True)


@torch.no_grad()
def precision_agreement(args, device: torch.device) -> None:
    """How often bf16 autocast changes the base classifier's decision f(x + sigma eps) of a trained
    checkpoint, on the same noise: per sample, and in the CERTIFY outcome (class and radius) per image."""
    from data import Images
    from jobs import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint(args.agreement, "finetune")
    model = model_from_checkpoint(ckpt).to(device).eval()
    sigma, C = ckpt["config"]["sigma"], model.cfg.num_classes
    test = Images(ckpt["config"]["dataset"], args.data_dir, "test", device)
    differ = samples = outcome_differs = 0
    for idx in range(0, args.images * 100, 100):
        x, _ = test.batch(torch.tensor([idx]))
        eps = smoothing.gaussian_noise(tuple(x.shape[1:]), 0, args.n, 0, idx, smoothing.ESTIMATE, device)
        preds, outcome = {}, {}
        decisions = smoothing.Smooth(certify.RRCMClassifier(model, sigma), C, sigma).decisions  # eager: f(x + sigma eps)
        for precision in ("fp32", "bf16"):
            with autocast(device, precision):
                preds[precision] = torch.cat([decisions(x[0], e) for e in eps.split(args.batch)])
            counts = torch.bincount(preds[precision], minlength=C).cpu().numpy()
            outcome[precision] = smoothing.certify_from_counts(counts, counts, args.n, 0.001, sigma)
        differ += int((preds["fp32"] != preds["bf16"]).sum())
        samples += args.n
        outcome_differs += outcome["fp32"][0] != outcome["bf16"][0]
        print(f"image {idx}: fp32 {outcome['fp32']}, bf16 {outcome['bf16']}", flush=True)
    print(f"{args.agreement}: bf16 and fp32 decisions differ on {differ} of {samples} noisy samples "
          f"({differ / samples:.3%}); the certified class differs on {outcome_differs} of {args.images} images")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="B" if GPU else "tiny")
    p.add_argument("--n", type=int, default=100_000 if GPU else 2_000)
    p.add_argument("--batch", type=int, default=2_000 if GPU else 500)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--precisions", action="store_true", help="fp32 against bf16 autocast for each of --presets")
    p.add_argument("--presets", default="tiny,S,B", help="with --precisions: comma-separated presets")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="with --precisions: torch.compile the loop")
    p.add_argument("--agreement", default=None, help="a finetune checkpoint: how often bf16 changes its decisions")
    p.add_argument("--images", type=int, default=20, help="with --agreement: test images 0, 100, 200, ...")
    p.add_argument("--data-dir", default="data", help="with --agreement")
    args = p.parse_args()
    device = torch.device("cuda" if GPU else "cpu")
    if args.agreement:
        precision_agreement(args, device)
        return
    if args.precisions:
        compare_precisions(args, device)
        return
    model = ViT(vit_config(args.preset, "cifar10")).to(device).eval()
    x = torch.rand(3, 32, 32, device=device)
    sigma, C = 0.25, model.cfg.num_classes
    autocast = torch.autocast("cuda", torch.bfloat16) if GPU else contextlib.nullcontext()
    compiled_model = torch.compile(model)
    loops = {
        "reference loop, eager": lambda: cohen_counts(model, x, args.n, args.batch, sigma, C),
        "reference loop, compiled model": lambda: cohen_counts(compiled_model, x, args.n, args.batch, sigma, C),
        "certify.py loop, eager": ours(model, x, args.n, args.batch, sigma, C, compiled=False),
        "certify.py loop, compiled": ours(model, x, args.n, args.batch, sigma, C, compiled=True),
    }
    where = torch.cuda.get_device_name() if GPU else f"CPU ({os.cpu_count()} cores)"
    print(f"{where}, preset {args.preset}, N = {args.n}, batch {args.batch}, torch {torch.__version__}")
    base = None
    with autocast:
        for name, fn in loops.items():
            seconds = timed(fn, args.reps)
            base = base or seconds
            per_image = seconds * (args.n + 100) / args.n  # CERTIFY also draws n0 = 100 selection samples
            print(f"  {name:32s} {args.n / seconds:10.0f} samples/s   {per_image:8.3f} s per certified image "
                  f"(n0 + n)   {base / seconds:5.2f}x the reference")


if __name__ == "__main__":
    main()
