"""report.py: tables and the best-over-sigma envelope against hand-counted values, and every malformed file refused
in one line that names the file and the line."""
import subprocess
import sys

import numpy as np
import pytest

import report
import results
import smoothing
from conftest import ROOT

ROWS = "0\t1\t1\t0.3\t1\t1.0\n1\t2\t2\t0.8\t1\t1.0\n2\t0\t-1\t0.0\t0\t1.0\n3\t0\t1\t0.9\t0\t1.0\n"


@pytest.mark.quick
def test_report_table_and_envelope(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text(results.HEADER + "\n" + ROWS)
    b.write_text(results.HEADER + "\n0\t1\t1\t1.3\t1\t1.0\n1\t2\t0\t0.8\t0\t1.0\n2\t0\t0\t0.1\t1\t1.0\n3\t0\t1\t0.9\t0\t1.0\n")
    rows = results.read_tsv(str(a))
    assert [report.certified_accuracy(rows["radius"], rows["correct"], r) for r in (0, 0.25, 0.5, 1.0)] == [0.5, 0.5, 0.25, 0.0]
    assert report.average_certified_radius(rows["radius"], rows["correct"]) == pytest.approx(0.275)
    lines = report.table(["a", "b"], [rows, results.read_tsv(str(b))], envelope=True).splitlines()
    # radii 0 .. 1.25 (the largest certified radius is 1.3); a: 50 50 25 25 0 0, b: 50 25 25 25 25 25
    assert lines[0].split()[1:] == ["0.00", "0.25", "0.50", "0.75", "1.00", "1.25", "ACR", "images"]
    assert lines[1].split()[1:] == ["50.0", "50.0", "25.0", "25.0", "0.0", "0.0", "0.275", "4"]
    assert lines[2].split()[1:7] == ["50.0", "25.0", "25.0", "25.0", "25.0", "25.0"]
    assert lines[3].split()[3:9] == ["50.0", "50.0", "25.0", "25.0", "25.0", "25.0"]  # best of above


def column_ends(line: str) -> list[int]:
    """Where each whitespace-separated field of a line ends."""
    ends, inside = [], False
    for i, ch in enumerate(line + " "):
        if inside and ch == " ":
            ends.append(i)
        inside = ch != " "
    return ends


@pytest.mark.parametrize("names", [["a", "b"], ["a_long_run_name_sigma0.25", "b"]])
def test_envelope_row_lines_up_with_the_header(names):
    """The paper's headline row: each number right under its radius (it was one column right with short names)."""
    run = dict(idx=np.array([0.0, 1.0]), label=np.array([1.0, 2.0]), predict=np.array([1.0, 2.0]), radius=np.array([0.3, 0.8]),
               correct=np.array([1.0, 1.0]))
    lines = report.table(names, [run, run], envelope=True).splitlines()
    radii_ends = column_ends(lines[0])[1:7]  # after "run": 0.00 0.25 0.50 0.75 1.00 (and ACR)
    for line in lines[1:]:
        label_words = 3 if line.startswith("best of above") else 1
        assert column_ends(line)[label_words:label_words + 5] == radii_ends[:5], f"\n{lines[0]}\n{line}"


@pytest.mark.quick
def test_reads_fixed_and_adaptive_files(tmp_path):
    fixed, adaptive = tmp_path / "f.tsv", tmp_path / "a.tsv"
    fixed.write_text(results.HEADER + "\n" + ROWS)
    adaptive.write_text(results.ADAPTIVE_HEADER + "\n" + "".join(r + "\t1000\n" for r in ROWS.splitlines()[:2]) + "2\t0\t-1\t0.0\t0\t1.0\t100000\n")
    assert "samples" not in results.read_tsv(str(fixed))
    run = results.read_tsv(str(adaptive))
    assert list(run["samples"]) == [1000, 1000, 100000] and list(run["radius"]) == [0.3, 0.8, 0.0]
    assert "3 images, 1.00 s per image, 34,000 estimation samples per image" in report.summary(str(adaptive))


GOOD = results.HEADER + "\n" + ROWS


@pytest.mark.quick
@pytest.mark.parametrize("text,problem", [
    (GOOD + "4\t1\tx\t0.5\t0\t1.0\n", "line 6: predict 'x' is not an integer"),
    (GOOD + "4\t1\t1\t0.5\n", "line 6: 4 columns, expected 6"),
    (GOOD + "4\t1\t1\t0.5\t1\n", "line 6: 5 columns, expected 6"),
    (GOOD + "4\t1\t1\t0.5\t1\t1.0\t300\n", "line 6: 7 columns, expected 6"),
    (GOOD + "4\t1\t1\t0.5", "line 6: incomplete last line"),
    (GOOD + "1\t2\t2\t0.8\t1\t1.0\n", "line 6: image 1 again (first on line 3)"),
    (GOOD + "4\t1\t1\tnan\t1\t1.0\n", "line 6: radius is nan"),
    (GOOD + "4\t1\t1\tinf\t1\t1.0\n", "line 6: radius is inf"),
    (GOOD + "4\t1\t1\t-5\t1\t1.0\n", "line 6: radius -5 is out of range"),
    (GOOD + "4\t1\t1\t0.5\t7\t1.0\n", "line 6: correct 7 is out of range"),
    (GOOD + "4\t1\t-2\t0.5\t0\t1.0\n", "line 6: predict -2 is out of range"),
    (GOOD + "4\t1\t2\t0.5\t1\t1.0\n", "line 6: correct is 1 but predict is 2 and label 1"),
    (GOOD + "\n", "line 6: 1 columns, expected 6"),
    (results.ADAPTIVE_HEADER + "\n0\t1\t1\t0.3\t1\t1.0\t0\n", "line 2: samples 0 is out of range"),
    ("hello\n", "is not a certification TSV"),
])
def test_malformed_files_are_refused_naming_file_and_line(tmp_path, text, problem):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(results.ResultsError, match=f"{path}"):
        results.read_tsv(str(path))
    with pytest.raises(results.ResultsError) as error:
        results.read_tsv(str(path))
    assert problem in str(error.value)


@pytest.mark.parametrize("data,problem", [(bytes(range(256)) * 4, "is a binary file"), (b"\xff\xfe" + GOOD.encode(), "is not a text file"),
                                          ((GOOD + "4\t1\t1\t0.5").encode(), "line 6: incomplete last line")])
def test_the_command_line_says_one_line_and_exits_non_zero(tmp_path, data, problem):
    path = tmp_path / "bad.tsv"
    path.write_bytes(data)
    result = subprocess.run([sys.executable, "report.py", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr, result.stderr


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    tsv = tmp_path / "a.tsv"
    tsv.write_text(results.HEADER + "\n0\t1\t1\t0.3\t1\t1.0\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(results.ResultsError, match="--plot needs matplotlib"):
        report.main([str(tsv), "--plot", str(tmp_path / "p.png")])
    result = subprocess.run([sys.executable, "report.py", str(tmp_path / "missing.tsv")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.strip() == f"report.py: error: cannot read {tmp_path / 'missing.tsv'}"


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, "report.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    options = result.stdout.split("options:")[1].split("\n  -")[2:]  # after -h
    assert len(options) == 6 and all("(default:" in " ".join(o.split()) for o in options), result.stdout


# ----------------------------------------------------------------------------------------------------
# The paper's Table 2 is the best over the 3 x 3 grid of its Table 9 (fine-tuning sigma x certification sigma)

TABLE2_CIFAR = (83.6, 73.4, 61.4, 48.0, 39.2)  # rRCM-B, r = 0, 0.25, 0.5, 0.75, 1.0
# Table 9 itself could not be retrieved here: the grid below holds Table 2's numbers in the cells the paper
# attributes them to (r = 0.75 from fine-tuned 0.5 / certified 0.25, r = 1.0 from fine-tuned 1.0 / certified
# 0.5; r <= 0.5 from 0.25 / 0.25) and placeholder curves below the envelope everywhere else, so that no single
# run holds the best row and each maximum sits in a different file.
GRID = {  # (fine-tuning sigma, certification sigma): certified accuracy (%) at r = 0, 0.25, 0.5, 0.75, 1.0
    (0.25, 0.25): (83.6, 73.4, 61.4, 45.0, 0.0), (0.25, 0.5): (70.0, 60.0, 50.0, 40.0, 30.0),
    (0.25, 1.0): (40.0, 35.0, 30.0, 25.0, 20.0), (0.5, 0.25): (80.0, 70.0, 58.0, 48.0, 0.0),
    (0.5, 0.5): (75.0, 66.0, 56.0, 46.0, 36.0), (0.5, 1.0): (50.0, 45.0, 40.0, 35.0, 30.0),
    (1.0, 0.25): (70.0, 60.0, 50.0, 40.0, 0.0), (1.0, 0.5): (60.0, 55.0, 50.0, 45.0, 39.2),
    (1.0, 1.0): (50.0, 45.0, 40.0, 35.0, 32.0),
}


def write_run(path, accuracy, sigma, images=500):
    """A TSV whose certified accuracy at r = 0, 0.25, ..., 1.0 is `accuracy` (%), with certify.py's sidecar:
    each correct image sits just above the largest radius it is counted at, within what n = 100,000 samples
    can certify at `sigma`."""
    counts = [round(a * images / 100) for a in accuracy] + [0]
    radii = []
    for k in range(5):
        radii += [min(0.25 * k + 0.01, smoothing.largest_radius(100_000, 0.001, sigma))] * (counts[k] - counts[k + 1])
    rows = [f"{i}\t{i % 10}\t{i % 10}\t{r:.4f}\t1\t1.0" for i, r in enumerate(radii)]
    rows += [f"{i}\t{i % 10}\t-1\t0.0\t0\t1.0" for i in range(len(radii), images)]
    path.write_text(results.HEADER + "\n" + "".join(row + "\n" for row in rows))
    (path.parent / (path.name + ".json")).write_text(f'{{"sigma": {sigma}, "n": 100000, "alpha": 0.001}}')


def test_envelope_over_the_grid_gives_table_2(tmp_path):
    paths = []
    for (tune, cert), accuracy in GRID.items():
        paths.append(tmp_path / f"ft{tune}_cert{cert}.tsv")
        write_run(paths[-1], accuracy, cert)
    result = subprocess.run([sys.executable, "report.py", *map(str, paths), "--envelope"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[1:6] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    for line, accuracy in zip(lines[1:10], GRID.values()):
        assert [float(v) for v in line.split()[1:6]] == list(accuracy), line
    best = lines[10].split()
    assert best[:3] == ["best", "of", "above"] and [float(v) for v in best[3:8]] == list(TABLE2_CIFAR)


# ----------------------------------------------------------------------------------------------------
# A collapsed classifier: its table is the class prior, not robustness

def collapsed_run(path, predictions, images=100):
    """`predictions` lists (class, count) pairs; the other images abstain. Labels cycle over 10 classes."""
    predicted = [c for c, k in predictions for _ in range(k)]
    rows = []
    for i in range(images):
        label, guess = i % 10, predicted[i] if i < len(predicted) else -1
        rows.append(f"{i}\t{label}\t{guess}\t{0.3 if guess == label else 0.0}\t{int(guess == label)}\t1.0\n")
    path.write_text(results.HEADER + "\n" + "".join(rows))


def test_a_collapsed_run_is_named_beside_the_table(tmp_path):
    """The tutorial's frozen-head run: 59 images predicted 7, 39 predicted 8 (of 100, labels spread over 10
    classes): two classes cover the predictions, the labels need nine. A run using all ten is not flagged, nor
    one that uses six of them (above half of the nine the labels need)."""
    collapsed_run(tmp_path / "frozen.tsv", [(7, 59), (8, 39)])
    collapsed_run(tmp_path / "healthy.tsv", [(c, 10) for c in range(10)])
    collapsed_run(tmp_path / "weak.tsv", [(c, 15) for c in range(6)] + [(6, 5), (7, 5)])
    out = subprocess.run([sys.executable, "report.py", *(str(tmp_path / f) for f in ("frozen.tsv", "healthy.tsv", "weak.tsv"))],
                         capture_output=True, text=True, cwd=ROOT).stdout
    notes = [line for line in out.splitlines() if "class prior" in line]
    assert notes == ["frozen: 98 of 100 predictions are classes 7 and 8: the table is close to the class prior "
                     "(the labels need 9 classes to cover 90% of the images)"], out
    collapsed_run(tmp_path / "one.tsv", [(3, 100)])
    assert "100 of 100 predictions are class 3:" in report.table(["one"], [results.read_tsv(str(tmp_path / "one.tsv"))])


# ----------------------------------------------------------------------------------------------------
# Files that would give a meaningless or unbounded table

def test_a_header_only_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text(results.HEADER + "\n")
    result = subprocess.run([sys.executable, "report.py", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.strip() == f"report.py: error: {path} has no results yet (only its header)"


def test_radius_columns_stay_bounded_and_the_sidecar_bounds_radii(tmp_path):
    """A radius of 99999 made a 400,000-character line. Without a sidecar it now counts in the last column
    (4.00); with certify.py's sidecar (sigma 0.25, n = 100,000, alpha = 0.001: at most 0.9529) it is refused."""
    path = tmp_path / "huge.tsv"
    path.write_text(results.HEADER + "\n0\t1\t1\t99999\t1\t1.0\n1\t2\t2\t0.3\t1\t1.0\n")
    result = subprocess.run([sys.executable, "report.py", str(path)], capture_output=True, text=True, cwd=ROOT)
    header, row = result.stdout.splitlines()
    assert result.returncode == 0 and header.split()[-3] == "4.00" and len(header) < 200
    assert row.split()[1:4] == ["100.0", "100.0", "50.0"] and row.split()[-3] == "50.0"  # r >= 4: the huge one
    (tmp_path / "huge.tsv.json").write_text('{"sigma": 0.25, "n": 100000, "alpha": 0.001}')
    result = subprocess.run([sys.executable, "report.py", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.strip() == (
        f"report.py: error: {path}, line 2: radius 99999 is more than n = 100000 samples can certify at sigma 0.25 "
        "and alpha 0.001 (at most 0.9529)")


def test_abstentions_pass_the_sidecar_bound_even_where_n_certifies_nothing(tmp_path):
    """With n = 2 no radius can be certified (alpha^(1/2) = 0.032 < 1/2: the bound is negative), but the
    abstentions such a run writes (radius 0) are valid rows."""
    path = tmp_path / "small.tsv"
    path.write_text(results.HEADER + "\n0\t1\t-1\t0.0000\t0\t1.0\n")
    (tmp_path / "small.tsv.json").write_text('{"sigma": 0.25, "n": 2, "alpha": 0.001}')
    assert results.read_tsv(str(path))["radius"].tolist() == [0.0]
    path.write_text(results.HEADER + "\n0\t1\t1\t0.0010\t1\t1.0\n")
    with pytest.raises(results.ResultsError, match="at most 0.0000"):
        results.read_tsv(str(path))


# ----------------------------------------------------------------------------------------------------
# The best over runs is over one test set; adaptive runs show only the radii their plan reported

def test_envelope_refuses_runs_over_other_images_or_the_same_file_twice(tmp_path):
    """The best-over-sigma row of runs over different images (here one with an image more) mixes test sets, and a
    file given twice -- by the same name or another path to it -- counts one run as two: both refused in one line."""
    a, b, c = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    a.write_text(GOOD)
    b.write_text(GOOD + "4\t1\t1\t0.5\t1\t1.0\n")
    c.write_text(GOOD.replace("\n3\t", "\n7\t"))
    (tmp_path / "link.tsv").symlink_to(a)
    for argv, problem in (([a, b], "a and b cover different test images (4 and 5, 1 in only one): the best over them would mix test sets"),
                          ([a, c], "a and c cover different test images (4 and 4, 2 in only one)"),
                          ([a, b, a], f"{a} is {a} again: give each run once"),
                          ([a, tmp_path / "link.tsv"], f"{tmp_path / 'link.tsv'} is {a} again: give each run once")):
        with pytest.raises(results.ResultsError) as refused:
            report.main([*map(str, argv), "--envelope"])
        assert str(refused.value).startswith(problem), str(refused.value)
    result = subprocess.run([sys.executable, "report.py", str(a), str(b), "--envelope"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.startswith("report.py: error: a and b cover") and len(result.stderr.splitlines()) == 1
    assert "best of above" in report.table(["a", "a2"], [results.read_tsv(str(a))] * 2, envelope=True)
    assert "best of above" not in report.table(["a", "b"], [results.read_tsv(str(a)), results.read_tsv(str(b))])  # no envelope: fine


def adaptive_pair(tmp_path, sidecar=True):
    """The issue's case at sigma 1.0: a fixed-n run, and an adaptive run of the same images whose plan reported
    0, 0.25, ..., 1.0 -- its images stop once they certify 1.0, so above it (and in its ACR) it shows far less."""
    fixed, adaptive = tmp_path / "fixed.tsv", tmp_path / "adaptive.tsv"
    radii = [1.9, 1.6, 1.3, 0.9, 0.0]
    fixed.write_text(results.HEADER + "\n" + "".join(f"{i}\t1\t{1 if r else -1}\t{r}\t{int(r > 0)}\t1.0\n" for i, r in enumerate(radii)))
    adaptive.write_text(results.ADAPTIVE_HEADER + "\n" + "".join(
        f"{i}\t1\t{1 if r else -1}\t{min(r, 1.02)}\t{int(r > 0)}\t1.0\t{800 if r > 1 else 100000}\n" for i, r in enumerate(radii)))
    if sidecar:
        (tmp_path / "adaptive.tsv.json").write_text('{"mode": "certify-adaptive", "sigma": 1.0, "n": 100000, "alpha": 0.001, '
                                                   '"radii": [0.0, 0.25, 0.5, 0.75, 1.0]}')
    return [results.read_tsv(str(fixed)), results.read_tsv(str(adaptive))]


def test_an_adaptive_run_shows_only_the_radii_its_plan_reported(tmp_path):
    """Columns above 1.0 show - for the adaptive run (not 0.0, which read like a result), the best-of-above row
    takes the fixed run's there, the adaptive ACR carries a mark and a note says it is truncated."""
    lines = report.table(["fixed", "adaptive"], adaptive_pair(tmp_path), envelope=True).splitlines()
    assert lines[0].split()[1:9] == ["0.00", "0.25", "0.50", "0.75", "1.00", "1.25", "1.50", "1.75"]
    assert lines[1].split()[1:] == ["80.0", "80.0", "80.0", "80.0", "60.0", "60.0", "40.0", "20.0", "1.140", "5"]
    assert lines[2].split()[1:] == ["80.0", "80.0", "80.0", "80.0", "60.0", "-", "-", "-", "0.792*", "5"]
    assert lines[3].split()[3:] == ["80.0", "80.0", "80.0", "80.0", "60.0", "60.0", "40.0", "20.0", "-"]
    assert lines[4] == ("* adaptive: adaptive, reporting radii 0, 0.25, 0.5, 0.75, 1: an image stops once it certifies 1, so its "
                        "ACR is truncated (below CERTIFY's); other radii show -")
    assert [column_ends(line)[1:5] for line in lines[1:3]] == [column_ends(lines[0])[1:5]] * 2  # still under the header


def test_an_adaptive_run_on_an_imagenet_grid_and_without_its_sidecar(tmp_path):
    """Reported radii 0, 0.5, 1.0: the columns between them (0.25, 0.75) are not its results either. Without the
    sidecar which radii it reported is unknown: no column is shown."""
    runs = adaptive_pair(tmp_path)
    runs[1]["reported"] = np.array([0.0, 0.5, 1.0])
    row = report.table(["fixed", "adaptive"], runs).splitlines()[2].split()
    assert row[1:6] == ["80.0", "-", "80.0", "-", "60.0"]
    (tmp_path / "adaptive.tsv.json").unlink()
    runs = adaptive_pair(tmp_path, sidecar=False)
    lines = report.table(["fixed", "adaptive"], runs).splitlines()
    assert set(lines[2].split()[1:-2]) == {"-"} and "* adaptive: adaptive, without its .json: the radii its plan reported are unknown" in lines[3]


def test_the_plot_draws_an_adaptive_run_at_its_reported_radii_only(tmp_path):
    grid, curves = report.plot_curves(adaptive_pair(tmp_path))
    drawn = grid[~np.isnan(curves[1])]
    assert drawn.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and not np.isnan(curves[0]).any()
    assert curves[1][grid == 1.0] == curves[0][grid == 1.0] == 0.6


def test_plot_draws_what_plot_curves_computes(tmp_path, stand_in_matplotlib):
    """The drawing, through a stand-in for matplotlib (optional, and not installed in CI): one line a run (the
    adaptive one at its reported radii, as points), the envelope dashed, the file written where asked."""
    lines, saved, axes = stand_in_matplotlib.lines, stand_in_matplotlib.saved, stand_in_matplotlib.axes
    report.plot(["fixed", "adaptive"], adaptive_pair(tmp_path), str(tmp_path / "p.png"), envelope=True)
    assert saved == [str(tmp_path / "p.png")]
    assert [(style, label) for _, _, style, label in lines] == [("-", "fixed"), ("o-", "adaptive"), ("k--", "best of above")]
    assert lines[1][0] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(lines[0][0]) > 100  # the fixed-n run on the fine grid
    assert axes["ylim"] == pytest.approx((0, 0.9)), axes  # the highest curve: 4 of 5 images at radius 0, 0.8


def test_an_accuracy_axis_ends_at_the_next_tenth_above_the_highest_value():
    assert report.axis_top(0.8, 1.0) == pytest.approx(0.9) and report.axis_top(0.35, 1.0) == pytest.approx(0.4)
    assert report.axis_top(0.0, 1.0) == pytest.approx(0.1) and report.axis_top(1.0, 1.0) == 1.0  # never past full
    assert report.axis_top(35.3, 100.0) == pytest.approx(40.0) and report.axis_top(40.0, 100.0) == pytest.approx(50.0)
