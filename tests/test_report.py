"""report.py: tables and the best-over-sigma envelope against hand-counted values, and every malformed file refused
in one line that names the file and the line."""
import subprocess
import sys

import numpy as np
import pytest

import report
from conftest import ROOT

ROWS = "0\t1\t1\t0.3\t1\t1.0\n1\t2\t2\t0.8\t1\t1.0\n2\t0\t-1\t0.0\t0\t1.0\n3\t0\t1\t0.9\t0\t1.0\n"


def test_report_table_and_envelope(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text(report.HEADER + "\n" + ROWS)
    b.write_text(report.HEADER + "\n0\t1\t1\t1.3\t1\t1.0\n1\t2\t0\t0.8\t0\t1.0\n2\t0\t0\t0.1\t1\t1.0\n3\t0\t1\t0.9\t0\t1.0\n")
    rows = report.read_tsv(str(a))
    assert [report.certified_accuracy(rows["radius"], rows["correct"], r) for r in (0, 0.25, 0.5, 1.0)] == [0.5, 0.5, 0.25, 0.0]
    assert report.average_certified_radius(rows["radius"], rows["correct"]) == pytest.approx(0.275)
    lines = report.table(["a", "b"], [rows, report.read_tsv(str(b))], envelope=True).splitlines()
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
    run = dict(radius=np.array([0.3, 0.8]), correct=np.array([1.0, 1.0]))
    lines = report.table(names, [run, run], envelope=True).splitlines()
    radii_ends = column_ends(lines[0])[1:7]  # after "run": 0.00 0.25 0.50 0.75 1.00 (and ACR)
    for line in lines[1:]:
        label_words = 3 if line.startswith("best of above") else 1
        assert column_ends(line)[label_words:label_words + 5] == radii_ends[:5], f"\n{lines[0]}\n{line}"


def test_reads_fixed_and_adaptive_files(tmp_path):
    fixed, adaptive = tmp_path / "f.tsv", tmp_path / "a.tsv"
    fixed.write_text(report.HEADER + "\n" + ROWS)
    adaptive.write_text(report.ADAPTIVE_HEADER + "\n" + "".join(r + "\t1000\n" for r in ROWS.splitlines()[:2]) + "2\t0\t-1\t0.0\t0\t1.0\t100000\n")
    assert "samples" not in report.read_tsv(str(fixed))
    run = report.read_tsv(str(adaptive))
    assert list(run["samples"]) == [1000, 1000, 100000] and list(run["radius"]) == [0.3, 0.8, 0.0]
    assert "3 images, 1.00 s per image, 34,000 estimation samples per image" in report.summary(str(adaptive))


GOOD = report.HEADER + "\n" + ROWS


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
    (report.ADAPTIVE_HEADER + "\n0\t1\t1\t0.3\t1\t1.0\t0\n", "line 2: samples 0 is out of range"),
    ("hello\n", "is not a certification TSV"),
])
def test_malformed_files_are_refused_naming_file_and_line(tmp_path, text, problem):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(report.ReportError, match=f"{path}"):
        report.read_tsv(str(path))
    with pytest.raises(report.ReportError) as error:
        report.read_tsv(str(path))
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
    tsv.write_text(report.HEADER + "\n0\t1\t1\t0.3\t1\t1.0\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(report.ReportError, match="--plot needs matplotlib"):
        report.main([str(tsv), "--plot", str(tmp_path / "p.png")])
    result = subprocess.run([sys.executable, "report.py", str(tmp_path / "missing.tsv")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.strip() == f"report.py: error: cannot read {tmp_path / 'missing.tsv'}"


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, "report.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    options = result.stdout.split("options:")[1].split("\n  -")[2:]  # after -h
    assert len(options) == 2 and all("(default:" in " ".join(o.split()) for o in options), result.stdout
