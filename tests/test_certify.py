"""CERTIFY and PREDICT against closed forms and independent statistics."""
import os

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, norm

import certify
import report


def clopper_pearson_lower(k, n, alpha):
    """Independent: the p at which P(X >= k | n, p) = alpha, by root finding on the binomial tail."""
    return 0.0 if k == 0 else brentq(lambda p: binom.sf(k - 1, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-14)


@pytest.mark.parametrize("k,n,alpha", [(1, 10, 0.05), (990, 1000, 0.001), (50, 100, 0.001), (100000, 100000, 0.001), (0, 100, 0.001)])
def test_lower_confidence_bound_is_clopper_pearson(k, n, alpha):
    assert abs(certify.lower_confidence_bound(k, n, alpha) - clopper_pearson_lower(k, n, alpha)) < 1e-9


def test_certify_from_counts_closed_form():
    sigma, n, alpha = 0.5, 1000, 0.001
    counts0 = np.array([3, 90, 7])
    pred, radius = certify.certify_from_counts(counts0, np.array([10, 980, 10]), n, alpha, sigma)
    assert pred == 1 and abs(radius - sigma * norm.ppf(clopper_pearson_lower(980, n, alpha))) < 1e-9
    # selection picks class 1, but estimation counts for class 1 are too low: abstain
    assert certify.certify_from_counts(counts0, np.array([500, 480, 20]), n, alpha, sigma) == (certify.ABSTAIN, 0.0)


class Linear(torch.nn.Module):
    """Class 0 iff the mean of the model-space input is > 0, i.e. iff the mean pixel is > 0.5.
    With x = 0.5 + d everywhere and pixel noise sigma, P(class 0) = Phi(d sqrt(D) / sigma), and the
    exact L2 distance to the decision boundary is d sqrt(D): the smoothed radius must approach it."""

    cfg = type("cfg", (), {"num_classes": 2})

    def forward(self, x_t, t):
        m = x_t.flatten(1).mean(1)
        return torch.stack([m, -m], 1)


def run_certify(d, sigma=0.5, n=20000, n0=100, batch=1000, seed=0, shape=(3, 4, 4)):
    x = torch.full(shape, 0.5 + d)
    classify = lambda x, eps: certify.predict_noisy(Linear(), x, eps, sigma)
    counts0 = certify.sample_counts(classify, x, n0, batch, 2, seed, 7, "select")
    counts = certify.sample_counts(classify, x, n, batch, 2, seed, 7, "estimate")
    return certify.certify_from_counts(counts0, counts, n, 0.001, sigma), counts


def test_certify_radius_matches_linear_classifier_closed_form():
    D, sigma, d = 48, 0.5, 0.1
    (pred, radius), counts = run_certify(d, sigma)
    p = norm.cdf(d * np.sqrt(D) / sigma)
    assert abs(counts[0] / counts.sum() - p) < 4 * np.sqrt(p * (1 - p) / counts.sum())
    assert pred == 0
    assert radius <= d * np.sqrt(D) and radius > d * np.sqrt(D) - 0.1  # the bound is below the truth, and close


def test_certify_abstains_on_the_boundary():
    (pred, radius), _ = run_certify(0.0, n=2000)
    assert pred == certify.ABSTAIN and radius == 0.0


def test_noise_does_not_depend_on_batch_size():
    a = certify.noise((3, 4, 4), 500, 0, 1, 5, "estimate", torch.device("cpu"))
    b = torch.cat([certify.noise((3, 4, 4), 200, s, 1, 5, "estimate", torch.device("cpu")) for s in (0, 200, 400)])[:500]
    assert torch.equal(a, b)
    c = certify.noise((3, 4, 4), 100, 0, 1, 6, "estimate", torch.device("cpu"))
    assert not torch.equal(a[:100], c)  # another image gets other noise
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1) < 0.05


def test_predict_uses_binomial_test():
    assert certify.predict_from_counts(np.array([5, 60, 35]), 0.001) == certify.ABSTAIN  # p-value of 60 vs 35 is 0.013
    assert certify.predict_from_counts(np.array([5, 80, 15]), 0.001) == 1


def test_report_table_and_envelope(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text(report.HEADER + "\n0\t1\t1\t0.3\t1\t1.0\n1\t2\t2\t0.8\t1\t1.0\n2\t0\t-1\t0.0\t0\t1.0\n3\t0\t1\t0.9\t0\t1.0\n")
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


def test_report_rejects_a_file_that_is_not_a_tsv(tmp_path):
    bad = tmp_path / "x.tsv"
    bad.write_text("hello\n")
    with pytest.raises(report.ReportError, match="not a certification TSV"):
        report.read_tsv(str(bad))


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import subprocess
    import sys
    tsv = tmp_path / "a.tsv"
    tsv.write_text(report.HEADER + "\n0\t1\t1\t0.3\t1\t1.0\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(report.ReportError, match="--plot needs matplotlib"):
        report.main([str(tsv), "--plot", str(tmp_path / "p.png")])
    result = subprocess.run([sys.executable, "report.py", str(tmp_path / "missing.tsv")], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode != 0 and result.stderr.strip() == f"report.py: error: cannot read {tmp_path / 'missing.tsv'}"
