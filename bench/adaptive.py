"""Adaptive against fixed-n CERTIFY: on a trained checkpoint from the same counts in one run, simulated under the
paper's protocol (the numbers behind smoothing.AdaptivePlan's design, and its alternatives), and exactly.

    python bench/adaptive.py --checkpoint out/finetune_sigma0.25/ckpt.pt --data-dir data --n 10000 --num 100 --skip 100
    python bench/adaptive.py --simulate
    python bench/adaptive.py --exact

Checkpoint: for each image, n0 selection samples and n estimation samples are drawn once (certify.py's noise),
in pieces that end at each adaptive look. Fixed-n CERTIFY decides from all n; adaptive CERTIFY from the prefix
counts at its looks, so both judge the very same samples, and the samples adaptive would have drawn are
recorded. Printed: both certified-accuracy tables side by side at the paper's radii, samples and seconds per
image (adaptive's seconds are its samples at the rate measured), every image whose row differs, and a projection
to the paper's n = 100,000 that replays binomial sample paths at each image's observed p_A = nA / n.

--simulate: 200,000 images per sigma of the README's mix (half p_A ~ U(0.99, 1), a quarter U(0.7, 0.9), a quarter
U(0.3, 0.5)) at n = 100,000, alpha = 0.001, CIFAR-10's radii: mean samples per sigma, the fraction of table rows
that differ from fixed-n's on the same counts, failure rates around every reported radius (with and without the
alpha split), and the same for alternative looks, alpha splits and futility levels.

--exact: the chosen design without sampling error, by dynamic programming over the looks (`stopping_law`):
expected samples and rows that differ, averaged over the README's mix and others (a weaker model, confident
images, ImageNet-like, n = 10,000), and the largest failure probability over p_A at alpha 0.001, 0.01 and 0.1.
About 2 minutes on 2 cores.
"""
import argparse
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from scipy.signal import fftconvolve
from scipy.stats import binom, norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import certify  # noqa: E402
import kernels  # noqa: E402
import results  # noqa: E402
import smoothing  # noqa: E402
from data import Images  # noqa: E402
from jobs import PRECISIONS, load_checkpoint, model_from_checkpoint, resolve_precision, select_kernels  # noqa: E402
from report import average_certified_radius, certified_accuracy  # noqa: E402

PAPER_N, PAPER_ALPHA, PAPER_SIGMAS = 100_000, 0.001, (0.25, 0.5, 1.0)


# ----------------------------------------------------------------------------------------------------
# Simulation

def paths(p: np.ndarray, looks: list[int], rng) -> np.ndarray:
    """[len(p), K]: how often class A (probability p) wins among the first looks[k] samples, one path per p."""
    return np.cumsum(rng.binomial(np.diff([0, *looks]), p[:, None]), axis=1)


# p_A of the selected class, as (share of the images, low, high) of uniform components. The README's: half the
# images clear (U(0.99, 1)), a quarter uncertain (U(0.7, 0.9)), a quarter abstaining (U(0.3, 0.5): g does not
# return the selected class).
README_MIX = ((0.5, 0.99, 1.0), (0.25, 0.7, 0.9), (0.25, 0.3, 0.5))


def image_mix(images: int, rng, mix=README_MIX) -> np.ndarray:
    """p_A of `images` simulated images: int(share x images) from each component, the last one the rest."""
    sizes = [int(share * images) for share, _, _ in mix[:-1]]
    sizes.append(images - sum(sizes))
    return np.concatenate([rng.uniform(low, high, size) for (_, low, high), size in zip(mix, sizes)])


def smallest_wrong_count(plan: smoothing.AdaptivePlan, k: int, truth: float | None) -> int:
    """The least nA at look k whose certificate (the library's radius) is wrong: any certificate if truth is None
    (p_A < 1/2: g does not return A), else one larger than truth. The radius grows with nA: bisection, ~17 calls."""
    wrong = lambda c: (r := plan.radius(k, c)) is not None and (truth is None or r > truth)
    low, high = 0, plan.looks[k] + 1
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if wrong(mid) else (mid + 1, high)
    return low


