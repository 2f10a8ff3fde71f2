"""Certification results files: one owner for writing and reading them.

A run's results are a TSV in Cohen et al.'s format, one line per image (`idx label predict radius correct
time`, adaptive runs add `samples`), with a sidecar <tsv>.json holding the run's configuration. Writing is
append-only, whole lines only, by one process at a time (a lock beside the file), resumable after a kill, and
never mixes configurations in one file. Reading checks every line, so a wrong value cannot silently change a
table. Radii are written rounded *down* to 4 decimals: the file never claims more than was certified.
"""
import fcntl
import json
import math
import os
import signal
from decimal import ROUND_FLOOR, Decimal

import numpy as np

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"  # Cohen et al.'s format, read by every paper in the field
ADAPTIVE_HEADER = HEADER + "\tsamples"  # certify.py --adaptive adds the estimation samples it drew
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # held back while lines are written, so a stop never tears one


class ResultsError(ValueError):
    """A results file that cannot be read, written or continued: the scripts print it as one line."""


def floor_radius(radius: float) -> str:
    """The radius as the TSV holds it: rounded *down* to 4 decimals, so the written certificate is never
    larger than the computed one (0.24996 is 0.2499, not 0.2500, which would count at r = 0.25)."""
    return str(Decimal(radius).quantize(Decimal("0.0001"), rounding=ROUND_FLOOR))


def row(idx: int, label: int, prediction: int, radius: float, seconds: float, samples: int | None = None) -> str:
    """One TSV line (without its newline); `samples` only for adaptive runs."""
    line = f"{idx}\t{label}\t{prediction}\t{floor_radius(radius)}\t{int(prediction == label)}\t{seconds:.3f}"
    return line if samples is None else f"{line}\t{samples}"


# ----------------------------------------------------------------------------------------------------
# Reading: every line checked against what certify.py writes

def _field(value: str, name: str) -> float:
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
        raise ResultsError(f"{path} is a binary file, not a certification TSV")
    try:
        lines = data.decode().split("\n")
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a text file, not a certification TSV") from None
    if lines[0] not in ((HEADER, ADAPTIVE_HEADER) if header is None else (header,)):
        expected = (header or HEADER).expandtabs(1)
        raise ResultsError(f"{path} is not a certification TSV (header must be: {expected})")
    if lines[-1] != "":
        raise ResultsError(f"{path}, line {len(lines)}: incomplete last line (a run stopped while writing it); "
                           f"re-run the same certify.py command to repair the file")
    names = lines[0].split("\t")
    rows, seen = [], {}
    for number, line in enumerate(lines[1:-1], start=2):
        fields = line.split("\t")
        if len(fields) != len(names):
            raise ResultsError(f"{path}, line {number}: {len(fields)} columns, expected {len(names)}")
        try:
            values = dict(zip(names, (_field(v, name) for v, name in zip(fields, names))))
        except ValueError as e:
            raise ResultsError(f"{path}, line {number}: {e}") from None
        if values["correct"] != (values["predict"] == values["label"]):
            raise ResultsError(f"{path}, line {number}: correct is {fields[4]} but predict is {fields[2]} and label {fields[1]}")
        if values["idx"] in seen:
            raise ResultsError(f"{path}, line {number}: image {fields[0]} again (first on line {seen[values['idx']]})")
        seen[values["idx"]] = number
        rows.append(fields)
    return rows


def read_config(path: str) -> dict | None:
    """The sidecar <tsv>.json of the run that wrote `path`, or None if there is none (a TSV from other code)."""
    try:
        with open(path + ".json") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_radii(path: str, radius: np.ndarray) -> None:
    """With the sidecar's sigma, n and alpha, refuse radii that no run of that configuration can certify: a
    file edited by hand, or from another configuration."""
    meta = read_config(path)
    if meta is None:
        return  # no sidecar (and no torch to import for it)
    try:
        from smoothing import largest_radius  # here only: reading needs numpy alone, smoothing needs torch
        bound = largest_radius(int(meta["n"]), float(meta["alpha"]), float(meta["sigma"]))  # 0: abstentions only
    except (ValueError, KeyError, TypeError):
        return  # no (usable) sidecar: the table's columns stay bounded anyway
    if len(radius) and radius.max() > bound + 1e-4:
        line = int(radius.argmax()) + 2
        raise ResultsError(f"{path}, line {line}: radius {radius.max():g} is more than n = {meta['n']} samples can certify "
                           f"at sigma {meta['sigma']:g} and alpha {meta['alpha']:g} (at most {bound:.4f})")


