"""report.py --compare and --ci: the paired comparison of certification runs against hand-counted 2 x 2 tables,
scipy's binomial test and exact interval, Holm by hand, Tango's interval against its defining equation with the
likelihood maximised numerically, and every refusal in one line. No model runs here: the TSVs are written by hand,
so no precision is involved."""
import math
import re

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import beta, binomtest, norm

import report
import results
import smoothing  # noqa: F401 -- report imports it (and torch) lazily: imported at collection, no test pays for it


def write(path, rows, sidecar=None):
    """A certification TSV from (idx, label, predict, radius) rows; `sidecar` is the .json's text."""
    path.write_text(results.HEADER + "\n" + "".join(f"{i}\t{y}\t{p}\t{r}\t{int(p == y)}\t1.0\n" for i, y, p, r in rows))
    if sidecar:
        (path.parent / (path.name + ".json")).write_text(sidecar)
    return str(path)


def run_main(argv, capsys) -> str:
    report.main(list(map(str, argv)))
    return capsys.readouterr().out


def body(out: str) -> list[list[str]]:
    """The comparison's rows (after its two lines of legend and its header), cut into cells."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()[3:]]


def refusal(argv) -> str:
    """What `python report.py argv` exits with, in this process: argparse's one line, or a ResultsError's as report.py's
    __main__ prints it (that path runs as a subprocess in test_report's envelope refusals)."""
    with pytest.raises((SystemExit, results.ResultsError)) as refused:
        report.main(list(map(str, argv)))
    if isinstance(refused.value, SystemExit):
        assert refused.value.code not in (0, None)
        return str(refused.value.code)
    return f"report.py: error: {refused.value}"


# Eight images counted by hand. A's image 2 has radius 0.2499 (a radius written rounded down): not certified at 0.25.
# B lists its images in another order: rows are paired by idx, not by line.
#   idx label   A: predict radius   B: predict radius
A_ROWS = [(0, 3, 3, 0.6), (1, 4, 4, 0.3), (2, 5, 5, 0.2499), (3, 6, 0, 0.9), (4, 7, 7, 0.8), (5, 8, -1, 0.0), (6, 9, 9, 0.0),
          (7, 0, 0, 0.51)]
B_ROWS = [(7, 0, 1, 0.4), (6, 9, 9, 0.9), (5, 8, -1, 0.0), (4, 7, 7, 0.1), (3, 6, 6, 0.26), (2, 5, -1, 0.0), (1, 4, 4, 0.55),
          (0, 3, 3, 0.7)]
# radius: (only A, only B, both) -- r = 0: A right on 0 1 2 4 6 7, B on 0 1 3 4 6; r = 0.25: A 0 1 4 7, B 0 1 3 6;
# r = 0.5: A 0 4 7, B 0 1 6; r = 0.75: A 4, B 6; r = 1: none
HAND = {0.0: (2, 1, 4), 0.25: (2, 2, 2), 0.5: (2, 2, 1), 0.75: (1, 1, 0), 1.0: (0, 0, 0)}


@pytest.mark.quick
def test_the_table_of_two_runs_against_hand_counts(tmp_path, capsys):
    a, b = write(tmp_path / "a.tsv", A_ROWS), write(tmp_path / "b.tsv", B_ROWS)
    out = run_main([a, b, "--compare"], capsys)
    assert out.splitlines()[0].startswith("A = a; each run B against it over the same 8 images")
    assert out.splitlines()[2].split()[:9] == ["B", "radius", "images", "only", "A", "only", "B", "both", "A"]
    rows = body(out)
    assert [float(row[1]) for row in rows] == list(HAND)  # the paper's CIFAR-10 radii: every label is below 10
    for row, (radius, (only_a, only_b, both)) in zip(rows, HAND.items()):
        assert row[0] == "b" and row[2:6] == ["8", str(only_a), str(only_b), str(both)], row
        assert float(row[6]) == 100 * (only_a + both) / 8 and float(row[7]) == 100 * (only_b + both) / 8
        assert float(row[8]) == 100 * (only_b - only_a) / 8
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        assert float(row[10]) == pytest.approx(expected, abs=5e-4)
    assert [float(row[11]) for row in rows] == [1.0] * 5 and len(rows[0]) == 12  # Holm: all 1, none marked


def arms(tmp_path) -> list[str]:
    """60 images, labels 0-9. BASE certifies images 0-29 at radius 0.6; X drops 27-29 (3 only A) and adds 30-44 (15
    only B); Y drops 20-29 (10 only A) and adds 30-41 (12 only B). At r <= 0.6 every table is the same."""
    def run(name, certified):
        rows = [(i, i % 10, i % 10 if i in certified else -1, 0.6 if i in certified else 0.0) for i in range(60)]
        return write(tmp_path / f"{name}.tsv", rows)
    return [run("base", set(range(30))), run("x", set(range(27)) | set(range(30, 45))), run("y", set(range(20)) | set(range(30, 42)))]


@pytest.mark.quick
def test_several_runs_against_the_first_with_holm_over_every_p_value(tmp_path, capsys):
    rows = body(run_main([*arms(tmp_path), "--compare", "--radii", "0.5,0"], capsys))
    assert [(row[0], row[1], row[3], row[4], row[5]) for row in rows] == [
        ("x", "0", "3", "15", "27"), ("x", "0.5", "3", "15", "27"), ("y", "0", "10", "12", "20"), ("y", "0.5", "10", "12", "20")]
    p_x, p_y = binomtest(3, 18).pvalue, binomtest(10, 22).pvalue  # 0.0075 and 0.83
    # Holm by hand over four p-values, p_x twice then p_y twice: 4 p_x, max(4 p_x, 3 p_x), then max(that, 2 p_y), ...
    holm = [4 * p_x, 4 * p_x, min(1, max(4 * p_x, 2 * p_y)), min(1, max(4 * p_x, 2 * p_y, p_y))]
    assert [float(row[10]) for row in rows] == pytest.approx([p_x, p_x, p_y, p_y], abs=5e-4)
    assert [float(row[11]) for row in rows] == pytest.approx(holm, abs=5e-4)
    assert [row[12:] for row in rows] == [["*"], ["*"], [], []]  # 4 p_x = 0.030 <= 0.05


@pytest.mark.quick
def test_holm_by_hand():
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # 4 x .005, 3 x .01, 2 x .03, .04 -> .06
    assert report.holm([0.5, 0.6]) == [1.0, 1.0] and report.holm([0.02]) == [0.02] and report.holm([]) == []
    assert report.holm([0.01, 0.01, 0.2]) == pytest.approx([0.03, 0.03, 0.2])  # ties: 3 x .01, max(.03, 2 x .01), .2


@pytest.mark.quick
@pytest.mark.parametrize("only_a,only_b", [(0, 0), (0, 1), (0, 5), (7, 3), (3, 7), (20, 35), (130, 100), (6, 6)])
def test_mcnemar_is_scipys_binomial_test_of_the_discordant_images(only_a, only_b):
    expected = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    assert report.mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-12)


