"""CERTIFY and PREDICT against closed forms and independent statistics; certify.py's flags and results-file rules."""
import fcntl
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, norm

import certify
from conftest import ROOT


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


def test_radius_is_rounded_down_to_4_decimals():
    """By hand: 0.24996 must not become 0.2500 (that would count at r = 0.25)."""
    assert certify.floor_radius(0.24996) == "0.2499"
    assert certify.floor_radius(0.25) == "0.2500" and certify.floor_radius(0.0) == "0.0000"
    assert certify.floor_radius(0.61649) == "0.6164" and certify.floor_radius(1.99999999) == "1.9999"
    # a certificate from counts: 9996 of 10000 at alpha 0.001, sigma 0.5 gives 1.486074...: written 1.4860, where
    # rounding to nearest would write 1.4861
    _, radius = certify.certify_from_counts(np.array([0, 100]), np.array([4, 9996]), 10000, 0.001, 0.5)
    expected = 0.5 * norm.ppf(clopper_pearson_lower(9996, 10000, 0.001))
    assert abs(radius - expected) < 1e-9 and f"{expected:.4f}" == "1.4861" and certify.floor_radius(radius) == "1.4860"


def test_imagenet_default_subset_is_500_images_from_500_classes():
    """The val folder sorted by class, 50 images each: every 100th image is one image of every other class."""
    labels = np.repeat(np.arange(1000), 50)
    chosen = certify.certified_indices(len(labels), certify.DEFAULT_SKIP["imagenet"], 500)
    assert len(chosen) == 500 and len(set(labels[chosen])) == 500
    cifar = certify.certified_indices(10_000, certify.DEFAULT_SKIP["cifar10"], 500)
    assert len(cifar) == 500 and cifar[:3] == [0, 20, 40] and cifar[-1] == 9980


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_sigma_must_be_finite(value):
    with pytest.raises(SystemExit, match="--sigma must be > 0 and finite"):
        certify.parse_args([f"--sigma={value}"])


@pytest.mark.parametrize("out,reason", [("/proc/x", "cannot write /proc/x"), ("/etc/passwd/x", "/etc/passwd is not a directory")])
def test_unwritable_out_is_one_line(out, reason):
    with pytest.raises(certify.UsageError, match=reason):
        certify.lock_results(out)


def test_one_writer_per_results_file(tmp_path):
    """A second writer is refused at once; once the first is gone (closed, or its process killed) the lock is free."""
    path = str(tmp_path / "c.tsv")
    first = certify.lock_results(path)
    with pytest.raises(certify.UsageError, match="being written by another certify.py run"):
        certify.lock_results(path)
    first.close()
    certify.lock_results(path).close()
    with open(path + ".lock") as other:  # an independent flock from outside certify.py
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(certify.UsageError, match="being written"):
            certify.lock_results(path)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        certify.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    blocks = text.split("\n  --")[1:]
    assert len(flags) == len(blocks) >= 15
    missing = [block.split()[0] for block in blocks if "(default:" not in " ".join(block.split())]
    assert not missing, f"flags without a default in --help: {missing}"


def test_triton_kernels_on_a_cpu_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it, not under the interpreter
    result = subprocess.run([sys.executable, "certify.py", "--kernels", "triton", "--checkpoint", "nowhere.pt"], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    expected = "nowhere.pt does not exist" if torch.cuda.is_available() else "--kernels triton needs a CUDA GPU"
    assert expected in result.stderr and result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
