"""Adaptive CERTIFY: sound (simulated base classifiers with known p_A) and in agreement with fixed-n CERTIFY."""
import functools

import numpy as np
import pytest
from scipy.stats import binom, norm

import certify


def stage_counts(p: float, stages: list[int], trials: int, rng) -> np.ndarray:
    """[trials, K]: how often class 0 (probability p) wins among the first n_k samples, one sample path per trial."""
    return np.cumsum(rng.binomial(np.diff([0, *stages]), p, size=(trials, len(stages))), axis=1)


def adaptive_runs(p: float, stages: list[int], alpha: float, sigma: float, radii: list[float], trials: int, rng) -> list[tuple]:
    """certify_adaptive on `trials` sample paths of a base classifier that returns class 0 with probability p."""
    wins = stage_counts(p, stages, trials, rng)
    runs = []
    for path in wins:
        seen = dict(zip(stages, path))
        estimate = lambda m: np.array([seen[m], m - seen[m]])
        runs.append(certify.certify_adaptive(np.array([1, 0]), estimate, stages, alpha, sigma, radii))
    return runs


@pytest.fixture
def cached_bounds(monkeypatch):
    """The same Clopper-Pearson bounds, memoised: a simulation asks for the same (k, n, alpha) many times."""
    for name in ("lower_confidence_bound", "upper_confidence_bound"):
        monkeypatch.setattr(certify, name, functools.lru_cache(maxsize=None)(getattr(certify, name)))


def wrong_certificates(p: float, runs: list[tuple], sigma: float) -> int:
    """Runs whose certificate exceeds the true radius sigma Phi^-1(p) of the smoothed classifier (any certificate
    is wrong for p < 1/2: the smoothed classifier does not return class 0 at all)."""
    return sum(pred != certify.ABSTAIN and radius > sigma * norm.ppf(p) for pred, radius, _ in runs)


# Simulation scale: alpha = 0.1 (not 0.001) so that a violation shows in 2,000 trials; five looks so that an
# unsplit alpha is clearly too many chances. Under the guarantee the wrong count is stochastically at most
# Binomial(T, alpha), so it exceeds its 1 - 1e-4 quantile with probability < 1e-4 per p_A (the tolerance).
ALPHA, SIGMA, STAGES, TRIALS = 0.1, 0.25, [100, 200, 400, 800, 1600], 2000
TOLERANCE = int(binom.ppf(1 - 1e-4, TRIALS, ALPHA))


def p_values_near_thresholds(radii: list[float]) -> list[float]:
    """Just below each reported radius's threshold Phi(r / sigma) (the true radius a hair under r, where an
    over-claim is likeliest), exactly at it, and a few in between and beyond."""
    near = [float(norm.cdf(r / SIGMA)) + d for r in radii for d in (-0.01, -0.002, 0.0)]
    return sorted(set(near) | {0.3, 0.7, 0.95, 0.999})


def test_adaptive_certificates_are_wrong_at_most_alpha_of_the_time(cached_bounds):
    radii = certify.default_radii(STAGES[-1], ALPHA, SIGMA, len(STAGES))
    assert radii == [0.0, 0.25, 0.5]  # 0.25 Phi^-1((0.1 / 5)^(1 / 1600)) = 0.66: three thresholds
    rng = np.random.default_rng(0)
    for p in p_values_near_thresholds(radii):
        wrong = wrong_certificates(p, adaptive_runs(p, STAGES, ALPHA, SIGMA, radii, TRIALS, rng), SIGMA)
        assert wrong <= TOLERANCE, f"p_A = {p:.4f}: {wrong} of {TRIALS} certificates too large (alpha = {ALPHA})"


def test_without_the_alpha_split_the_same_test_fails(cached_bounds, monkeypatch):
    """Every look at the full alpha: the union bound no longer holds and over-claims exceed alpha."""
    lower, upper = certify.lower_confidence_bound, certify.upper_confidence_bound
    monkeypatch.setattr(certify, "lower_confidence_bound", lambda k, n, a: lower(k, n, a * len(STAGES)))
    monkeypatch.setattr(certify, "upper_confidence_bound", lambda k, n, a: upper(k, n, a * len(STAGES)))
    radii = [0.0, 0.25, 0.5]
    rng = np.random.default_rng(0)
    worst = max(wrong_certificates(p, adaptive_runs(p, STAGES, ALPHA, SIGMA, radii, TRIALS, rng), SIGMA)
                for p in p_values_near_thresholds(radii))
    assert worst > TOLERANCE, f"unsplit alpha: worst {worst} of {TRIALS}, tolerance {TOLERANCE}"


