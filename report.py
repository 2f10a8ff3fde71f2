"""Certified-accuracy tables and curves from certify.py's TSVs, as in the paper's Tables 1-2.

    python report.py out/certify/*.tsv                       # one row per run, side by side
    python report.py a.tsv b.tsv c.tsv --envelope            # plus "best over sigma": the max at each radius
    python report.py out/certify/*.tsv --plot curves.png     # certified accuracy vs radius (needs matplotlib)

Certified accuracy at radius r = the fraction of images that are classified correctly with certified
radius >= r (abstentions count as wrong); ACR = mean of radius * correct. The paper's Table 2 is the best
over its Table 9 grid (fine-tuning sigma x certification sigma): pass all nine runs with --envelope (runs
over other images, or one file twice, are refused: the best over them would mean nothing).

An adaptive run (certify.py --adaptive) shows only the radii its plan reported (its .json's `radii`; - in
the other columns), and its ACR is marked as truncated: it stops an image once it certifies the largest.

A run whose predictions fall on a few classes gets a note under the table: its certified accuracy is then
little more than the share of the test set those classes hold (a frozen near-zero head does this).
"""
import argparse
import os
import sys

import numpy as np

from results import ResultsError, read_tsv

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
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


def different_images(names: list[str], runs: list[dict]) -> str | None:
    """Why a best-over-runs row would mean nothing: runs over different test images (None when they agree)."""
    first = set(runs[0]["idx"].tolist())
    for name, run in zip(names[1:], runs[1:]):
        other = set(run["idx"].tolist())
        if other != first:
            return (f"{names[0]} and {name} cover different test images ({len(first)} and {len(other)}, {len(first ^ other)} "
                    "in only one): the best over them would mix test sets")
    return None


def table(names: list[str], runs: list[dict], envelope: bool = False) -> str:
    """One row per run (certified accuracy in % at each radius column, ACR, images); with `envelope` the best over
    the runs at each radius, refused for runs over different images. Columns a run did not report show -."""
    if envelope and (problem := different_images(names, runs)):
        raise ResultsError(problem)
    radii = radii_for(runs)
    width = max([12] + [len(n) for n in names] + ([len("best of above")] if envelope else []))
    cell = lambda a: f"{'-':>6s}" if a is None else f"{a:6.1f}"
    lines, columns = [f"{'run':{width}s} " + " ".join(f"{r:6.2f}" for r in radii) + "    ACR  images"], []
    for name, run in zip(names, runs):
        shown = reported(run, radii)
        columns.append([certified_accuracy(run["radius"], run["correct"], r) * 100 if ok else None
                        for r, ok in zip(radii, shown)])
        acr, mark = average_certified_radius(run["radius"], run["correct"]), "*" if "samples" in run else " "
        lines.append(f"{name:{width}s} " + " ".join(map(cell, columns[-1])) + f"  {acr:5.3f}{mark} {len(run['radius']):6d}")
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
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="certified-accuracy report", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"report.py: error: {msg}")
    p.add_argument("tsv", nargs="+", help="certify.py outputs; each becomes one row")
    p.add_argument("--envelope", action="store_true", help="add the max over runs at each radius (best over sigma)")
    p.add_argument("--plot", default=None, help="write certified accuracy vs radius to this PNG")
    args = p.parse_args(argv)
    names = [os.path.splitext(os.path.basename(t))[0] for t in args.tsv]
    runs, seen = [read_tsv(t) for t in args.tsv], {}
    for k, (path, run) in enumerate(zip(args.tsv, runs)):
        if not len(run["radius"]):
            raise ResultsError(f"{path} has no results yet (only its header)")
        stat = os.stat(path)
        first = seen.setdefault((stat.st_dev, stat.st_ino), k)  # the same file, by any path
        if first != k:
            raise ResultsError(f"{path} is {args.tsv[first]} again: give each run once")
    print(table(names, runs, args.envelope))
    if args.plot:
        plot(names, runs, args.plot, args.envelope)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    try:
        main()
    except ResultsError as e:
        sys.exit(f"report.py: error: {e}")