def read_tsv(path: str) -> dict[str, np.ndarray]:
    """idx, label, predict, radius, correct, time of a checked certification TSV; adaptive runs add samples, and
    `reported`, the radii their plan reported, from the sidecar (left out without a usable one)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise ResultsError(f"cannot read {path}") from None
    rows = check_rows(path, data)
    cols = np.array(rows, dtype=float).reshape(len(rows), -1).T if rows else np.zeros((7, 0))
    run = dict(idx=cols[0], label=cols[1], predict=cols[2], radius=cols[3], correct=cols[4], time=cols[5])
    if data.startswith(ADAPTIVE_HEADER.encode()):
        run["samples"] = cols[6]
        meta = read_config(path) or {}
        radii = meta.get("radii") if meta.get("mode") == "certify-adaptive" else None
        if isinstance(radii, list) and radii and all(isinstance(r, (int, float)) and math.isfinite(r) for r in radii):
            run["reported"] = np.array(radii, dtype=float)
    check_radii(path, run["radius"])
    return run


# ----------------------------------------------------------------------------------------------------
# Writing: one writer, append-only, whole lines only, resumable, never mixed across configurations

def lock_results(path: str):
    """Take the one-writer lock: an exclusive flock on `path`.lock. The kernel drops it when the process
    dies, even by SIGKILL, so a killed run never leaves it stuck. Returns the lock file: closing it unlocks."""
    if os.path.isdir(path):
        raise ResultsError(f"--out {path} is a directory; give a file name for the TSV")
    folder = os.path.dirname(os.path.abspath(path))
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ResultsError(f"cannot write {path}: {parent} is not a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as e:
        raise ResultsError(f"cannot write {path}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ResultsError(f"{path} is being written by another certify.py run; wait for it or choose another --out") from None
    return lock


def has_rows(path: str) -> bool:
    """Whether `path` holds anything but nothing or a certification header (with perhaps a torn first row)."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    first, _, rest = data.partition(b"\n")
    return not (data == b"" or (first.decode(errors="replace") in (HEADER, ADAPTIVE_HEADER) and b"\n" not in rest))


def read_done(path: str, header: str) -> set[int]:
    """Indices of the images already certified. A torn last line (a kill mid-write) is cut off the file; any
    other malformed line is refused, leaving the file as it is."""
    with open(path, "rb") as f:
        data = f.read()
    whole = data[: data.rfind(b"\n") + 1]
    try:
        rows = check_rows(path, whole, header)
    except ResultsError as e:
        raise ResultsError(f"{e}; not appending to it") from None
    if len(whole) != len(data):
        with open(path, "rb+") as f:
            f.truncate(len(whole))
    return {int(row[0]) for row in rows}


class Results:
    """One TSV and its sidecar .json of the configuration; take `lock_results(path)` first. Nothing is written
    before the first row: a run that stops (or is refused) before that leaves only the empty lock file, and a
    file without rows is simply started afresh -- there are no results in it to mix."""

    def __init__(self, path: str, config: dict, header: str):
        self.path, self.config, self.header, self.meta = path, config, header, path + ".json"
        self.fresh = not has_rows(path)
        self.done = set()
        if not self.fresh:
            previous = read_config(path)
            if previous is None:
                raise ResultsError(f"{path} has results but no readable {self.meta}; refusing to mix results")
            if previous != config:
                diff = ", ".join(k for k in config if previous.get(k) != config[k])
                raise ResultsError(f"{path} holds results of a different configuration ({diff}); choose another --out")
            self.done = read_done(path, header)

    def append(self, rows: list[str]) -> None:
        """Append whole lines (the first time: the .json, then a new file with the header). SIGINT/SIGTERM are
        held back until the lines are on disk, so a stop never tears one (a SIGKILL can; read_done cuts that
        torn line on the next run)."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.fresh:
                with open(self.meta, "w") as f:
                    json.dump(self.config, f, indent=1)
            with open(self.path, "w" if self.fresh else "a") as f:
                f.write((self.header + "\n" if self.fresh else "") + "".join(row + "\n" for row in rows))
                f.flush()
                os.fsync(f.fileno())
            self.fresh = False
        except OSError as e:
            raise ResultsError(f"cannot write {self.path}: {e.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
