"""Certified-accuracy tables and curves from certify.py's TSVs, as in the paper's Tables 1-2.

    python report.py out/certify/*.tsv                       # one row per run, side by side
    python report.py a.tsv b.tsv c.tsv --envelope            # plus "best over sigma": the max at each radius
    python report.py out/certify/*.tsv --plot curves.png     # certified accuracy vs radius (needs matplotlib)

Certified accuracy at radius r = the fraction of images that are classified correctly with certified
radius >= r (abstentions count as wrong); ACR = mean of radius * correct. The paper's Table 2 is the best
over its Table 9 grid (fine-tuning sigma x certification sigma): pass all nine runs with --envelope.

A run whose predictions fall on a few classes gets a note under the table: its certified accuracy is then
little more than the share of the test set those classes hold (a frozen near-zero head does this).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"  # Cohen et al.'s format, read by every paper in the field
ADAPTIVE_HEADER = HEADER + "\tsamples"  # certify.py --adaptive adds the estimation samples it drew
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


class ReportError(ValueError):
    pass


def _field(value: str, name: str) -> float:
    """One field, checked against what certify.py writes (a wrong value would silently change the table)."""
    real = name in ("radius", "time")
    try:
        number = float(value) if real else int(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not {'a number' if real else 'an integer'}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} is {value}")
    low = {"predict": -1, "samples": 1}.get(name, 0)
    if number < low or (name == "correct" and number > 1):
        raise ValueError(f"{name} {value} is out of range")
    return number


def check_rows(path: str, data: bytes, header: str | None = None) -> list[list[str]]:
    """The data rows of a certification TSV's bytes, after checking every line: the header (`header`, or
    either kind if None), the column count, numbers, ranges, correct == (predict == label), no repeated
    idx, and a newline at the end (a torn last line means a run stopped mid-write). Errors name the line."""
    if b"\0" in data:
        raise ReportError(f"{path} is a binary file, not a certification TSV")
    try:
        lines = data.decode().split("\n")
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not a text file, not a certification TSV") from None
    if lines[0] not in ((HEADER, ADAPTIVE_HEADER) if header is None else (header,)):
        expected = (header or HEADER).expandtabs(1)
        raise ReportError(f"{path} is not a certification TSV (header must be: {expected})")
    if lines[-1] != "":
        raise ReportError(f"{path}, line {len(lines)}: incomplete last line (a run stopped while writing it); "
                          f"re-run the same certify.py command to repair the file")
    names = lines[0].split("\t")
    rows, seen = [], {}
    for number, line in enumerate(lines[1:-1], start=2):
        fields = line.split("\t")
        if len(fields) != len(names):
            raise ReportError(f"{path}, line {number}: {len(fields)} columns, expected {len(names)}")
        try:
            values = dict(zip(names, (_field(v, name) for v, name in zip(fields, names))))
        except ValueError as e:
            raise ReportError(f"{path}, line {number}: {e}") from None
        if values["correct"] != (values["predict"] == values["label"]):
            raise ReportError(f"{path}, line {number}: correct is {fields[4]} but predict is {fields[2]} and label {fields[1]}")
        if values["idx"] in seen:
            raise ReportError(f"{path}, line {number}: image {fields[0]} again (first on line {seen[values['idx']]})")
        seen[values["idx"]] = number
        rows.append(fields)
    return rows


def check_radii(path: str, radius: np.ndarray) -> None:
    """With certify.py's sidecar <tsv>.json (sigma, n, alpha), refuse radii that no run of that configuration
    can certify: a file edited by hand, or from another configuration."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
        from smoothing import largest_radius  # here only: the tables need numpy alone, smoothing needs torch
        bound = largest_radius(int(meta["n"]), float(meta["alpha"]), float(meta["sigma"]))  # 0: abstentions only
    except (OSError, ValueError, KeyError, TypeError):
        return  # no (usable) sidecar: a TSV from other code; the table's columns stay bounded anyway
    if len(radius) and radius.max() > bound + 1e-4:
        line = int(radius.argmax()) + 2
        raise ReportError(f"{path}, line {line}: radius {radius.max():g} is more than n = {meta['n']} samples can certify "
                          f"at sigma {meta['sigma']:g} and alpha {meta['alpha']:g} (at most {bound:.4f})")


def read_tsv(path: str) -> dict[str, np.ndarray]:
    """label, predict, radius, correct, time (and samples for adaptive runs) of a checked certification TSV."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise ReportError(f"cannot read {path}") from None
    rows = check_rows(path, data)
    cols = np.array(rows, dtype=float).reshape(len(rows), -1).T if rows else np.zeros((7, 0))
    run = dict(label=cols[1], predict=cols[2], radius=cols[3], correct=cols[4], time=cols[5])
    if data.startswith(ADAPTIVE_HEADER.encode()):
        run["samples"] = cols[6]
    check_radii(path, run["radius"])
    return run


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


def table(names: list[str], runs: list[dict], envelope: bool = False) -> str:
    radii = radii_for(runs)
    width = max([12] + [len(n) for n in names] + ([len("best of above")] if envelope else []))
    lines = [f"{'run':{width}s} " + " ".join(f"{r:6.2f}" for r in radii) + "    ACR  images"]
    for name, run in zip(names, runs):
        acc = [certified_accuracy(run["radius"], run["correct"], r) * 100 for r in radii]
        acr = average_certified_radius(run["radius"], run["correct"])
        lines.append(f"{name:{width}s} " + " ".join(f"{a:6.1f}" for a in acc) + f"  {acr:5.3f}  {len(run['radius']):6d}")
    if envelope:
        best = [max(certified_accuracy(run["radius"], run["correct"], r) for run in runs) * 100 for r in radii]
        lines.append(f"{'best of above':{width}s} " + " ".join(f"{a:6.1f}" for a in best) + "      -")
    lines += [note for note in (collapse_note(name, run) for name, run in zip(names, runs)) if note]
    return "\n".join(lines)


def summary(path: str) -> str:
    run = read_tsv(path)
    samples = f", {run['samples'].mean():,.0f} estimation samples per image" if "samples" in run and len(run["samples"]) else ""
    seconds = run["time"].mean() if len(run["time"]) else 0.0
    return f"{len(run['radius'])} images, {seconds:.2f} s per image{samples}\n" + table([os.path.basename(path)], [run])


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
    p = argparse.ArgumentParser(description="certified-accuracy report", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"report.py: error: {msg}")
    p.add_argument("tsv", nargs="+", help="certify.py outputs; each becomes one row")
    p.add_argument("--envelope", action="store_true", help="add the max over runs at each radius (best over sigma)")
    p.add_argument("--plot", default=None, help="write certified accuracy vs radius to this PNG")
    args = p.parse_args(argv)
    names = [os.path.splitext(os.path.basename(t))[0] for t in args.tsv]
    runs = [read_tsv(t) for t in args.tsv]
    for path, run in zip(args.tsv, runs):
        if not len(run["radius"]):
            raise ReportError(f"{path} has no results yet (only its header)")
    print(table(names, runs, args.envelope))
    if args.plot:
        plot(names, runs, args.plot, args.envelope)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    try:
        main()
    except ReportError as e:
        sys.exit(f"report.py: error: {e}")
