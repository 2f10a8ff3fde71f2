"""Certified-accuracy tables and curves from certify.py's TSVs, as in the paper's Tables 1-2.

    python report.py out/certify/*.tsv                       # one row per run, side by side
    python report.py a.tsv b.tsv c.tsv --envelope            # plus "best over sigma": the max at each radius
    python report.py out/certify/*.tsv --plot curves.png     # certified accuracy vs radius (needs matplotlib)
    python report.py a.tsv --ci                              # each accuracy with its 95 % Clopper-Pearson interval
    python report.py base.tsv x.tsv y.tsv --compare          # x and y each against base, paired over the images

Certified accuracy at radius r = the fraction of images that are classified correctly with certified
radius >= r (abstentions count as wrong); ACR = mean of radius * correct. The paper's Table 2 is the best
over its Table 9 grid (fine-tuning sigma x certification sigma): pass all nine runs with --envelope (runs
over other images, or one file twice, are refused: the best over them would mean nothing).

An adaptive run (certify.py --adaptive) shows only the radii its plan reported (its .json's `radii`; - in
the other columns), and its ACR is marked as truncated: it stops an image once it certifies the largest.

A run whose predictions fall on a few classes gets a note under the table: its certified accuracy is then
little more than the share of the test set those classes hold (a frozen near-zero head does this).

--compare pairs runs over the images they both certified (the same images, or refused), at each radius r:
how many images only A, only B and both certify correctly (correct and radius >= r), A's and B's certified
accuracy, B - A with Tango's score interval for a paired difference (Tango 1998), and the exact two-sided
McNemar p-value (the binomial test of the discordant counts at 1/2), with Holm's correction over every p-value
printed (Holm 1979). docs/compare.md says how to read it.
"""
import argparse
import math
import os
import sys
from statistics import NormalDist

import numpy as np

from results import ResultsError, read_tsv

# certify.PAPER_RADII (not imported: certify.py needs torch): the radii of the paper's tables, --compare's default
PAPER_RADII = {"cifar10": (0.0, 0.25, 0.5, 0.75, 1.0), "imagenet": (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)}
# The table's last radius column: sigma = 1.0, the paper's largest, certifies at most 3.81 with its
# n = 100,000, so 4.0 holds every radius of the paper's settings in 17 columns (a TSV does not say its sigma;
# any larger radius still counts in the last column, and certify.py's sidecar bounds it exactly).
MAX_COLUMN_RADIUS = 4.0
# A run is "collapsed" when its predictions need at most half as many classes to cover 90 % of them as the
# labels need to cover 90 % of the images: it can then be right on little more than the images of those
# few classes (on a balanced test set, their share of it), whatever its robustness. A healthy CIFAR-10
# classifier needs about 9 classes, like the labels; the frozen-head tutorial run needed 2.
COVER, COLLAPSE_RATIO, COLLAPSE_MIN_IMAGES = 0.9, 0.5, 20


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, r: float) -> float:
    """Fraction of images classified correctly with certified radius >= r."""
    return float(np.mean((correct == 1) & (radius >= r))) if len(radius) else 0.0


def average_certified_radius(radius: np.ndarray, correct: np.ndarray) -> float:
    return float(np.mean(radius * correct)) if len(radius) else 0.0


def radii_for(runs: list[dict]) -> np.ndarray:
    """0, 0.25, ... up to the largest certified radius of any run (at least 1.0, at most MAX_COLUMN_RADIUS:
    the last column counts every larger radius too)."""
    largest = min(MAX_COLUMN_RADIUS, max([1.0] + [float(r["radius"].max(initial=0)) for r in runs]))
    return np.arange(0, largest + 1e-9, 0.25)