def replay(plan: smoothing.AdaptivePlan, p: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(samples, adaptive row, fixed-n row) of one sample path per p_A; fixed-n CERTIFY is the one-look plan."""
    wins = paths(p, plan.looks, rng)
    stop, n_a = plan.replay(wins)
    rows = np.empty(len(p), dtype=int)
    for k in np.unique(stop):
        rows[stop == k] = plan.row(k, n_a[stop == k])
    fixed = smoothing.AdaptivePlan(plan.n, plan.alpha, plan.sigma, plan.radii, looks=[])
    assert fixed.radii == plan.radii
    return np.asarray(plan.looks)[stop], rows, fixed.row(0, wins[:, -1])


def failure_rates(plan: smoothing.AdaptivePlan, trials: int, rng) -> dict[float, float]:
    """P(certified radius > true radius) at p_A just below, at and above every reported radius's threshold."""
    rates = {}
    targets = [0.5 if r == 0 else norm.cdf(r / plan.sigma) for r in plan.radii]
    for p in sorted({t + d for t in targets for d in (-1e-3, -1e-4, 0.0, 1e-4, 1e-3)}):
        truth = plan.sigma * norm.ppf(p) if p >= 0.5 else None
        first_wrong = [smallest_wrong_count(plan, k, truth) for k in range(len(plan.looks))]
        stop, n_a = plan.replay(paths(np.full(trials, p), plan.looks, rng))
        rates[p] = float(np.mean(n_a >= np.asarray(first_wrong)[stop]))
    return rates


class FutilityAt(smoothing.AdaptivePlan):
    """The plan with another level for the futility rule's upper bound (an alternative, not the library's)."""
    level = None

    def _largest_out_of_reach(self, m, need):
        saved, self.alpha = self.alpha, self.level
        try:
            return super()._largest_out_of_reach(m, need)
        finally:
            self.alpha = saved


def looks_ratio(ratio: float, n: int = PAPER_N) -> list[int]:
    """Looks ratio apart from 100, rounded to multiples of 100, below n."""
    looks, value = [], 100.0
    while round(value, -2) < n:
        if not looks or round(value, -2) > looks[-1]:
            looks.append(int(round(value, -2)))
        value *= ratio
    return looks


def simulate(images: int, trials: int) -> None:
    radii = certify.PAPER_RADII["cifar10"]

    def design(name: str, looks=None, share=0.99, futility=None, reported=radii) -> None:
        saved, smoothing.LAST_LOOK_SHARE = smoothing.LAST_LOOK_SHARE, share
        means, differ = [], []
        try:
            for sigma in PAPER_SIGMAS:
                rng = np.random.default_rng(0)
                cls = smoothing.AdaptivePlan
                if futility is not None:
                    cls = type("Plan", (FutilityAt,), {"level": futility})
                plan = cls(PAPER_N, PAPER_ALPHA, sigma, reported, looks)
                used, rows, fixed = replay(plan, image_mix(images, rng), rng)
                means.append(used.mean())
                differ.append(np.mean(rows != fixed))
        finally:
            smoothing.LAST_LOOK_SHARE = saved
        print(f"| {name} | " + " | ".join(f"{m:,.0f}" for m in means) + f" | {PAPER_N / np.mean(means):.1f}x | "
              + " / ".join(f"{d:.3%}" for d in differ) + " |", flush=True)

    print(f"{images:,} simulated images per sigma (half p_A ~ U(0.99, 1), a quarter U(0.7, 0.9), a quarter U(0.3, 0.5)), "
          f"n = {PAPER_N:,}, alpha = {PAPER_ALPHA}, radii {radii} capped per sigma; rows differ = the largest reported "
          f"radius certified differs from fixed-n CERTIFY's on the same samples\n")
    print("| design | samples sigma 0.25 | 0.5 | 1.0 | saving | rows differ 0.25 / 0.5 / 1.0 |\n|---|---|---|---|---|---|")
    design("**chosen**: looks x2 (100, 200, 400, ..., 51,200, 100k: 11), 99 % of alpha at n, futility at alpha")
    design("looks x10: 1k, 10k, 100k (3)", looks=[1000, 10_000])
    # The design of 2026-11-22 that issue 16 measured: three looks at alpha / 3 each, radii up to what n certifies.
    design("2026-11-22: 1k, 10k, 100k at alpha / 3 each, radii 0, 0.25, ... up to what n certifies", looks=[1000, 10_000],
           share=1 / 3, reported=[0.25 * i for i in range(20)])
    design("looks x10: 100, 1k, 10k, 100k (4)", looks=[100, 1000, 10_000])
    design("looks x3: 100, 300, 1000, ..., 100k (7)", looks=[100, 300, 1000, 3000, 10_000, 30_000])
    design("looks 1-2-5: 100, 200, 500, 1000, ..., 100k (10)", looks=[m * 10 ** e for e in (2, 3, 4) for m in (1, 2, 5)])
    design("looks x1.41: 100, 100 sqrt 2, 200, ... rounded to 100s (20)", looks=looks_ratio(2 ** 0.5))
    for share in (0.9, 0.999):
        design(f"{share:.1%} of alpha at n", share=share)
    design("futility at 10 alpha", futility=10 * PAPER_ALPHA)
    design("futility at alpha / 10", futility=PAPER_ALPHA / 10)

    print(f"\nfailure rates (certified radius > true radius), {trials:,} sample paths per p_A, at p_A = threshold "
          f"+ (-1e-3, -1e-4, 0, 1e-4, 1e-3) of every reported radius:")
    rng = np.random.default_rng(1)
    for split in ("split", "unsplit"):
        if split == "unsplit":
            saved, smoothing.split_alpha = smoothing.split_alpha, lambda alpha, looks: [alpha] * len(looks)
        for sigma in PAPER_SIGMAS:
            rates = failure_rates(smoothing.AdaptivePlan(PAPER_N, PAPER_ALPHA, sigma, radii), trials, rng)
            worst = max(rates, key=rates.get)
            print(f"  {split:7s} sigma {sigma}: worst p_A {worst:.5f}: {rates[worst] / PAPER_ALPHA:.2f} alpha; "
                  f"mean over the {len(rates)} p_A {np.mean(list(rates.values())) / PAPER_ALPHA:.2f} alpha", flush=True)
        if split == "unsplit":
            smoothing.split_alpha = saved


# ----------------------------------------------------------------------------------------------------
# Exact: the law of (stopping look, nA there), by dynamic programming over the looks

class Exact(NamedTuple):
    samples: float  # E[estimation samples drawn]
    failure: float  # P(certified radius > the true one, sigma Phi^-1(p_A)); for p_A < 1/2, P(any certificate)
    differ: float   # P(the row, the largest reported radius certified, differs from fixed-n CERTIFY's on the same samples)


def binomial(m: int, p: float) -> tuple[int, np.ndarray]:
    """Bin(m, p) where it is not negligible: (first count, pmf from there). Cut 40 standard deviations and 40
    counts beyond the mean on each side, where what is left out is far below 1e-30."""
    spread = 40 * math.sqrt(m * p * (1 - p)) + 40
    first, last = max(0, math.floor(m * p - spread)), min(m, math.ceil(m * p + spread))
    return first, binom.pmf(np.arange(first, last + 1), m, p)


def stopping_law(plan: smoothing.AdaptivePlan, p: float) -> list[tuple[int, np.ndarray]]:
    """Where adaptive CERTIFY stops when class A wins each sample with probability p, exactly: for each look k
    reached, (first, mass) with mass[i] = P(it stops at look k with nA = first + i). nA at the first look is
    Bin(looks[0], p); the mass there that stops (plan.stops) is kept, and what goes on gets the next look's new
    samples: a convolution with Bin(looks[k + 1] - looks[k], p)."""
    law, (first, mass) = [], binomial(plan.looks[0], p)
    for k in range(len(plan.looks)):
        stop = plan.stops(k, first + np.arange(len(mass)))
        law.append((first, np.where(stop, mass, 0.0)))
        going = np.flatnonzero(~stop & (mass > 0))
        if not going.size:  # at the last look everything stops
            break
        step_first, step = binomial(plan.looks[k + 1] - plan.looks[k], p)
        going_mass = np.where(stop, 0.0, mass)[going[0]:going[-1] + 1]
        # FFT for vectors of thousands; its rounding (~1e-16 of the largest mass) can go below 0
        mass = np.clip(fftconvolve(going_mass, step), 0.0, None)
        first += going[0] + step_first
    total = sum(m.sum() for _, m in law)
    assert abs(total - 1) < 1e-9, f"p_A {p}: the law's total mass is {total}"
    return law


def exact(plan: smoothing.AdaptivePlan, p: float, rows: bool = True) -> Exact:
    """Expected samples, failure probability and P(row differs from fixed-n's) at p_A = p, from `stopping_law`.
    A stop at look k with nA = c is wrong when c >= smallest_wrong_count (the library's radius, as returned).
    Fixed-n CERTIFY (one look at n, level alpha) sees c + Bin(n - looks[k], p) of the same samples, so its row
    differs when that count is below the least that certifies the adaptive row at n or reaches the next one's:
    two binomial tails per count (rows=False skips them, a third of the time, and gives differ nan)."""
    fixed = smoothing.AdaptivePlan(plan.n, plan.alpha, plan.sigma, plan.radii, looks=[])
    assert fixed.radii == plan.radii
    bounds = np.array([0, *fixed.certifies[0], plan.n + 1])  # fixed-n's row is j where bounds[j + 1] <= nA < bounds[j + 2]
    truth = plan.sigma * norm.ppf(p) if p >= 0.5 else None
    samples = failure = 0.0
    differ = 0.0 if rows else math.nan
    for k, (first, mass) in enumerate(stopping_law(plan, p)):
        samples += plan.looks[k] * mass.sum()
        failure += mass[max(0, smallest_wrong_count(plan, k, truth) - first):].sum()
        if rows:
            live = np.flatnonzero(mass > 1e-20)  # the rest adds < 1e-15 in all
            counts, rest = first + live, plan.n - plan.looks[k]
            row = plan.row(k, counts)
            differ += np.dot(mass[live], binom.cdf(bounds[row + 1] - counts - 1, rest, p)
                             + binom.sf(bounds[row + 2] - counts - 1, rest, p))
    return Exact(samples, failure, differ)


def thresholds(plan: smoothing.AdaptivePlan) -> list[float]:
    """The p_A whose true radius is each reported radius: Phi(r / sigma), 1/2 for r = 0."""
    return [0.5 if r == 0 else float(norm.cdf(r / plan.sigma)) for r in plan.radii]


def mix_average(plan: smoothing.AdaptivePlan, mix, halve: bool = False) -> Exact:
    """`exact` averaged over images whose p_A follows `mix` (shares of uniform components): Gauss-Legendre with 4
    nodes on each panel of a mesh graded towards every reported radius's threshold t (edges t +- sd 2^j, sd =
    sqrt(t (1 - t) / n)): there the images go on to late looks, and the expected samples change on the scale
    of each look's standard deviation. halve=True splits every panel in two, to see the rule has converged."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    total = np.zeros(3)
    for share, low, high in mix:
        edges = {low, (low + high) / 2, high}
        for t in thresholds(plan):
            sd = math.sqrt(t * (1 - t) / plan.n)
            edges |= {q for j in range(40) for q in (t - sd * 2 ** j, t, t + sd * 2 ** j) if low < q < high}
        edges = np.array(sorted(edges))
        if halve:
            edges = np.sort(np.concatenate([edges, (edges[1:] + edges[:-1]) / 2]))
        for a, b in zip(edges[:-1], edges[1:]):
            for x, w in zip(nodes, weights):
                total += share * w * (b - a) / 2 / (high - low) * np.array(exact(plan, (a + b) / 2 + (b - a) / 2 * x))
    return Exact(*total)


def tooth_top(plan: smoothing.AdaptivePlan, c: int) -> float:
    """p_A a hair below the last look's bound from c of n samples. As p_A grows past a look's bound LB_k(c), a
    certificate from c stops being wrong and the failure probability drops by P(stop at look k with c); between
    bounds it changes smoothly. So it peaks just below a bound: the last look's (drops up to 3 % of alpha), or an
    earlier one's (each drop below alpha_k, alpha / 1000: not looked for)."""
    return smoothing.lower_confidence_bound(c, plan.n, plan.alphas[-1]) - 1e-10


def count_at(plan: smoothing.AdaptivePlan, q: float) -> int:
    """The least count of n whose last-look bound is >= q."""
    low, high = 0, plan.n
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if smoothing.lower_confidence_bound(mid, plan.n, plan.alphas[-1]) >= q else (mid + 1, high)
    return low


def worst_failure(plan: smoothing.AdaptivePlan, grid: int = 400) -> tuple[float, float, int]:
    """(p_A, failure probability) at the largest exact failure probability found, and how many p_A were tried:
    near each reported radius's threshold t the failure peaks about 0.4 sd above t (sd = sqrt(t (1 - t) / n):
    nearly every image goes on to n, and the last look spends 99 % of alpha), so tooth tops from 2 sd below to
    5 sd above t, every sd / 4, then zooming in (strides / 4, down to every count) around the largest; and the
    tooth tops nearest `grid` evenly spaced p_A over (1/2, 1)."""
    tried = {}

    def at(c: int) -> float:
        if c not in tried:
            tried[c] = exact(plan, tooth_top(plan, c), rows=False).failure
        return tried[c]
    for t in thresholds(plan):
        sd = math.sqrt(t * (1 - t) / plan.n)
        low, high = count_at(plan, t - 2 * sd), count_at(plan, t + 5 * sd)
        stride = max(1, round(sd * plan.n / 4))
        while True:
            best = max(range(low, high + 1, stride), key=at)
            if stride == 1:
                break
            low, high, stride = max(low, best - stride), min(high, best + stride), max(1, stride // 4)
    for q in np.linspace(0.5, 1, grid + 2)[1:-1]:
        at(count_at(plan, q))
    worst = max(tried, key=tried.get)
    return tooth_top(plan, worst), tried[worst], len(tried)


# Other images: a weaker model, and one that is confident about every image.
WEAKER_MIX = ((0.7, 0.5, 0.95), (0.3, 0.2, 0.5))
CONFIDENT_MIX = ((1.0, 0.999, 1.0),)
# ImageNet-like at sigma 0.5: p_A uniform between the thresholds of r = 0, 0.5, 1.0, 1.5 (Phi(r / 0.5)) with the
# shares that give Cohen et al.'s (2019, Table 1) ImageNet certified accuracy at sigma 0.5, 57 / 46 / 37 / 29 %;
# the 43 % not certified at 0 abstain or are wrong, U(0.2, 0.5).
IMAGENET_MIX = ((0.43, 0.2, 0.5), (0.11, 0.5, float(norm.cdf(1))), (0.09, float(norm.cdf(1)), float(norm.cdf(2))),
                (0.08, float(norm.cdf(2)), float(norm.cdf(3))), (0.29, float(norm.cdf(3)), 1.0))


def radii_text(plan: smoothing.AdaptivePlan) -> str:
    radii = [f"{r:g}" for r in plan.radii]
    return ", ".join(radii) if len(radii) <= 3 else f"{radii[0]}, {radii[1]}, ..., {radii[-1]}"


def exact_report() -> None:
    start = time.perf_counter()
    cifar, imagenet = certify.PAPER_RADII["cifar10"], certify.PAPER_RADII["imagenet"]
    print(f"Exact, by dynamic programming over the looks (bench/adaptive.py `stopping_law`), alpha = {PAPER_ALPHA} unless "
          f"said; p_A of the selected class; mean over the images by Gauss-Legendre quadrature on a mesh graded towards "
          f"the radii's thresholds (`mix_average`; the last column: the largest relative change of the expected samples "
          f"and of the rows that differ when every panel is halved, whose values are shown). Rows differ: the largest "
          f"reported radius certified differs from fixed-n CERTIFY's on the same samples.\n")
    print("| images | n | sigma | reported radii | expected samples | saving | rows differ | quadrature |\n"
          "|---|---|---|---|---|---|---|---|")
    cases = [("the README's: 1/2 U(0.99, 1), 1/4 U(0.7, 0.9), 1/4 U(0.3, 0.5)", README_MIX, PAPER_N, PAPER_SIGMAS, cifar),
             ("weaker: 70 % U(0.5, 0.95), 30 % U(0.2, 0.5)", WEAKER_MIX, PAPER_N, PAPER_SIGMAS, cifar),
             ("confident: U(0.999, 1)", CONFIDENT_MIX, PAPER_N, (0.25,), cifar),
             ("ImageNet-like: 43 % U(0.2, 0.5), 11 / 9 / 8 / 29 % uniform from Phi(r / sigma) of r = 0 / 0.5 / 1.0 / 1.5 "
              "to the next (1)", IMAGENET_MIX, PAPER_N, (0.5,), imagenet),
             ("the README's", README_MIX, 10_000, PAPER_SIGMAS, cifar)]
    for name, mix, n, sigmas, radii in cases:
        plans = [smoothing.AdaptivePlan(n, PAPER_ALPHA, sigma, radii) for sigma in sigmas]
        coarse, fine = [mix_average(plan, mix) for plan in plans], [mix_average(plan, mix, halve=True) for plan in plans]
        change = [max(abs(c[i] - f[i]) / f[i] for c, f in zip(coarse, fine)) for i in (0, 2)]  # samples, differ
        print(f"| {name} | {n:,} | " + " / ".join(map(str, sigmas)) + " | " + " / ".join(map(radii_text, plans)) + " | "
              + " / ".join(f"{f.samples:,.0f}" for f in fine) + f" | {n / np.mean([f.samples for f in fine]):.1f}x | "
              + " / ".join(f"{f.differ:.4%}" for f in fine) + f" | {change[0]:.0e} / {change[1]:.0e} |", flush=True)

    print(f"\nExact failure probability, P(certified radius > true radius), in units of alpha: the largest found over "
          f"the p_A scanned (`worst_failure`: the tops of the sawtooth near every reported radius's threshold, and 400 "
          f"more over (1/2, 1)); n = {PAPER_N:,}, CIFAR-10's radii (capped per sigma and alpha)\n")
    print("| alpha | sigma | reported radii | worst | at p_A | p_A tried |\n|---|---|---|---|---|---|")
    for alpha in (0.001, 0.01, 0.1):
        for sigma in PAPER_SIGMAS:
            plan = smoothing.AdaptivePlan(PAPER_N, alpha, sigma, cifar)
            p, failure, tried = worst_failure(plan)
            print(f"| {alpha} | {sigma} | {radii_text(plan)} | {failure / alpha:.4f} | {p:.6f} | {tried} |", flush=True)

    print(f"\nThe same at the 70 p_A of the Monte Carlo in bench/README.md (threshold + (-1e-3, -1e-4, 0, 1e-4, 1e-3) "
          f"of every reported radius), alpha = {PAPER_ALPHA}, with and without the alpha split (every look at alpha):\n")
    print("| alpha split | sigma | worst of the p_A | at p_A | mean |\n|---|---|---|---|---|")
    saved = smoothing.split_alpha
    for split in ("split", "unsplit"):
        if split == "unsplit":
            smoothing.split_alpha = lambda alpha, looks: [alpha] * len(looks)
        try:
            for sigma in PAPER_SIGMAS:
                plan = smoothing.AdaptivePlan(PAPER_N, PAPER_ALPHA, sigma, cifar)
                rates = {p: exact(plan, p, rows=False).failure / PAPER_ALPHA
                         for p in sorted({t + d for t in thresholds(plan) for d in (-1e-3, -1e-4, 0.0, 1e-4, 1e-3)})}
                worst = max(rates, key=rates.get)
                print(f"| {split} | {sigma} | {rates[worst]:.4f} | {worst:.5f} | {np.mean(list(rates.values())):.4f} |", flush=True)
        finally:
            smoothing.split_alpha = saved
    p = float(norm.cdf(1)) + 1e-3
    plan = smoothing.AdaptivePlan(PAPER_N, PAPER_ALPHA, 0.25, cifar)
    print(f"\nAt p_A = Phi(1) + 1e-3 = {p:.5f}, sigma 0.25 (where bench/README.md's Monte Carlo found 1.12 alpha): "
          f"exact {exact(plan, p).failure / PAPER_ALPHA:.4f} alpha")
    print(f"\n{time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------------------------------
# A checkpoint

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--simulate", action="store_true", help="the simulation of the paper's protocol instead of a checkpoint")
    p.add_argument("--exact", action="store_true", help="exact expected samples and failure probabilities instead of a checkpoint")
    p.add_argument("--images", type=int, default=200_000, help="--simulate: images per sigma")
    p.add_argument("--trials", type=int, default=200_000, help="--simulate: sample paths per p_A for the failure rates")
    p.add_argument("--checkpoint", default=None, help="a finetune.py checkpoint")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 / ImageNet is")
    p.add_argument("--sigma", type=float, default=None, help="default: the fine-tuning sigma")
    p.add_argument("--n", type=int, default=10_000, help="estimation samples of the fixed run, the most the adaptive run draws")
    p.add_argument("--num", type=int, default=100, help="how many test images")
    p.add_argument("--skip", type=int, default=100, help="every skip-th test image")
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass (multiple of 100)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="bf16 autocast or fp32 (auto: bf16 where native)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the noise loop")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend(), help="fused Triton kernels or PyTorch")
    args = p.parse_args()
    if args.simulate:
        simulate(args.images, args.trials)
        return
    if args.exact:
        exact_report()
        return
    if args.checkpoint is None or args.n % smoothing.CHUNK or args.batch % smoothing.CHUNK:
        p.error("--checkpoint is needed (or --simulate or --exact), and --n and --batch must be multiples of 100")
    select_kernels(args.kernels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, device)
    ckpt = load_checkpoint(args.checkpoint, "finetune")
    dataset = ckpt["config"]["dataset"]
    sigma = ckpt["config"]["sigma"] if args.sigma is None else args.sigma
    model = model_from_checkpoint(ckpt).to(device).eval()
    test = Images(dataset, args.data_dir, "test", device)
    indices = certify.certified_indices(len(test), args.skip, args.num)
    smooth = smoothing.Smooth(certify.RRCMClassifier(model, sigma), model.cfg.num_classes, sigma, batch=args.batch,
                              compile=args.compile, autocast=torch.bfloat16 if precision == "bf16" else None)
    plan = smoothing.AdaptivePlan(args.n, args.alpha, sigma, certify.PAPER_RADII[dataset])
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{where}, precision {precision}, {args.checkpoint} (fine-tuned at sigma {ckpt['config']['sigma']:g}), "
          f"sigma {sigma:g}, {len(indices)} images, n0 100, n {args.n:,}, alpha {args.alpha}; adaptive {plan.describe()}", flush=True)
    if args.compile:
        smooth.warm_up(test.batch(torch.tensor(indices[:1]))[0][0], 100, plan.looks)

    rows = []  # idx, label, fixed (prediction, radius), adaptive (prediction, radius, samples), seconds, p_A
    for idx in indices:
        x, y = test.batch(torch.tensor([idx]))
        start = time.perf_counter()
        counts0 = smooth.counts(x[0], 100, key=idx, phase=smoothing.SELECT)
        prefix, total = {}, np.zeros(model.cfg.num_classes, dtype=np.int64)
        for first, look in zip([0, *plan.looks[:-1]], plan.looks):  # one pass of n samples, counted at each look
            total = total + smooth.counts(x[0], look, key=idx, first=first)
            prefix[look] = total
        seconds = time.perf_counter() - start
        fixed = smoothing.certify_from_counts(counts0, total, args.n, args.alpha, sigma)
        adaptive = smoothing.certify_adaptive(counts0, prefix.get, plan)
        rows.append((idx, int(y[0]), fixed, adaptive, seconds, total[np.argmax(counts0)] / args.n))
        print(f"image {idx}: label {int(y[0])}, fixed {fixed[0]} r {results.floor_radius(fixed[1])}, adaptive {adaptive[0]} "
              f"r {results.floor_radius(adaptive[1])} after {adaptive[2]:,} samples, {seconds:.1f} s", flush=True)

    def run(k: int) -> dict:  # as the TSV would hold it: radius floored to 4 decimals
        radius = np.array([float(results.floor_radius(r[2 + k][1])) for r in rows])
        correct = np.array([float(r[2 + k][0] == r[1]) for r in rows])
        return dict(radius=radius, correct=correct)
    fixed, adaptive = run(0), run(1)
    samples = np.array([r[3][2] for r in rows])
    rate = len(rows) * (100 + args.n) / sum(r[4] for r in rows)
    print(f"\n{'':10s} {'samples/image':>14s} {'s/image':>9s} " + " ".join(f"{r:6.2f}" for r in plan.radii) + "    ACR")
    for name, result, per_image in (("fixed n", fixed, 100 + args.n), ("adaptive", adaptive, 100 + samples.mean())):
        acc = [100 * certified_accuracy(result["radius"], result["correct"], r) for r in plan.radii]
        print(f"{name:10s} {per_image:14,.0f} {per_image / rate:9.3f} " + " ".join(f"{a:6.1f}" for a in acc)
              + f"  {average_certified_radius(result['radius'], result['correct']):5.3f}")
    row_of = lambda result: [int(np.sum(np.asarray(plan.radii) <= r)) - 1 if c else -1 for r, c in zip(result["radius"], result["correct"])]
    differ = [r[0] for r, a, b in zip(rows, row_of(fixed), row_of(adaptive)) if a != b]
    print(f"saving at n = {args.n:,}: {(100 + args.n) / (100 + samples.mean()):.1f}x fewer samples (n0 included; "
          f"{args.n / samples.mean():.1f}x of the estimation samples) at {rate:,.0f} samples/s; table rows differ for "
          f"{len(differ)} of {len(rows)} images{': ' + ', '.join(map(str, differ)) if differ else ''}")

    paper = smoothing.AdaptivePlan(PAPER_N, args.alpha, sigma, certify.PAPER_RADII[dataset])
    p_a = np.repeat(np.array([r[5] for r in rows]), 20)
    used, rows_a, rows_f = replay(paper, p_a, np.random.default_rng(0))
    hours = lambda per_image: 500 * per_image / rate / 3600
    print(f"projected for n = {PAPER_N:,} at sigma {sigma:g} (20 binomial paths at each image's observed p_A; 500 images "
          f"at this rate): fixed {hours(100 + PAPER_N):,.1f} h, adaptive {hours(100 + used.mean()):,.1f} h "
          f"({used.mean():,.0f} estimation samples per image, {PAPER_N / used.mean():.1f}x fewer); rows differ on "
          f"{np.mean(rows_a != rows_f):.2%} of the paths")


if __name__ == "__main__":
    main()
