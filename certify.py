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
Adaptive CERTIFY (--adaptive): the n estimation samples are drawn in stages and sampling stops once more
samples cannot change the certified-accuracy table at the reported radii; see `certify_adaptive`.

Noise is N(0, sigma^2) in pixel space [0, 1] (sigma is where radii are measured; see model.py) and is
seeded per (image index, phase, chunk of 100 samples): results do not depend on --batch or on how
many processes share the images.

    python certify.py --checkpoint out/finetune_sigma0.25/ckpt.pt --sigma 0.25 --n 100000
    python certify.py --checkpoint out/finetune_sigma0.25/ckpt.pt --sigma 0.25 --n 100000 --adaptive
    torchrun --standalone --nproc_per_node=8 -- certify.py --checkpoint ... --sigma 0.25
Output: a TSV `idx label predict radius correct time` (adaptive runs add `samples`, the estimation samples
drawn), appended and flushed per image; re-running the same command continues after a kill or Ctrl-C.
One run writes a file at a time (a lock beside it). Then a table of certified accuracy by radius.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from decimal import ROUND_FLOOR, Decimal
from statistics import NormalDist

import numpy as np
import torch
import torch.distributed as dist
from scipy.stats import beta, binomtest

import kernels
from data import Images, seeded_noise
from model import (PRECISIONS, UsageError, autocast, load_checkpoint, model_from_checkpoint, noisy_input, resolve_precision,
                   select_kernels)
from jobs import clock, init_distributed
from report import ADAPTIVE_HEADER, HEADER, ReportError, check_rows, summary

