"""Certified-accuracy tables and curves from certify.py's TSVs, as in the paper's Tables 1-2.

    python report.py out/certify/*.tsv                       # one row per run, side by side
    python report.py a.tsv b.tsv c.tsv --envelope            # plus "best over sigma": the max at each radius
    python report.py out/certify/*.tsv --plot curves.png     # certified accuracy vs radius (needs matplotlib)

Certified accuracy at radius r = the fraction of images that are classified correctly with certified
radius >= r (abstentions count as wrong); ACR = mean of radius * correct.
"""
import argparse
import os
import sys

import numpy as np

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"  # Cohen et al.'s format, read by every paper in the field
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


class ReportError(ValueError):
    pass


def read_tsv(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path) as f:
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError:
        raise ReportError(f"cannot read {path}") from None
    if not rows or "\t".join(rows[0]) != HEADER:
        raise ReportError(f"{path} is not a certification TSV (header must be: {HEADER.expandtabs(1)})")
    cols = np.array(rows[1:], dtype=float).reshape(-1, 6).T
    return dict(radius=cols[3], correct=cols[4], time=cols[5])


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, r: float) -> float:
    """Fraction of images classified correctly with certified radius >= r."""
    return float(np.mean((correct == 1) & (radius >= r))) if len(radius) else 0.0


def average_certified_radius(radius: np.ndarray, correct: np.ndarray) -> float:
    return float(np.mean(radius * correct)) if len(radius) else 0.0


def radii_for(runs: list[dict]) -> np.ndarray:
    """0, 0.25, ... up to the largest certified radius of any run (at least 1.0)."""
    largest = max([1.0] + [float(r["radius"].max(initial=0)) for r in runs])
    return np.arange(0, largest + 1e-9, 0.25)


def table(names: list[str], runs: list[dict], envelope: bool = False) -> str:
    radii = radii_for(runs)
    width = max([12] + [len(n) for n in names])
    lines = [f"{'run':{width}s} " + " ".join(f"{r:6.2f}" for r in radii) + "    ACR  images"]
    for name, run in zip(names, runs):
        acc = [certified_accuracy(run["radius"], run["correct"], r) * 100 for r in radii]
        acr = average_certified_radius(run["radius"], run["correct"])
        lines.append(f"{name:{width}s} " + " ".join(f"{a:6.1f}" for a in acc) + f"  {acr:5.3f}  {len(run['radius']):6d}")
    if envelope:
        best = [max(certified_accuracy(run["radius"], run["correct"], r) for run in runs) * 100 for r in radii]
        lines.append(f"{'best of above':{width}s} " + " ".join(f"{a:6.1f}" for a in best) + "      -")
    return "\n".join(lines)


def summary(path: str) -> str:
    run = read_tsv(path)
    return f"{len(run['radius'])} images, {run['time'].mean():.2f} s per image\n" + table([os.path.basename(path)], [run])


def plot(names: list[str], runs: list[dict], path: str, envelope: bool) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("--plot needs matplotlib (pip install matplotlib)") from None
    grid = np.linspace(0, radii_for(runs)[-1], 200)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    curves = []
    for name, run in zip(names, runs):
        curves.append([certified_accuracy(run["radius"], run["correct"], r) for r in grid])
        ax.plot(grid, curves[-1], label=name)
    if envelope:
        ax.plot(grid, np.max(curves, axis=0), "k--", label="best of above")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="certified-accuracy report")
    p.error = lambda msg: sys.exit(f"report.py: error: {msg}")
    p.add_argument("tsv", nargs="+", help="certify.py outputs; each becomes one row")
    p.add_argument("--envelope", action="store_true", help="add the max over runs at each radius (best over sigma)")
    p.add_argument("--plot", default=None, help="write certified accuracy vs radius to this PNG")
    args = p.parse_args(argv)
    names = [os.path.splitext(os.path.basename(t))[0] for t in args.tsv]
    runs = [read_tsv(t) for t in args.tsv]
    print(table(names, runs, args.envelope))
    if args.plot:
        plot(names, runs, args.plot, args.envelope)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    try:
        main()
    except ReportError as e:
        sys.exit(f"report.py: error: {e}")
