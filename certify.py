"""Stage 3: certify the fine-tuned classifier with randomized smoothing (Cohen et al. 2019).

CERTIFY, for each test image x:
  1. draw n0 noisy copies x + sigma * eps, take the most frequent class cA (selection);
  2. draw n fresh copies, count nA = how often cA wins (estimation);
  3. pA_lower = one-sided (1 - alpha) Clopper-Pearson lower bound on P(f(x + sigma eps) = cA);
  4. if pA_lower < 1/2 abstain, else certify cA with L2 radius sigma * Phi^-1(pA_lower).
Guarantee: with probability at least 1 - alpha over the noise, the smoothed classifier g returns cA for
every x' with ||x' - x||_2 < radius, and (when it does not abstain) it is g's prediction at x.
PREDICT (--predict): n copies, return the top class unless a two-sided binomial test of the top two
counts has p-value > alpha (abstain); with probability >= 1 - alpha it does not return a wrong g(x).

Noise is N(0, sigma^2) in pixel space [0, 1] (sigma is where radii are measured; see model.py) and is
seeded per (image index, phase, chunk of 100 samples): results do not depend on --batch or on how
many processes share the images.

    python certify.py --checkpoint out/finetune_sigma0.25/ckpt.pt --sigma 0.25 --n 100000
    torchrun --standalone --nproc_per_node=8 -- certify.py --checkpoint ... --sigma 0.25
Output: a TSV `idx label predict radius correct time` (appended and flushed per image; re-running the
same command continues after a kill), then a table of certified accuracy by radius.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from scipy.stats import beta, binomtest, norm

import kernels
from data import Images, init_distributed, seeded_noise
from model import UsageError, load_checkpoint, model_from_checkpoint, noisy_input
from report import HEADER, summary

NOISE_CHUNK = 100  # samples per noise seed; --batch must be a multiple so batches never split a chunk
ABSTAIN = -1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="randomized-smoothing certification", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"certify.py: error: {msg}")
    p.add_argument("--checkpoint", default="out/finetune_sigma0.25/ckpt.pt", help="a finetune.py checkpoint")
    p.add_argument("--sigma", type=float, default=None, help="smoothing noise std in pixel space; default: the fine-tuning sigma")
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--predict", action="store_true", help="run PREDICT instead of CERTIFY")
    p.add_argument("--num", type=int, default=500, help="how many test images")
    p.add_argument("--skip", type=int, default=20, help="certify every skip-th test image (Carlini et al. 2022: 500 of 10k)")
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass (multiple of 100)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=None, help="TSV path; default out/certify/<checkpoint dir>_sigma<sigma>.tsv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend())
    args = p.parse_args(argv)
    if args.sigma is not None and not args.sigma > 0:
        p.error(f"--sigma must be > 0, got {args.sigma}")
    for name in ("n0", "n", "num", "skip", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 < args.alpha < 1:
        p.error(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.batch % NOISE_CHUNK:
        p.error(f"--batch must be a multiple of {NOISE_CHUNK}, got {args.batch}")
    return args


# ----------------------------------------------------------------------------------------------------
# Statistics

def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def certify_from_counts(counts0: np.ndarray, counts: np.ndarray, n: int, alpha: float, sigma: float) -> tuple[int, float]:
    """CERTIFY's decision from the selection counts and the (independent) estimation counts."""
    c_a = int(counts0.argmax())
    p_a = lower_confidence_bound(int(counts[c_a]), n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return c_a, sigma * float(norm.ppf(p_a))


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision: the top class, unless the top two are not separated at level alpha."""
    top2 = np.argsort(counts)[::-1][:2]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
    return ABSTAIN if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha else int(top2[0])


# ----------------------------------------------------------------------------------------------------
# The noise loop: batched, compiled, counted on the device

def noise(shape: tuple, count: int, first: int, seed: int, idx: int, phase: str, device) -> torch.Tensor:
    """eps for samples first .. first+count-1 of (image idx, phase). Each chunk of NOISE_CHUNK samples has
    its own seed, so a sample's noise does not depend on which batch or process draws it."""
    chunks = torch.arange(first // NOISE_CHUNK, (first + count - 1) // NOISE_CHUNK + 1)
    return seeded_noise((NOISE_CHUNK, *shape), chunks, device, seed, idx, phase).flatten(0, 1)[:count]


def predict_noisy(model, x: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Base-classifier decisions f(x + sigma eps) for a batch of noise (what torch.compile fuses)."""
    return model(*noisy_input(x[None], sigma, eps)).argmax(1)


def sample_counts(classify, x: torch.Tensor, num: int, batch: int, num_classes: int, seed: int, idx: int, phase: str) -> np.ndarray:
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    for first in range(0, num, batch):
        eps = noise(x.shape, min(batch, num - first), first, seed, idx, phase, x.device)
        counts += torch.bincount(classify(x, eps), minlength=num_classes)
    return counts.cpu().numpy()  # one host sync per phase, not per batch


# ----------------------------------------------------------------------------------------------------
# Results file: append-only, resumable, never mixed across configurations

def read_done(path: str) -> set[int]:
    """Indices of the images already certified. A torn last line from a kill is cut off the file."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        keep = data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):
            f.truncate(len(keep))
    lines = keep.decode().splitlines()
    return {int(line.split("\t")[0]) for line in lines[1:]}


def open_results(path: str, config: dict) -> set[int]:
    """Check (or write) the sidecar config, write the header of a new file, return rows done."""
    meta = path + ".json"
    if os.path.exists(path) or os.path.exists(meta):
        try:
            with open(meta) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            raise UsageError(f"{path} exists without a readable {meta}; refusing to mix results") from None
        if previous != config:
            diff = ", ".join(k for k in config if previous.get(k) != config[k])
            raise UsageError(f"{path} holds results of a different configuration ({diff}); choose another --out")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(meta, "w") as f:
        json.dump(config, f, indent=1)
    done = read_done(path)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        with open(path, "w") as f:
            f.write(HEADER + "\n")
    return done


# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    kernels.use(args.kernels)
    rank, world, device = init_distributed()
    ckpt = load_checkpoint(args.checkpoint, "finetune")
    trained_sigma = ckpt["config"]["sigma"]
    sigma = trained_sigma if args.sigma is None else args.sigma
    dataset = ckpt["config"]["dataset"]
    out = args.out or os.path.join("out", "certify", f"{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}_sigma{sigma:g}"
                                   f"{'_predict' if args.predict else ''}.tsv")
    model = model_from_checkpoint(ckpt).to(device).eval()
    test = Images(dataset, args.data_dir, "test", device)
    indices = list(range(0, len(test), args.skip))[: args.num]
    config = dict(checkpoint=os.path.abspath(args.checkpoint), step=ckpt["step"], sigma=sigma, mode="predict" if args.predict else "certify",
                  n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed, skip=args.skip)
    done = open_results(out, config) if rank == 0 else set()
    if world > 1:
        box = [done]
        dist.broadcast_object_list(box)
        done = box[0]
    todo = [i for i in indices if i not in done]
    if rank == 0:
        print(f"{'PREDICT' if args.predict else 'CERTIFY'} sigma {sigma:g} (fine-tuned at {trained_sigma:g}), "
              f"{len(indices)} images, {len(indices) - len(todo)} already in {out}, {world} process(es)", flush=True)

    classify = lambda x, eps: predict_noisy(model, x, eps, sigma)
    classify = torch.compile(classify) if args.compile else classify
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    num_classes = model.cfg.num_classes
    if args.compile:  # compile every batch size the loop will use now, so no image's time includes it
        x0, _ = test.batch(torch.tensor([0]))
        with torch.no_grad(), autocast:
            for size in {min(args.batch, args.n0), args.n0 % args.batch, min(args.batch, args.n), args.n % args.batch} - {0}:
                classify(x0[0], torch.zeros(size, *x0.shape[1:], device=device))
    # Rounds of `world` images, one per process; rank 0 writes each round in image order.
    for r in range(0, len(todo), world):
        line = None
        if r + rank < len(todo):
            idx = todo[r + rank]
            x, y = test.batch(torch.tensor([idx]))
            start = time.time()
            with torch.no_grad(), autocast:
                counts = sample_counts(classify, x[0], args.n, args.batch, num_classes, args.seed, idx, "estimate")
                if args.predict:
                    prediction, radius = predict_from_counts(counts, args.alpha), 0.0
                else:
                    counts0 = sample_counts(classify, x[0], args.n0, args.batch, num_classes, args.seed, idx, "select")
                    prediction, radius = certify_from_counts(counts0, counts, args.n, args.alpha, sigma)
            label = int(y[0])
            line = f"{idx}\t{label}\t{prediction}\t{radius:.4f}\t{int(prediction == label)}\t{time.time() - start:.3f}"
        lines = [line]
        if world > 1:
            lines = [None] * world
            dist.all_gather_object(lines, line)
        if rank == 0:
            with open(out, "a") as f:
                for row in lines:
                    if row is not None:
                        f.write(row + "\n")
                        print(row, flush=True)
                f.flush()
                os.fsync(f.fileno())
    if rank == 0:
        print(summary(out))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"certify.py: error: {e}")