def classes_covering(values: np.ndarray, share: float = COVER) -> list[int]:
    """The fewest classes, most frequent first, that hold `share` of `values` (abstentions, -1, left out)."""
    classes, counts = np.unique(values[values >= 0].astype(int), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    needed = int(np.searchsorted(np.cumsum(counts[order]), share * counts.sum() - 1e-9)) + 1
    return [int(c) for c in classes[order][:needed]]


def collapse_note(name: str, run: dict) -> str | None:
    """A one-line warning when the run's predictions fall on far fewer classes than its labels (COLLAPSE_*)."""
    predict, label = run["predict"], run["label"]
    if (predict >= 0).sum() < COLLAPSE_MIN_IMAGES:
        return None
    used, needed = classes_covering(predict), classes_covering(label)
    if len(used) > COLLAPSE_RATIO * len(needed):
        return None
    names = (f"class {used[0]}" if len(used) == 1 else "classes " + ", ".join(map(str, used[:-1])) + f" and {used[-1]}")
    covered = int(np.isin(predict, used).sum())
    return (f"{name}: {covered} of {len(predict)} predictions are {names}: the table is close to the class prior "
            f"(the labels need {len(needed)} classes to cover {COVER:.0%} of the images)")


def reported(run: dict, radii: np.ndarray) -> np.ndarray:
    """Which of `radii` hold a run's results: all for CERTIFY; for adaptive CERTIFY only the radii its plan reported
    (its sidecar's `radii`; none without one). It stops an image once it certifies the largest of them or the next
    is out of reach, so its accuracy at other radii is not CERTIFY's (at sigma 1.0, 3.8 % at r = 1.25 against 50.3 %)."""
    if "samples" not in run:
        return np.ones(len(radii), dtype=bool)
    return np.isclose(np.asarray(radii)[:, None], run.get("reported", np.zeros(0))[None, :], rtol=0, atol=1e-9).any(1)


def truncation_note(name: str, run: dict) -> str | None:
    """A one-line note for an adaptive run: its ACR is cut at its largest reported radius, and which columns it shows."""
    if "samples" not in run:
        return None
    if "reported" not in run:
        return (f"* {name}: adaptive, without its .json: the radii its plan reported are unknown, so no column is shown; "
                "its ACR is truncated")
    return (f"* {name}: adaptive, reporting radii {', '.join(f'{r:g}' for r in run['reported'])}: an image stops once it "
            f"certifies {run['reported'].max():g}, so its ACR is truncated (below CERTIFY's); other radii show -")


def different_images(names: list[str], runs: list[dict], why: str = "the best over them would mix test sets") -> str | None:
    """Why a best-over-runs row (or a paired comparison) would mean nothing: runs over different test images
    (None when they agree)."""
    first = set(runs[0]["idx"].tolist())
    for name, run in zip(names[1:], runs[1:]):
        other = set(run["idx"].tolist())
        if other != first:
            return (f"{names[0]} and {name} cover different test images ({len(first)} and {len(other)}, {len(first ^ other)} "
                    f"in only one): {why}")
    return None


def certified(run: dict, r: float) -> np.ndarray:
    """Per image, in the order of idx: classified correctly with certified radius >= r (the TSV's radius, written
    rounded down, so an image never counts at a radius it was not certified for)."""
    return ((run["correct"] == 1) & (run["radius"] >= r))[np.argsort(run["idx"], kind="stable")]


def table(names: list[str], runs: list[dict], envelope: bool = False, level: float | None = None) -> str:
    """One row per run (certified accuracy in % at each radius column, ACR, images); with `level`, two rows under
    each: its Clopper-Pearson interval at that level; with `envelope` the best over the runs at each radius, refused
    for runs over different images. Columns a run did not report show -."""
    if envelope and (problem := different_images(names, runs)):
        raise ResultsError(problem)
    radii = radii_for(runs)
    bounds = [f"  {100 * level:g}% CI {side}" for side in ("low", "high")] if level is not None else []
    width = max([12] + [len(n) for n in names + bounds] + ([len("best of above")] if envelope else []))
    cell = lambda a: f"{'-':>6s}" if a is None else f"{a:6.1f}"
    lines, columns = [f"{'run':{width}s} " + " ".join(f"{r:6.2f}" for r in radii) + "    ACR  images"], []
    for name, run in zip(names, runs):
        shown = reported(run, radii)
        columns.append([certified_accuracy(run["radius"], run["correct"], r) * 100 if ok else None
                        for r, ok in zip(radii, shown)])
        acr, mark = average_certified_radius(run["radius"], run["correct"]), "*" if "samples" in run else " "
        lines.append(f"{name:{width}s} " + " ".join(map(cell, columns[-1])) + f"  {acr:5.3f}{mark} {len(run['radius']):6d}")
        if level is not None:
            intervals = [clopper_pearson(int(certified(run, r).sum()), len(run["radius"]), level) if ok else None
                         for r, ok in zip(radii, shown)]
            lines += [f"{label:{width}s} " + " ".join(cell(None if i is None else 100 * i[side]) for i in intervals)
                      for side, label in enumerate(bounds)]
    if envelope:
        best = [max((a for a in column if a is not None), default=None) for column in zip(*columns)]
        lines.append(f"{'best of above':{width}s} " + " ".join(map(cell, best)) + "      -")
    notes = [note(name, run) for note in (truncation_note, collapse_note) for name, run in zip(names, runs)]
    return "\n".join(lines + [n for n in notes if n])


def summary(path: str) -> str:
    run = read_tsv(path)
    samples = f", {run['samples'].mean():,.0f} estimation samples per image" if "samples" in run and len(run["samples"]) else ""
    seconds = run["time"].mean() if len(run["time"]) else 0.0
    return f"{len(run['radius'])} images, {seconds:.2f} s per image{samples}\n" + table([os.path.basename(path)], [run])


def plot_curves(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy of each run on a fine grid of radii (and every reported radius): NaN where a run has
    no result (`reported`)."""
    grid = np.union1d(np.linspace(0, radii_for(runs)[-1], 200), np.concatenate([r.get("reported", np.zeros(0)) for r in runs]))
    accuracy = lambda run: [certified_accuracy(run["radius"], run["correct"], r) for r in grid]
    return grid, np.array([np.where(reported(run, grid), accuracy(run), np.nan) for run in runs])


def axis_top(highest: float, full: float) -> float:
    """Where an accuracy axis ends: the next tenth of `full` (1.0, or 100 %) above the highest value. Small
    studies' curves (0.1-0.3) would hug the floor of a 0-to-full axis."""
    return min(full, (math.floor(highest / full * 10 + 1e-9) + 1) * full / 10)


def plot(names: list[str], runs: list[dict], path: str, envelope: bool) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ResultsError("--plot needs matplotlib (pip install matplotlib)") from None
    grid, curves = plot_curves(runs)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, run, curve in zip(names, runs, curves):
        drawn = ~np.isnan(curve)  # an adaptive run: at its reported radii only, as points joined by lines
        ax.plot(grid[drawn], curve[drawn], "o-" if "samples" in run else "-", markersize=3, label=name)
    if envelope:
        best = np.fmax.reduce(curves)
        ax.plot(grid[~np.isnan(best)], best[~np.isnan(best)], "k--", label="best of above")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, axis_top(np.nanmax(curves, initial=0.0), 1.0)))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


