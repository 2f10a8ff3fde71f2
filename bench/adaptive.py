"""Adaptive against fixed-n CERTIFY on the same images, in one run: samples and seconds per image, both
certified-accuracy tables side by side, and the projected saving for the paper's protocol.

    python bench/adaptive.py --checkpoint out/finetune_sigma0.25/ckpt.pt --data-dir data --n 10000 --num 100 --skip 100

Both runs draw the same noise (certify.py's seeding), so an adaptive image that goes to n sees exactly the
fixed run's counts. The projection to n = 100,000 x 500 images x 3 sigmas replays adaptive CERTIFY on binomial
draws at each image's observed p_A (nA / n of the fixed run), with the looks certify.py uses at that n, and
prices samples at the rate measured here; it assumes the other two sigmas have the same mix of images.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import certify  # noqa: E402
from data import Images  # noqa: E402
from model import autocast, load_checkpoint, model_from_checkpoint, resolve_precision  # noqa: E402
from report import average_certified_radius, certified_accuracy  # noqa: E402

PAPER_N, PAPER_IMAGES, PAPER_SIGMAS = 100_000, 500, 3


def certify_all(classify, test, indices, argv: list[str], sigma: float, radii, num_classes: int, device, precision) -> dict:
    """certify.py's per-image decision for every index: prediction, radius, samples, seconds, correct, and for
    the fixed run the observed p_A = nA / n (what the projection replays)."""
    args = certify.parse_args(argv)
    rows = []
    for idx in indices:
        x, y = test.batch(torch.tensor([idx]))
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, precision):
            if args.adaptive:
                prediction, radius, used = certify.certify_image(classify, x[0], idx, args, sigma, radii, num_classes, None)
                p_a = float("nan")
            else:  # CERTIFY exactly as certify.certify_image runs it, keeping the counts
                counts_of = lambda phase, num: certify.sample_counts(classify, x[0], num, args.batch, num_classes, args.seed, idx, phase)
                counts, counts0 = counts_of("estimate", args.n), counts_of("select", args.n0)
                (prediction, radius), used = certify.certify_from_counts(counts0, counts, args.n, args.alpha, sigma), args.n
                p_a = counts[counts0.argmax()] / args.n
        rows.append((prediction, radius, used, time.perf_counter() - start, int(y[0]), p_a))
    rows = np.array(rows, dtype=float)
    return dict(predict=rows[:, 0], radius=rows[:, 1], samples=rows[:, 2], seconds=rows[:, 3],
                correct=(rows[:, 0] == rows[:, 4]) * 1.0, p_a=rows[:, 5])


def projected_samples(p_a: np.ndarray, alpha: float, sigma: float, repeats: int = 20) -> float:
    """Mean estimation samples per image of adaptive CERTIFY at n = 100,000, replayed on binomial draws."""
    stages = certify.adaptive_stages(PAPER_N, None)
    radii = certify.default_radii(PAPER_N, alpha, sigma, len(stages))
    rng = np.random.default_rng(0)
    used = []
    for p in np.repeat(p_a, repeats):
        wins = dict(zip(stages, np.cumsum(rng.binomial(np.diff([0, *stages]), p))))
        used.append(certify.certify_adaptive(np.array([1, 0]), lambda m: np.array([wins[m], m - wins[m]]), stages, alpha, sigma, radii)[2])
    return float(np.mean(used))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a finetune.py checkpoint")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 / ImageNet is")
    p.add_argument("--sigma", type=float, default=None, help="default: the fine-tuning sigma")
    p.add_argument("--n", type=int, default=10_000, help="estimation samples of the fixed run, the most the adaptive run draws")
    p.add_argument("--num", type=int, default=100, help="how many test images")
    p.add_argument("--skip", type=int, default=100, help="every skip-th test image")
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass (multiple of 100)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--precision", default="auto", help="auto, bf16 or fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the noise loop")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, device)
    ckpt = load_checkpoint(args.checkpoint, "finetune")
    sigma = ckpt["config"]["sigma"] if args.sigma is None else args.sigma
    model = model_from_checkpoint(ckpt).to(device).eval()
    test = Images(ckpt["config"]["dataset"], args.data_dir, "test", device)
    indices = certify.certified_indices(len(test), args.skip, args.num)
    classify = lambda x, eps: certify.predict_noisy(model, x, eps, sigma)
    classify = torch.compile(classify) if args.compile else classify
    common = ["--checkpoint", args.checkpoint, "--n", str(args.n), "--batch", str(args.batch), "--alpha", str(args.alpha)]
    stages = certify.adaptive_stages(args.n, None)
    radii = certify.default_radii(args.n, args.alpha, sigma, len(stages))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{where}, precision {precision}, sigma {sigma:g}, {len(indices)} images, n0 100, n {args.n:,}, alpha {args.alpha}, "
          f"adaptive looks {stages}, reported radii {radii}", flush=True)
    C = model.cfg.num_classes
    certify_all(classify, test, indices[:1], common, sigma, radii, C, device, precision)  # warm-up (compilation)
    runs = {"fixed n": certify_all(classify, test, indices, common, sigma, radii, C, device, precision),
            "adaptive": certify_all(classify, test, indices, common + ["--adaptive"], sigma, radii, C, device, precision)}

    print(f"\n{'':10s} {'samples/image':>14s} {'s/image':>9s} " + " ".join(f"{r:6.2f}" for r in radii) + "    ACR")
    for name, run in runs.items():
        acc = [100 * certified_accuracy(run["radius"], run["correct"], r) for r in radii]
        print(f"{name:10s} {100 + run['samples'].mean():14,.0f} {run['seconds'].mean():9.3f} " + " ".join(f"{a:6.1f}" for a in acc)
              + f"  {average_certified_radius(run['radius'], run['correct']):5.3f}")
    fixed, adaptive = runs["fixed n"], runs["adaptive"]
    rate = (100 + fixed["samples"]).sum() / fixed["seconds"].sum()
    print(f"saving at n = {args.n:,}: {(100 + fixed['samples'].mean()) / (100 + adaptive['samples'].mean()):.1f}x fewer samples, "
          f"{fixed['seconds'].mean() / adaptive['seconds'].mean():.1f}x less time; {rate:,.0f} samples/s")

    mean = projected_samples(fixed["p_a"], args.alpha, sigma)
    images = PAPER_IMAGES * PAPER_SIGMAS
    hours = lambda samples: images * (100 + samples) / rate / 3600
    print(f"projected for the paper's protocol (n = {PAPER_N:,}, {PAPER_IMAGES} images x {PAPER_SIGMAS} sigmas, this mix of "
          f"images, this device): fixed {hours(PAPER_N):,.1f} h, adaptive {hours(mean):,.1f} h "
          f"({100 + mean:,.0f} samples/image, {(100 + PAPER_N) / (100 + mean):.1f}x fewer)")


if __name__ == "__main__":
    main()