NOISE_CHUNK = 100  # samples per noise seed; --batch and the adaptive stages are multiples, so no chunk is split
ABSTAIN = -1
DEFAULT_SKIP = {"cifar10": 20, "imagenet": 100}  # Carlini et al. 2022: 500 of CIFAR-10's 10k, 500 of ImageNet's 50k
RADIUS_STEP = 0.25  # the paper's tables report certified accuracy at 0, 0.25, 0.5, ...
PROGRESS_EVERY = 30.0  # seconds between progress lines inside one long image
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # Ctrl-C, and what cluster schedulers send before preemption
PHI = NormalDist()  # the standard normal: PHI.cdf, PHI.inv_cdf (exact to double precision, and fast for scalars)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="randomized-smoothing certification", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"certify.py: error: {msg}")
    p.add_argument("--checkpoint", default="out/finetune_sigma0.25/ckpt.pt", help="a finetune.py checkpoint")
    p.add_argument("--sigma", type=float, default=None, help="smoothing noise std in pixel space; default: the fine-tuning sigma")
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples (adaptive: at most)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--predict", action="store_true", help="run PREDICT instead of CERTIFY")
    p.add_argument("--adaptive", action="store_true", help="stop sampling an image once more samples cannot change its row of the "
                                                              "certified-accuracy table (alpha split over the stages)")
    p.add_argument("--stages", default=None, help="adaptive: comma-separated sample counts of the looks before n (multiples of 100); "
                                                  "default n/100, n/10")
    p.add_argument("--radii", default=None, help="adaptive: comma-separated radii the table reports; default 0, 0.25, ... up to "
                                                 "the largest radius n samples can certify")
    p.add_argument("--num", type=int, default=500, help="how many test images")
    p.add_argument("--skip", type=int, default=None, help="certify every skip-th test image; default 20 for CIFAR-10 (500 of 10k), "
                                                          "100 for ImageNet (500 of 50k)")
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass (multiple of 100)")
    p.add_argument("--data-dir", default="data", help="where the test images are (CIFAR-10 is downloaded there if missing)")
    p.add_argument("--out", default=None, help="TSV path; default out/certify/<checkpoint dir>_sigma<sigma>.tsv")
    p.add_argument("--seed", type=int, default=0, help="seed of the smoothing noise")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="bf16 autocast or fp32; auto: bf16 where the "
                                                                            "hardware has native bf16 (CUDA, AMX/AVX512-BF16 CPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the noise loop")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend(), help="fused Triton kernels or the PyTorch reference")
    args = p.parse_args(argv)
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma > 0):
        p.error(f"--sigma must be > 0 and finite, got {args.sigma}")
    for name in ("n0", "n", "num", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.skip is not None and args.skip < 1:
        p.error("--skip must be >= 1")
    if not 0 < args.alpha < 1:
        p.error(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.batch % NOISE_CHUNK:
        p.error(f"--batch must be a multiple of {NOISE_CHUNK}, got {args.batch}")
    if (args.stages is not None or args.radii is not None) and not args.adaptive:
        p.error("--stages and --radii need --adaptive")
    if args.adaptive and args.predict:
        p.error("--adaptive applies to CERTIFY, not --predict")
    if args.adaptive:
        try:
            args.stages = adaptive_stages(args.n, args.stages)
            args.radii = None if args.radii is None else sorted({float(r) for r in args.radii.split(",")})
        except ValueError as e:
            p.error(str(e))
        if args.radii is not None and not all(math.isfinite(r) and r >= 0 for r in args.radii):
            p.error(f"--radii must be finite and >= 0, got {args.radii}")
    return args


# ----------------------------------------------------------------------------------------------------
# Statistics

def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion from k successes in n."""
    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


def certify_from_counts(counts0: np.ndarray, counts: np.ndarray, n: int, alpha: float, sigma: float) -> tuple[int, float]:
    """CERTIFY's decision from the selection counts and the (independent) estimation counts."""
    c_a = int(counts0.argmax())
    p_a = lower_confidence_bound(int(counts[c_a]), n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return c_a, sigma * float(PHI.inv_cdf(p_a))


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision: the top class, unless the top two are not separated at level alpha."""
    top2 = np.argsort(counts)[::-1][:2]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]])
    return ABSTAIN if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha else int(top2[0])


# ----------------------------------------------------------------------------------------------------
# Adaptive CERTIFY: the same estimation samples, drawn in stages, with early stopping

def adaptive_stages(n: int, stages: str | None) -> list[int]:
    """The looks n_1 < ... < n_K = n. Each is a multiple of NOISE_CHUNK, so stage k's samples are exactly the
    first n_k samples of a fixed-n run: an adaptive run that goes to n sees the very counts CERTIFY sees."""
    if stages is None:
        looks = [n // 100 // NOISE_CHUNK * NOISE_CHUNK, n // 10 // NOISE_CHUNK * NOISE_CHUNK]
    else:
        looks = [int(s) for s in stages.split(",")]
    if any(s < NOISE_CHUNK or s % NOISE_CHUNK for s in looks if stages is not None):
        raise ValueError(f"--stages must be multiples of {NOISE_CHUNK}, got {stages}")
    if n % NOISE_CHUNK:
        raise ValueError(f"--adaptive needs --n to be a multiple of {NOISE_CHUNK}, got {n}")
    return sorted({s for s in looks if 0 < s < n} | {n})


def default_radii(n: int, alpha: float, sigma: float, num_stages: int) -> list[float]:
    """0, 0.25, 0.5, ... up to the largest radius n samples can certify at the last stage's alpha (all correct)."""
    largest = sigma * float(PHI.inv_cdf(lower_confidence_bound(n, n, alpha / num_stages)))
    return [RADIUS_STEP * i for i in range(int(largest // RADIUS_STEP) + 1)]


def certify_adaptive(counts0: np.ndarray, estimate: Callable[[int], np.ndarray], stages: list[int], alpha: float, sigma: float,
                     radii: list[float]) -> tuple[int, float, int]:
    """Adaptive CERTIFY: returns (prediction or ABSTAIN, radius, estimation samples drawn).

    cA is selected from counts0 exactly as in CERTIFY. `estimate(m)` returns the class counts of the first m
    estimation samples. After stage k (m = n_k samples) the lower bound uses alpha_k = alpha / K:
        pA_lower_k = (1 - alpha_k) Clopper-Pearson lower bound from nA(n_k) of n_k,
        radius_k   = sigma Phi^-1(pA_lower_k), or abstain if pA_lower_k < 1/2,
    and sampling stops at the first stage where
      - radius_k reaches the largest reported radius (more samples cannot raise the table), or
      - the next reported radius above radius_k (radius 0 if abstaining) is out of reach at n: even the
        (1 - alpha_k) Clopper-Pearson upper bound on pA, observed in all n samples, would not certify it, or
      - k = K (n samples).
    The reported radius is radius_k at the stage where it stopped.

    Guarantee (as CERTIFY's): with probability at least 1 - alpha over the noise, if it does not abstain,
    the smoothed classifier g returns cA for every x' with ||x' - x||_2 < radius. Proof: the first n_k
    samples are i.i.d. whatever the stopping rule, so P(pA_lower_k > pA) <= alpha_k for each fixed k, and a
    wrong certificate needs this at the stage that stopped; a union bound over the K looks gives at most
    sum_k alpha_k = alpha, for any stopping rule. The price: every bound is at level alpha / K instead of
    alpha, so at the same n the radius is slightly smaller than CERTIFY's (n = 100,000, K = 3: the largest
    certifiable radius falls from 3.81 sigma to 3.77 sigma), and radii above the largest reported radius
    are cut short, so the ACR is lower than CERTIFY's while the table at the reported radii agrees up to
    sampling noise. The upper bound in the stopping rule affects only how many samples are drawn, never
    the guarantee.
    """
    c_a = int(counts0.argmax())
    alpha_k = alpha / len(stages)
    n = stages[-1]
    for n_k in stages:
        n_a = int(estimate(n_k)[c_a])
        p_lower = lower_confidence_bound(n_a, n_k, alpha_k)
        radius = sigma * float(PHI.inv_cdf(p_lower)) if p_lower >= 0.5 else None
        if n_k == n or (radius is not None and radius >= radii[-1]):
            break
        target = min(r for r in radii if radius is None or r > radius)
        best_at_n = lower_confidence_bound(math.ceil(upper_confidence_bound(n_a, n_k, alpha_k) * n), n, alpha_k)
        if best_at_n < PHI.cdf(target / sigma):
            break
    if radius is None:
        return ABSTAIN, 0.0, n_k
    return c_a, radius, n_k


# ----------------------------------------------------------------------------------------------------
# The noise loop: batched, compiled, counted on the device

def noise(shape: tuple, count: int, first: int, seed: int, idx: int, phase: str, device) -> torch.Tensor:
    """eps for samples first .. first+count-1 of (image idx, phase); first is a multiple of NOISE_CHUNK. Each
    chunk of NOISE_CHUNK samples has its own seed, so a sample's noise does not depend on which batch or
    process draws it."""
    chunks = torch.arange(first // NOISE_CHUNK, (first + count - 1) // NOISE_CHUNK + 1)
    return seeded_noise((NOISE_CHUNK, *shape), chunks, device, seed, idx, phase).flatten(0, 1)[:count]


def predict_noisy(model, x: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Base-classifier decisions f(x + sigma eps) for a batch of noise (what torch.compile fuses)."""
    return model(*noisy_input(x[None], sigma, eps)).argmax(1)


def sample_counts(classify, x: torch.Tensor, num: int, batch: int, num_classes: int, seed: int, idx: int, phase: str,
                  first: int = 0, tick: Callable[[int], None] | None = None) -> np.ndarray:
    """Class counts of samples first .. num-1; `tick(count)` after each batch (progress)."""
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    for start in range(first, num, batch):
        eps = noise(x.shape, min(batch, num - start), start, seed, idx, phase, x.device)
        counts += torch.bincount(classify(x, eps), minlength=num_classes)
        if tick:
            tick(len(eps))
    return counts.cpu().numpy()  # one host sync per phase, not per batch


def batch_sizes(spans: list[tuple[int, int]], batch: int) -> set[int]:
    """Every batch size sample_counts will use over these (first, num) spans: what torch.compile must see."""
    return {min(batch, num - start) for first, num in spans for start in range(first, num, batch)}


# ----------------------------------------------------------------------------------------------------
# Results file: one writer, append-only, whole lines only, resumable, never mixed across configurations

def floor_radius(radius: float) -> str:
    """The radius as the TSV holds it: rounded *down* to 4 decimals, so the written certificate is never
    larger than the computed one (0.24996 is 0.2499, not 0.2500, which would count at r = 0.25)."""
    return str(Decimal(radius).quantize(Decimal("0.0001"), rounding=ROUND_FLOOR))


def certified_indices(num_images: int, skip: int, num: int) -> list[int]:
    """Every skip-th test image, at most num of them. ImageNet's val folder is sorted by class, 50 images
    each, so skip 100 gives one image from each of 500 classes."""
    return list(range(0, num_images, skip))[:num]


def lock_results(path: str):
    """Take the one-writer lock: an exclusive flock on `path`.lock. The kernel drops it when the process
    dies, even by SIGKILL, so a killed run never leaves it stuck. Returns the lock file: closing it unlocks."""
    folder = os.path.dirname(os.path.abspath(path))
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {path}: {parent} is not a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"{path} is being written by another certify.py run; wait for it or choose another --out") from None
    return lock


def read_done(path: str, header: str) -> set[int]:
    """Indices of the images already certified. A torn last line (a kill mid-write) is cut off the file; any
    other malformed line is refused, leaving the file as it is."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    whole = data[: data.rfind(b"\n") + 1]
    try:
        rows = check_rows(path, whole, header)
    except ReportError as e:
        raise UsageError(f"{e}; not appending to it") from None
    if len(whole) != len(data):
        with open(path, "rb+") as f:
            f.truncate(len(whole))
    return {int(row[0]) for row in rows}


def open_results(path: str, config: dict, header: str) -> set[int]:
    """Check (or write) the sidecar config, write the header of a new file, return the rows done.
    Call with the lock held."""
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
    done = read_done(path, header)
    try:
        with open(meta, "w") as f:
            json.dump(config, f, indent=1)
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            with open(path, "w") as f:
                f.write(header + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    return done


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop, keeping the whole lines already written."""


def raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def append_rows(path: str, rows: list[str]) -> None:
    """Append whole lines. SIGINT/SIGTERM are held back until the lines are on disk, so a stop never tears one
    (a SIGKILL can; read_done cuts that torn line on the next run)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with open(path, "a") as f:
            f.write("".join(row + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


# ----------------------------------------------------------------------------------------------------
# Progress a person can read

class Progress:
    """image k / total, samples/s, elapsed and ETA after each image, and a line every PROGRESS_EVERY seconds
    inside a long one (rRCM-B on a CPU at n = 100,000 takes over an hour per image), so the first estimate
    of how long the run takes comes within a minute. Adaptive runs draw at most n0 + n: the ETA is an upper
    bound there."""

    def __init__(self, done_before: int, total: int, todo: int, per_image: int, world: int, upper: bool, show: bool):
        self.done, self.total, self.left, self.per_image, self.world = done_before, total, todo, per_image, world
        self.prefix, self.show = ("ETA <= " if upper else "ETA "), show
        self.start = self.last = time.time()
        self.samples = self.in_image = 0  # this process, this run / the current image

    def line(self, head: str) -> str:
        elapsed = time.time() - self.start
        rate = self.samples / max(elapsed, 1e-9)
        remaining = math.ceil(self.left / self.world) * self.per_image - self.in_image
        eta = clock(remaining / rate) if rate > 0 else "?"
        return f"{head} | {rate:,.0f} samples/s | elapsed {clock(elapsed)} | {self.prefix}{eta}"

    def tick(self, count: int) -> None:
        self.samples += count
        self.in_image += count
        if self.show and time.time() - self.last >= PROGRESS_EVERY:
            self.last = time.time()
            print(self.line(f"image {self.done + 1} / {self.total}: {self.in_image:,} of {self.per_image:,} samples"), flush=True)

    def images_done(self, rows: list[str]) -> None:
        self.in_image = 0
        for row in rows:
            self.done += 1
            self.left -= 1
            if self.show:
                print(self.line(f"image {self.done} / {self.total}") + " | " + row.replace("\t", " "), flush=True)
        self.last = time.time()


# ----------------------------------------------------------------------------------------------------

def certify_image(classify, x: torch.Tensor, idx: int, args: argparse.Namespace, sigma: float, radii: list[float] | None,
                  num_classes: int, tick) -> tuple[int, float, int]:
    """(prediction, radius, estimation samples) for one image, fixed-n, adaptive or PREDICT."""
    counts_of = lambda phase, num, first=0: sample_counts(classify, x, num, args.batch, num_classes, args.seed, idx, phase, first, tick)
    if args.predict:
        return predict_from_counts(counts_of("estimate", args.n), args.alpha), 0.0, args.n
    if not args.adaptive:
        counts = counts_of("estimate", args.n)
        return (*certify_from_counts(counts_of("select", args.n0), counts, args.n, args.alpha, sigma), args.n)
    drawn = [0, np.zeros(num_classes, dtype=np.int64)]  # samples drawn so far and their counts

    def estimate(num: int) -> np.ndarray:
        drawn[1] = drawn[1] + counts_of("estimate", num, drawn[0])
        drawn[0] = num
        return drawn[1]
    return certify_adaptive(counts_of("select", args.n0), estimate, args.stages, args.alpha, sigma, radii)


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """main's work; `stack` closes the lock however this ends."""
    select_kernels(args.kernels)
    rank, world, device = init_distributed()
    ckpt = load_checkpoint(args.checkpoint, "finetune")
    trained_sigma = ckpt["config"]["sigma"]
    sigma = trained_sigma if args.sigma is None else args.sigma
    dataset = ckpt["config"]["dataset"]
    skip = DEFAULT_SKIP[dataset] if args.skip is None else args.skip
    precision = resolve_precision(args.precision, device)
    mode = "predict" if args.predict else "certify-adaptive" if args.adaptive else "certify"
    args.out = out = args.out or os.path.join("out", "certify", f"{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}_sigma{sigma:g}"
                                   f"{'_predict' if args.predict else '_adaptive' if args.adaptive else ''}.tsv")
    radii = (args.radii or default_radii(args.n, args.alpha, sigma, len(args.stages))) if args.adaptive else None
    config = dict(checkpoint=os.path.abspath(args.checkpoint), step=ckpt["step"], sigma=sigma, mode=mode, n0=args.n0, n=args.n,
                  alpha=args.alpha, seed=args.seed, skip=skip, precision=precision)
    if args.adaptive:
        config |= dict(stages=args.stages, radii=radii)
    header = ADAPTIVE_HEADER if args.adaptive else HEADER
    # Rank 0 takes the lock and reads the file before anything is loaded or written; every rank learns the
    # outcome, so a refusal ends all processes with the same one line.
    done, refusal = set(), None
    if rank == 0:
        try:
            stack.enter_context(lock_results(out))
            done = open_results(out, config, header)
        except UsageError as e:
            refusal = str(e)
    if world > 1:
        box = [done, refusal]
        dist.broadcast_object_list(box)
        done, refusal = box
    if refusal:
        raise UsageError(refusal)

    model = model_from_checkpoint(ckpt).to(device).eval()
    test = Images(dataset, args.data_dir, "test", device)
    indices = certified_indices(len(test), skip, args.num)
    todo = [i for i in indices if i not in done]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    if rank == 0:
        print(f"{mode.upper()} sigma {sigma:g} (fine-tuned at {trained_sigma:g}), {len(indices)} images, "
              f"{len(indices) - len(todo)} already in {out}, {world} process(es) on {where}, precision {precision}"
              + (f", stages {args.stages}, radii {radii}" if args.adaptive else ""), flush=True)

    classify = lambda x, eps: predict_noisy(model, x, eps, sigma)
    classify = torch.compile(classify) if args.compile else classify
    num_classes = model.cfg.num_classes
    if args.compile and todo:  # compile every batch size the loop will use now, so no image's time includes it
        if rank == 0:
            print("compiling the noise loop ...", flush=True)
        looks = [0, *args.stages] if args.adaptive else [0, args.n]
        spans = [(0, args.n0)] + list(zip(looks[:-1], looks[1:]))
        x0, _ = test.batch(torch.tensor([todo[0]]))
        with torch.no_grad(), autocast(device, precision):
            for size in batch_sizes(spans, args.batch):
                classify(x0[0], torch.zeros(size, *x0.shape[1:], device=device))
    progress = Progress(len(indices) - len(todo), len(indices), len(todo), args.n0 + args.n, world, args.adaptive, rank == 0)
    # Rounds of `world` images, one per process; rank 0 writes each round in image order.
    for r in range(0, len(todo), world):
        line = None
        if r + rank < len(todo):
            idx = todo[r + rank]
            x, y = test.batch(torch.tensor([idx]))
            start = time.time()
            with torch.no_grad(), autocast(device, precision):
                prediction, radius, used = certify_image(classify, x[0], idx, args, sigma, radii, num_classes, progress.tick)
            label = int(y[0])
            line = f"{idx}\t{label}\t{prediction}\t{floor_radius(radius)}\t{int(prediction == label)}\t{time.time() - start:.3f}"
            line += f"\t{used}" if args.adaptive else ""
        lines = [line]
        if world > 1:
            lines = [None] * world
            dist.all_gather_object(lines, line)
        rows = [row for row in lines if row is not None]
        if rank == 0:
            append_rows(out, rows)
        progress.images_done(rows)
    if rank == 0:
        print(summary(out))
    if world > 1:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    previous = {s: signal.signal(s, raise_interrupted) for s in STOP_SIGNALS}
    try:
        with contextlib.ExitStack() as stack:
            run(args, stack)
    except Interrupted as e:
        raise Interrupted(f"interrupted by {e}; {args.out} holds whole lines only; run the same command to continue") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, Interrupted) as e:
        sys.exit(f"certify.py: error: {e}")