# ----------------------------------------------------------------------------------------------------
# Paired comparison (--compare): the images are the sample; two runs over the same images are paired by idx

def clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    """The two-sided Clopper-Pearson (1934) interval at `level` for a proportion from k of n: the one-sided bounds
    at (1 - level) / 2 each (smoothing's, which CERTIFY uses for pA). Exact: it covers the proportion with
    probability at least `level`, whatever the proportion and however small n."""
    from smoothing import lower_confidence_bound, upper_confidence_bound  # here only: smoothing needs torch
    alpha = (1 - level) / 2
    return lower_confidence_bound(k, n, alpha), upper_confidence_bound(k, n, alpha)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """The exact two-sided McNemar (1947) p-value: if A and B certify equally often, each discordant image (one run
    certifies it, the other does not) is A's with probability 1/2, so given their number only_a ~ Bin(only_a +
    only_b, 1/2): the two-sided binomial (sign) test. 1 when no image is discordant."""
    from smoothing import sign_test_pvalue  # here only: smoothing needs torch
    return sign_test_pvalue(only_a, only_b)


def tango_interval(only_a: int, only_b: int, n: int, level: float) -> tuple[float, float]:
    """Tango's (1998) score interval at `level` for the paired difference in certified accuracy B - A = P(only B) -
    P(only A) over n images: every delta whose score test is not rejected, |T(delta)| <= z_(1+level)/2, with
        T(delta) = (only_b - only_a - n delta) / sqrt(n (2 q + delta (1 - delta))),
    q the maximum-likelihood P(only A) given delta (a root of a quadratic). Unlike Wald's it stays in [-1, 1] and
    is not degenerate when a count is 0; its coverage stays close to `level` down to small counts (Fagerland,
    Lydersen and Laake 2014 recommend it). It excludes 0 exactly when McNemar's asymptotic test rejects."""
    z = NormalDist().inv_cdf((1 + level) / 2)

    def score(delta: float) -> float:
        linear = -only_a - only_b + (2 * n - only_b + only_a) * delta
        q = (math.sqrt(max(linear ** 2 + 8 * n * only_a * delta * (1 - delta), 0.0)) - linear) / (4 * n)
        excess, variance = only_b - only_a - n * delta, n * (2 * q + delta * (1 - delta))
        return excess / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, excess) if excess else 0.0

    def solve(target: float, low: float, high: float) -> float:  # T decreases in delta: bisection for T = target
        for _ in range(100):
            middle = (low + high) / 2
            low, high = (middle, high) if score(middle) > target else (low, middle)
        return (low + high) / 2

    estimate = (only_b - only_a) / n
    return (-1.0 if estimate == -1 else solve(z, -1.0, estimate)), (1.0 if estimate == 1 else solve(-z, estimate, 1.0))