def test_certified_accuracy_table_agrees_with_fixed_n_on_simulated_counts():
    """The paper's protocol (n = 100,000, alpha = 0.001, sigma = 0.25, looks at 1k, 10k, 100k) on 600 simulated
    images, each certified both ways from the same sample path: the table at the reported radii agrees to
    within one percentage point, with a fraction of the samples."""
    n, alpha, sigma = 100_000, 0.001, 0.25
    stages = certify.adaptive_stages(n, None)
    assert stages == [1000, 10_000, 100_000]
    radii = certify.default_radii(n, alpha, sigma, len(stages))
    assert radii == [0.0, 0.25, 0.5, 0.75]  # 0.25 Phi^-1((0.001 / 3)^(1e-5)) = 0.94
    rng = np.random.default_rng(1)
    # a CIFAR-10-like mix: a third of the images always right, a fifth hopeless, the rest in between
    p = np.concatenate([np.ones(200), rng.uniform(0.05, 0.5, 120), rng.uniform(0.5, 1.0, 280)])
    fixed, adaptive, used = [], [], []
    for p_a in p:
        wins = stage_counts(p_a, stages, 1, rng)[0]
        seen = dict(zip(stages, wins))
        fixed.append(certify.certify_from_counts(np.array([1, 0]), np.array([wins[-1], n - wins[-1]]), n, alpha, sigma))
        pred, radius, m = certify.certify_adaptive(np.array([1, 0]), lambda m: np.array([seen[m], m - seen[m]]), stages, alpha, sigma, radii)
        adaptive.append((pred, radius))
        used.append(m)
    for r in radii:
        at_r = [np.mean([pred != certify.ABSTAIN and radius >= r for pred, radius in run]) for run in (fixed, adaptive)]
        assert abs(at_r[0] - at_r[1]) <= 0.01, f"radius {r}: fixed {at_r[0]:.3f}, adaptive {at_r[1]:.3f}"
    print(f"estimation samples per image: adaptive {np.mean(used):,.0f}, fixed {n:,} ({n / np.mean(used):.1f}x fewer)")
    assert np.mean(used) < n / 5  # most images decide early: the always-right ones at 10k, the hopeless at 1k


def test_stages_are_chunk_multiples_ending_at_n():
    assert certify.adaptive_stages(100_000, None) == [1000, 10_000, 100_000]
    assert certify.adaptive_stages(10_000, None) == [100, 1000, 10_000]
    assert certify.adaptive_stages(500, "100,200,900") == [100, 200, 500]  # looks at or above n are n itself
    with pytest.raises(ValueError, match="multiples of 100"):
        certify.adaptive_stages(1000, "150")


def test_stopping_rules_on_hand_made_counts():
    """Stops where a person would: all-correct at the first look that certifies the top radius; a clear
    abstention at the first look; a borderline image continues to n."""
    stages, alpha, sigma, radii = [1000, 10_000, 100_000], 0.001, 0.25, [0.0, 0.25, 0.5, 0.75]
    run = lambda frac: certify.certify_adaptive(np.array([0, 1]), lambda m: np.array([m - round(frac * m), round(frac * m)]),
                                                stages, alpha, sigma, radii)
    # all correct: at 1k the bound (alpha/3)^(1/1000) gives 0.25 Phi^-1(0.99203) = 0.60 < 0.75; at 10k 0.79
    pred, radius, used = run(1.0)
    assert (pred, used) == (1, 10_000) and radius == pytest.approx(sigma * norm.ppf((alpha / 3) ** (1 / 10_000)), abs=1e-9)
    assert run(0.3)[::2] == (certify.ABSTAIN, 1000)  # 300 of 1000: p_A < 1/2 beyond doubt
    assert run(0.977)[2] == 100_000  # true radius 0.499: whether 0.5 is reached needs every sample