@pytest.mark.quick
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_clopper_pearson_is_scipys_exact_interval(level):
    for k, n in [(0, 1), (1, 1), (0, 20), (20, 20), (7, 20), (250, 500), (1, 500)]:
        exact = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
        assert report.clopper_pearson(k, n, level) == pytest.approx((exact.low, exact.high), abs=1e-12)


def tango_score(only_a: int, only_b: int, n: int, delta: float) -> float:
    """Tango's (1998) statistic at delta, its nuisance parameter q = P(only A) maximised numerically: the multinomial
    likelihood of (only A, only B, the rest) with P(only B) = q + delta."""
    rest = n - only_a - only_b
    loglik = lambda q: -(only_a * np.log(q) + only_b * np.log(q + delta) + rest * np.log(max(1 - 2 * q - delta, 1e-300)))
    low, high = max(0.0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12
    q = minimize_scalar(loglik, bounds=(low, high), method="bounded", options=dict(xatol=1e-12)).x
    return (only_b - only_a - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


@pytest.mark.quick
@pytest.mark.parametrize("only_a,only_b,n", [(2, 9, 40), (15, 4, 100), (1, 7, 21), (0, 3, 100), (30, 45, 500)])
def test_tango_interval_solves_its_score_equation(only_a, only_b, n):
    """Each end is where the score statistic reaches -+z (the statistic recomputed here with the maximum-likelihood
    step done by scipy); the estimate lies inside."""
    z = norm.ppf(0.975)
    low, high = report.tango_interval(only_a, only_b, n, 0.95)
    assert tango_score(only_a, only_b, n, low) == pytest.approx(z, abs=2e-4)
    assert tango_score(only_a, only_b, n, high) == pytest.approx(-z, abs=2e-4)
    assert -1 < low < (only_b - only_a) / n < high < 1


@pytest.mark.quick
def test_tango_interval_edges_by_hand():
    """No discordant image: T(delta) = -n delta / sqrt(n |delta| (1 - |delta|)) gives +-z^2 / (n + z^2). Every image
    only B: the upper end is 1. At delta = 0 the statistic is McNemar's (only_b - only_a) / sqrt(only_a + only_b),
    so the interval leaves out 0 exactly when that asymptotic test rejects."""
    z = norm.ppf(0.975)
    assert report.tango_interval(0, 0, 100, 0.95) == pytest.approx((-z * z / (100 + z * z), z * z / (100 + z * z)), abs=1e-9)
    assert report.tango_interval(0, 10, 10, 0.95)[1] == 1.0 and report.tango_interval(10, 0, 10, 0.95)[0] == -1.0
    for only_a in range(16):
        for only_b in range(16):
            low, high = report.tango_interval(only_a, only_b, 40, 0.95)
            mcnemar = abs(only_b - only_a) / math.sqrt(only_a + only_b) if only_a + only_b else 0.0
            assert (low > 0 or high < 0) == (mcnemar > z), (only_a, only_b, low, high)


@pytest.mark.quick
def test_tango_interval_covers_at_small_counts():
    """Exact coverage at n = 20 images, every outcome enumerated: close to 95 % where discordant images are rare
    (0.947 and 0.951 computed when this was written), far from the Wald interval's collapse at zero counts."""
    n = 20
    outcomes = [(a, b) for a in range(n + 1) for b in range(n + 1 - a)]
    intervals = {ab: report.tango_interval(*ab, n, 0.95) for ab in outcomes}
    for p_a, p_b in [(0.3, 0.1), (0.05, 0.05), (0.02, 0.2)]:
        log_probability = lambda a, b: (math.lgamma(n + 1) - math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(n - a - b + 1)
                                        + a * math.log(p_a) + b * math.log(p_b) + (n - a - b) * math.log(1 - p_a - p_b))
        covered = sum(math.exp(log_probability(a, b)) for (a, b), (low, high) in intervals.items() if low <= p_b - p_a <= high)
        assert covered > 0.93, (p_a, p_b, covered)


@pytest.mark.quick
def test_ci_adds_clopper_pearson_intervals_to_both_tables(tmp_path, capsys):
    """--compare --ci: A % and B % with their intervals; the plain table's --ci: two rows under each run, the bounds
    by beta.ppf (k / n = 30 / 60 at r = 0.5, base)."""
    paths = arms(tmp_path)
    rows = body(run_main([*paths[:2], "--compare", "--radii", "0.5", "--ci", "--level", "0.9"], capsys))
    low, high = beta.ppf(0.05, 30, 31), beta.ppf(0.95, 31, 30)
    assert rows[0][6] == f"50.0 [{100 * low:.1f}, {100 * high:.1f}]" and rows[0][9].startswith("[")
    assert rows[0][7] == "70.0 [{:.1f}, {:.1f}]".format(100 * beta.ppf(0.05, 42, 19), 100 * beta.ppf(0.95, 43, 18))
    lines = run_main([paths[0], "--ci"], capsys).splitlines()
    assert lines[0].split()[1:4] == ["0.00", "0.25", "0.50"]
    assert lines[2].startswith("  95% CI low") and lines[3].startswith("  95% CI high")
    assert float(lines[2].split()[5]) == round(100 * beta.ppf(0.025, 30, 31), 1)
    assert float(lines[3].split()[5]) == round(100 * beta.ppf(0.975, 31, 30), 1)
    ends = lambda line: [m.end() for m in re.finditer(r"\S+", line)]
    assert ends(lines[2])[3:] == ends(lines[3])[3:] == ends(lines[0])[1:-2]  # a bound under each radius column


@pytest.mark.quick
def test_default_radii_for_imagenet_and_adaptive_runs(tmp_path, capsys):
    """A label of 10 or more is not CIFAR-10: ImageNet's radii. An adaptive run has results only at the radii its
    plan reported (its .json): those are the default, and a radius it did not report is refused."""
    imagenet = [(0, 512, 512, 1.2), (1, 17, 17, 0.1), (2, 3, -1, 0.0)]
    a, b = write(tmp_path / "a.tsv", imagenet), write(tmp_path / "b.tsv", imagenet[::-1])
    assert [row[1] for row in body(run_main([a, b, "--compare"], capsys))] == ["0", "0.5", "1", "1.5", "2", "2.5"]
    assert tuple(map(tuple, report.PAPER_RADII.values())) == ((0.0, 0.25, 0.5, 0.75, 1.0), (0.0, 0.5, 1.0, 1.5, 2.0, 2.5))
    adaptive = tmp_path / "ad.tsv"
    adaptive.write_text(results.ADAPTIVE_HEADER + "\n" + "".join(f"{i}\t{y}\t{p}\t{r}\t{int(p == y)}\t1.0\t800\n" for i, y, p, r in A_ROWS))
    (tmp_path / "ad.tsv.json").write_text('{"mode": "certify-adaptive", "radii": [0.0, 0.5]}')
    fixed = write(tmp_path / "b8.tsv", B_ROWS)
    rows = body(run_main([fixed, adaptive, "--compare"], capsys))
    assert [(row[1], row[3], row[4]) for row in rows] == [("0", "1", "2"), ("0.5", "2", "2")]  # B is A here: counts swap
    assert refusal([fixed, adaptive, "--compare", "--radii", "0,0.25"]) == (
        "report.py: error: ad is adaptive and reported radii 0, 0.5: it has no result at 0.25")
    (tmp_path / "ad.tsv.json").unlink()
    assert refusal([fixed, adaptive, "--compare"]) == (
        "report.py: error: ad is adaptive and has no .json: the radii its plan reported are unknown, so it cannot be compared")


def test_paper_radii_are_certifys():
    import certify  # torch: outside the quick tier
    assert {k: list(v) for k, v in report.PAPER_RADII.items()} == certify.PAPER_RADII


@pytest.mark.quick
def test_refusals_are_one_line(tmp_path):
    a, b = write(tmp_path / "a.tsv", A_ROWS), write(tmp_path / "b.tsv", B_ROWS[:-1])  # b lacks image 0
    c = write(tmp_path / "c.tsv", [(9 if i == 7 else i, *rest) for i, *rest in A_ROWS])  # image 9 for image 7
    for argv, message in [
        ([a, b, "--compare"], "a and b cover different test images (8 and 7, 1 in only one): a paired comparison needs the same images"),
        ([a, c, "--compare"], "a and c cover different test images (8 and 8, 2 in only one)"),
        ([a, a, "--compare"], f"{a} is {a} again: give each run once"),
        ([a, "--compare"], "--compare needs two runs or more"),
        ([a, c, "--compare", "--envelope"], "--compare and --envelope: choose one"),
        ([a, "--radii", "0.5"], "--radii chooses --compare's radii"),
        ([a, c, "--compare", "--radii", "0,x"], "argument --radii: '0,x' is not radii separated by commas"),
        ([a, c, "--compare", "--radii", "-1"], "argument --radii: radii must be finite and >= 0, got -1"),
        ([a, c, "--compare", "--radii", "nan"], "argument --radii: radii must be finite and >= 0, got nan"),
    ] + [([a, "--ci", "--level", level], f"argument --level: must be a number between 0 and 1 (e.g. 0.95), got {level}")
         for level in ("0", "1", "1.5", "95", "nan", "-0.5", "high")]:
        said = refusal(argv)
        assert said.startswith(f"report.py: error: {message}") and "\n" not in said, (argv, said)