def holm(p: list[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values: the i-th smallest of m (from i = 1) times m - i + 1, made
    non-decreasing in that order, at most 1. Rejecting where it is <= alpha keeps the chance of any false
    rejection among the m tests at most alpha, however the tests depend on each other."""
    adjusted, running = [1.0] * len(p), 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def comparison_radii(names: list[str], runs: list[dict], radii: list[float] | None = None) -> list[float]:
    """The radii to compare at: `radii`, else the paper's for the dataset (ImageNet's when a label is 10 or more:
    CIFAR-10 has ten classes); with adaptive runs, whose results exist only at the radii their plan reported, the
    radii every one of them reported. A radius an adaptive run did not report is refused."""
    adaptive = [(name, run) for name, run in zip(names, runs) if "samples" in run]
    for name, run in adaptive:
        if "reported" not in run:
            raise ResultsError(f"{name} is adaptive and has no .json: the radii its plan reported are unknown, so it cannot be compared")
    if radii is None and adaptive:
        radii = sorted(set.intersection(*(set(run["reported"].tolist()) for _, run in adaptive)))
    elif radii is None:
        radii = PAPER_RADII["imagenet" if max(run["label"].max() for run in runs) >= 10 else "cifar10"]
    for name, run in adaptive:
        if missing := [r for r, ok in zip(radii, reported(run, np.array(radii))) if not ok]:
            raise ResultsError(f"{name} is adaptive and reported radii {', '.join(f'{r:g}' for r in run['reported'])}: "
                               f"it has no result at {', '.join(f'{r:g}' for r in missing)}")
    if not radii:
        raise ResultsError("the adaptive runs reported no radius in common: give --radii")
    return list(radii)


def compare(names: list[str], runs: list[dict], radii: list[float] | None = None, level: float = 0.95, ci: bool = False) -> str:
    """Each run B against the first, A, paired over the same images, one row per (B, radius): the images only A,
    only B and both certify correctly, both certified accuracies (with `ci` their Clopper-Pearson intervals), B - A
    with Tango's interval, the exact McNemar p and Holm's adjusted p over every row (* where it is <= 1 - level).
    Runs over different images are refused."""
    if problem := different_images(names, runs, "a paired comparison needs the same images"):
        raise ResultsError(problem)
    radii, n = comparison_radii(names, runs, radii), len(runs[0]["idx"])
    rows = []
    for name, run in zip(names[1:], runs[1:]):
        for r in radii:
            a, b = certified(runs[0], r), certified(run, r)
            rows.append((name, r, int((a & ~b).sum()), int((b & ~a).sum()), int((a & b).sum()), int(a.sum()), int(b.sum())))
    p = [mcnemar_p(only_a, only_b) for _, _, only_a, only_b, *_ in rows]
    adjusted, percent = holm(p), f"{100 * level:g}%"
    pvalue = lambda x: f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"
    accuracy = lambda k: f"{100 * k / n:.1f}" + (" [{:.1f}, {:.1f}]".format(*(100 * x for x in clopper_pearson(k, n, level))) if ci else "")
    body = [["B", "radius", "images", "only A", "only B", "both", "A %", "B %", "B - A", f"{percent} CI", "p", "Holm p", ""]]
    for (name, r, only_a, only_b, both, k_a, k_b), p_row, holm_row in zip(rows, p, adjusted):
        low, high = tango_interval(only_a, only_b, n, level)
        body.append([name, f"{r:g}", str(n), str(only_a), str(only_b), str(both), accuracy(k_a), accuracy(k_b),
                     f"{100 * (k_b - k_a) / n:+.1f}", f"[{100 * low:+.1f}, {100 * high:+.1f}]", pvalue(p_row),
                     pvalue(holm_row), "*" if holm_row <= 1 - level else ""])
    widths = [max(len(line[i]) for line in body) for i in range(len(body[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in body]
    return "\n".join([
        f"A = {names[0]}; each run B against it over the same {n} images (certified correctly: correct and radius >= r)",
        f"B - A in points, {percent} CI: Tango's score interval{'; A % and B % with Clopper-Pearson intervals' if ci else ''}; "
        f"p: exact McNemar; Holm p: Holm over the {len(p)} p-values, * where <= {1 - level:.3g}"] + lines)


def radii_list(text: str) -> list[float] | None:
    """--radii: "paper" (None: comparison_radii's default) or comma-separated radii >= 0."""
    if text == "paper":
        return None
    try:
        radii = sorted({float(r) for r in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not radii separated by commas (e.g. 0,0.25,0.5)") from None
    if not all(math.isfinite(r) and r >= 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be finite and >= 0, got {text}")
    return radii


def confidence_level(text: str) -> float:
    try:
        level = float(text)
    except ValueError:
        level = math.nan
    if not 0 < level < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (e.g. 0.95), got {text}")
    return level


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="certified-accuracy report", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"report.py: error: {msg}")
    p.add_argument("tsv", nargs="+", help="certify.py outputs; each becomes one row")
    p.add_argument("--envelope", action="store_true", help="add the max over runs at each radius (best over sigma)")
    p.add_argument("--plot", default=None, help="write certified accuracy vs radius to this PNG")
    p.add_argument("--ci", action="store_true", help="each certified accuracy with its Clopper-Pearson interval over the "
                   "images (exact: it covers with probability >= --level)")
    p.add_argument("--compare", action="store_true", help="each run B against the first, A, paired over the same images "
                   "(refused otherwise), at each --radii r: images only A, only B and both certify correctly (correct and "
                   "radius >= r), B - A with Tango's score interval, the exact two-sided McNemar p-value (the binomial "
                   "test of only A against only B at 1/2) and Holm's adjusted p over every p-value printed")
    p.add_argument("--radii", type=radii_list, default="paper", help="--compare's radii, e.g. 0,0.5: 'paper' is the "
                   "paper's (CIFAR-10 0-1 by 0.25, ImageNet 0-2.5 by 0.5), or the radii every adaptive run reported")
    p.add_argument("--level", type=confidence_level, default=0.95, help="confidence level of the intervals; "
                   "--compare marks Holm p <= 1 - level")
    args = p.parse_args(argv)
    if args.compare and (len(args.tsv) < 2 or args.envelope):
        p.error("--compare needs two runs or more" if len(args.tsv) < 2 else "--compare and --envelope: choose one")
    if args.radii is not None and not args.compare:
        p.error("--radii chooses --compare's radii (the table shows 0, 0.25, ... up to the largest radius)")
    names = [os.path.splitext(os.path.basename(t))[0] for t in args.tsv]
    runs, seen = [read_tsv(t) for t in args.tsv], {}
    for k, (path, run) in enumerate(zip(args.tsv, runs)):
        if not len(run["radius"]):
            raise ResultsError(f"{path} has no results yet (only its header)")
        stat = os.stat(path)
        first = seen.setdefault((stat.st_dev, stat.st_ino), k)  # the same file, by any path
        if first != k:
            raise ResultsError(f"{path} is {args.tsv[first]} again: give each run once")
    if args.compare:
        print(compare(names, runs, args.radii, args.level, args.ci))
    else:
        print(table(names, runs, args.envelope, args.level if args.ci else None))
    if args.plot:
        plot(names, runs, args.plot, args.envelope)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    try:
        main()
    except ResultsError as e:
        sys.exit(f"report.py: error: {e}")
