"""smoothing.py, the certification library: its statistics against independent references (root finding on
the binomial tail, closed forms), a plain torch classifier that is not rRCM certified through the public API,
and the noise streams (no sample of an image counted twice; the old per-chunk seeds did collide)."""
import hashlib

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import binom, binomtest, norm

import data
import smoothing


def clopper_pearson_lower(k, n, alpha):
    """Independent: the p at which P(X >= k | n, p) = alpha, by root finding on the binomial tail."""
    return 0.0 if k == 0 else brentq(lambda p: binom.sf(k - 1, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-14)


def clopper_pearson_upper(k, n, alpha):
    """Independent: the p at which P(X <= k | n, p) = alpha."""
    return 1.0 if k == n else brentq(lambda p: binom.cdf(k, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-14)


@pytest.mark.quick
@pytest.mark.parametrize("k,n,alpha", [(1, 10, 0.05), (990, 1000, 0.001), (50, 100, 0.001), (100000, 100000, 0.001), (0, 100, 0.001)])
def test_confidence_bounds_are_clopper_pearson(k, n, alpha):
    assert abs(smoothing.lower_confidence_bound(k, n, alpha) - clopper_pearson_lower(k, n, alpha)) < 1e-9
    assert abs(smoothing.upper_confidence_bound(n - k, n, alpha) - clopper_pearson_upper(n - k, n, alpha)) < 1e-9


@pytest.mark.quick
def test_certify_from_counts_closed_form():
    sigma, n, alpha = 0.5, 1000, 0.001
    counts0 = np.array([3, 90, 7])
    pred, radius = smoothing.certify_from_counts(counts0, np.array([10, 980, 10]), n, alpha, sigma)
    assert pred == 1 and abs(radius - sigma * norm.ppf(clopper_pearson_lower(980, n, alpha))) < 1e-9
    # selection picks class 1, but estimation counts for class 1 are too low: abstain
    assert smoothing.certify_from_counts(counts0, np.array([500, 480, 20]), n, alpha, sigma) == (smoothing.ABSTAIN, 0.0)
    # the largest radius n samples can certify: all correct, pA_lower = alpha^(1/n), by hand
    assert smoothing.largest_radius(n, alpha, sigma) == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), abs=1e-9)


@pytest.mark.quick
def test_predict_uses_binomial_test():
    assert binomtest(60, 95, 0.5).pvalue > 0.001 and binomtest(80, 95, 0.5).pvalue < 0.001
    assert smoothing.predict_from_counts(np.array([5, 60, 35]), 0.001) == smoothing.ABSTAIN  # p-value of 60 vs 35 is 0.013
    assert smoothing.predict_from_counts(np.array([5, 80, 15]), 0.001) == 1


def test_sign_test_pvalue_is_scipys_binomial_test():
    rng = np.random.default_rng(0)
    pairs = [(0, 0), (1, 0), (0, 1), (5, 5), (6, 5), (60, 35), (100000, 0), (50001, 49999)]
    pairs += [tuple(int(c) for c in rng.multinomial(n, [0.5 + d, 0.5 - d])) for n in (10, 1000, 100000) for d in (0, 0.01, 0.1, 0.3)]
    for n_a, n_b in pairs:
        want = binomtest(n_a, n_a + n_b, 0.5).pvalue if n_a + n_b else 1.0
        assert smoothing.sign_test_pvalue(n_a, n_b) == pytest.approx(want, rel=1e-9, abs=1e-300), (n_a, n_b)


# ----------------------------------------------------------------------------------------------------
# A plain linear classifier, certified through the public API

SHAPE, SIGMA, ALPHA = (3, 8, 8), 0.5, 0.001


def linear_classifier() -> torch.nn.Module:
    """f(z) = class 0 iff w.z + b > 0, as a torch.nn.Linear on flattened inputs: not an rRCM model. Under
    z = x + sigma eps, w.z + b ~ N(w.x + b, sigma^2 ||w||^2), so P(f = 0) = Phi(m / sigma) with the signed
    distance m = (w.x + b) / ||w|| to the decision boundary: the smoothed classifier is f itself and its exact
    certified radius is |m|."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(int(np.prod(SHAPE)), generator=g)
    layer = torch.nn.Linear(w.numel(), 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([w, -w]))
        layer.bias.copy_(torch.tensor([0.1, -0.1]))
    return torch.nn.Sequential(torch.nn.Flatten(), layer).eval()


def at_distance(f: torch.nn.Module, m: float) -> torch.Tensor:
    """An input at signed distance m from f's decision boundary."""
    w, b = f[1].weight[0].detach(), float(f[1].bias[0].detach())
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(4))
    along = w / w.norm()
    return x0 + (m - (float(w @ x0.flatten()) + b) / float(w.norm())) * along.view(SHAPE)


def certify_independently(counts0: np.ndarray, counts: np.ndarray, n: int, alpha: float, sigma: float) -> tuple[int, float]:
    """Fixed-n CERTIFY from counts, with scipy's root finding rather than the library's beta quantile."""
    c_a = int(np.argmax(counts0))
    p_lower = clopper_pearson_lower(int(counts[c_a]), n, alpha)
    return (smoothing.ABSTAIN, 0.0) if p_lower < 0.5 else (c_a, sigma * norm.ppf(p_lower))


@pytest.mark.parametrize("m", [0.6, 0.25, -0.4, 0.0])
def test_a_linear_classifier_is_certified_soundly_and_tightly(m):
    """Smooth.certify on f: its decision equals CERTIFY computed independently from the same counts; the counts
    match P(f = 0) = Phi(m / sigma); the radius never exceeds the exact one |m| and is within the
    Clopper-Pearson slack of it; on the boundary it abstains."""
    f = linear_classifier()
    x = at_distance(f, m)
    smooth = smoothing.Smooth(f, num_classes=2, sigma=SIGMA, batch=1000, seed=0)
    n0, n, key = 100, 20_000, 7
    prediction, radius = smooth.certify(x, n0=n0, n=n, alpha=ALPHA, key=key)
    counts0 = smooth.counts(x, n0, key=key, phase=smoothing.SELECT)
    counts = smooth.counts(x, n, key=key, phase=smoothing.ESTIMATE)
    expected = certify_independently(counts0, counts, n, ALPHA, SIGMA)
    assert prediction == expected[0] and radius == pytest.approx(expected[1], abs=1e-9)
    p0 = norm.cdf(m / SIGMA)
    assert abs(counts[0] / n - p0) < 4 * np.sqrt(p0 * (1 - p0) / n) + 1e-9
    if m == 0.0:
        assert prediction == smoothing.ABSTAIN
        return
    assert prediction == (0 if m > 0 else 1)
    assert radius <= abs(m)  # sound
    assert radius > abs(m) - 0.06  # tight: at n = 20,000 the bound costs a few hundredths at most here
    assert smooth.predict(x, n, ALPHA, key=key) == prediction


def test_adaptive_certify_of_the_linear_classifier_goes_through_the_public_api():
    """Smooth.certify_adaptive: a clear case stops early with a sound radius, a borderline one late; wherever it
    stops, its decision is CERTIFY's on the first samples (the ones a fixed-n run draws first), at that look's
    alpha, computed independently."""
    f = linear_classifier()
    plan = smoothing.AdaptivePlan(n=20_000, alpha=ALPHA, sigma=SIGMA, radii=[0, 0.25, 0.5])
    smooth = smoothing.Smooth(f, num_classes=2, sigma=SIGMA, batch=500, seed=1)
    stopped = []
    for m in (1.5, 0.25):  # pA = Phi(3): the top radius 0.5 is certified within a few hundred samples; Phi(0.5): 0.25 is borderline
        x = at_distance(f, m)
        prediction, radius, used = smooth.certify_adaptive(x, n0=100, plan=plan, key=3)
        counts0 = smooth.counts(x, 100, key=3, phase=smoothing.SELECT)
        counts = smooth.counts(x, used, key=3, phase=smoothing.ESTIMATE)
        alpha_k = plan.alphas[plan.looks.index(used)]
        assert (prediction, radius) == pytest.approx(certify_independently(counts0, counts, used, alpha_k, SIGMA), abs=1e-9)
        assert prediction == 0 and radius <= m
        stopped.append(used)
    assert stopped[0] <= 500 < 5000 <= stopped[1]
    one_look = smoothing.AdaptivePlan(n=2000, alpha=ALPHA, sigma=SIGMA, radii=[0, 0.25], looks=[])
    x = at_distance(f, 0.3)
    assert smooth.certify_adaptive(x, 100, one_look, key=4)[:2] == smooth.certify(x, 100, 2000, ALPHA, key=4)  # one look: CERTIFY
    with pytest.raises(ValueError, match="plan must be an AdaptivePlan for this classifier's sigma 0.25, got one for sigma 0.5"):
        smoothing.Smooth(f, 2, 0.25).certify_adaptive(x, 100, plan, key=4)


@pytest.mark.quick
def test_counts_do_not_depend_on_batch_size_and_each_key_has_its_own_noise():
    f = linear_classifier()
    x = at_distance(f, 0.05)
    counts = [smoothing.Smooth(f, 2, SIGMA, batch=b).counts(x, 3000, key=11) for b in (100, 700, 3000)]
    assert all(np.array_equal(counts[0], c) for c in counts[1:])
    eps = smoothing.gaussian_noise(SHAPE, 0, 500, 0, 5, smoothing.ESTIMATE, torch.device("cpu"))
    pieces = torch.cat([smoothing.gaussian_noise(SHAPE, s, 150, 0, 5, smoothing.ESTIMATE, torch.device("cpu")) for s in (0, 150, 300, 450)])
    assert torch.equal(eps, pieces[:500])  # spans that split chunks give the same samples
    other = smoothing.gaussian_noise(SHAPE, 0, 100, 0, 6, smoothing.ESTIMATE, torch.device("cpu"))
    select = smoothing.gaussian_noise(SHAPE, 0, 100, 0, 5, smoothing.SELECT, torch.device("cpu"))
    assert not torch.equal(eps[:100], other) and not torch.equal(eps[:100], select)
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02


def test_the_classifier_runs_under_the_requested_autocast():
    seen = []

    def spy(z: torch.Tensor) -> torch.Tensor:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.stack([z.flatten(1).mean(1), -z.flatten(1).mean(1)], 1)
    x = torch.full(SHAPE, 0.5)
    smoothing.Smooth(spy, 2, SIGMA, batch=100, autocast=torch.bfloat16).counts(x, 100, key=0)
    smoothing.Smooth(spy, 2, SIGMA, batch=100).counts(x, 100, key=0)
    assert seen[0] == (True, torch.bfloat16) and seen[1][0] is False


# ----------------------------------------------------------------------------------------------------
# Noise streams

def effective_cpu_seed(seed: int) -> int:
    """What torch's CPU generator keeps of a seed (see the next test)."""
    return seed & 0xFFFFFFFF


def test_a_cpu_generator_keeps_only_the_low_32_bits_of_a_seed():
    s = 123456789
    a = torch.randn(8, generator=torch.Generator().manual_seed(s))
    assert torch.equal(a, torch.randn(8, generator=torch.Generator().manual_seed(s + 2 ** 32)))
    assert not torch.equal(a, torch.randn(8, generator=torch.Generator().manual_seed(s + 1)))


def colliding_streams(seed_of, chunks: int) -> list[tuple]:
    """Pairs of streams of one image -- (phase, chunk), both phases, chunks 0 .. chunks - 1 -- whose effective
    CPU seeds are equal, i.e. whose noise is identical. seed_of(phase, chunks) gives the seeds of an array of chunks."""
    streams = [(phase, chunk) for phase in (smoothing.SELECT, smoothing.ESTIMATE) for chunk in range(chunks)]
    seeds = np.concatenate([effective_cpu_seed(np.asarray(seed_of(phase, np.arange(chunks)), dtype=np.uint64))
                            for phase in (smoothing.SELECT, smoothing.ESTIMATE)])
    order = np.argsort(seeds, kind="stable")
    same = np.flatnonzero(seeds[order][1:] == seeds[order][:-1])
    return [(streams[order[i]], streams[order[i + 1]]) for i in same]


def test_no_two_streams_of_an_image_coincide():
    """Every stream of an image, both phases, up to n = 100,000 (1,000 chunks; selection counted as long too),
    for 100 images spread over ImageNet's 50,000 and two seeds: no effective CPU seed repeats."""
    for seed in (0, 1):
        for key in range(0, 50_000, 1000):
            assert not colliding_streams(lambda phase, chunks: smoothing.stream_seed(seed, key, phase, chunks), 1000), (seed, key)
    assert smoothing.stream_seed(0, 271, smoothing.ESTIMATE, 211) < 2 ** 63
    assert smoothing.stream_seed(0, 271, smoothing.ESTIMATE, np.array([211])).tolist() == [smoothing.stream_seed(0, 271, smoothing.ESTIMATE, 211)]
    with pytest.raises(ValueError):
        smoothing.stream_seed(0, 0, smoothing.ESTIMATE, 2 ** 31)


def test_the_old_per_chunk_seeds_collided_within_an_image():
    """The derivation certify.py used before, data.derive_seed(seed, idx, phase, chunk): 63-bit hashes, but the CPU
    generator keeps 32 bits, so the 1,001 streams of an image collide with probability ~1e-4. A search found image
    271: its estimation chunks 211 and 675 got identical noise, i.e. 100 samples counted twice. The check above
    catches it; the streams of stream_seed for the same chunks differ."""
    names = {smoothing.SELECT: "select", smoothing.ESTIMATE: "estimate"}
    old = lambda phase, chunk: data.derive_seed(0, 271, names[phase], chunk)
    old_seeds = lambda phase, chunks: [old(phase, int(c)) for c in chunks]
    assert colliding_streams(old_seeds, 1000) == [((smoothing.ESTIMATE, 211), (smoothing.ESTIMATE, 675))]
    draw = lambda s: torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(old(smoothing.ESTIMATE, 211)), draw(old(smoothing.ESTIMATE, 675)))
    new = lambda chunk: smoothing.gaussian_noise((3, 32, 32), chunk * 100, 100, 0, 271, smoothing.ESTIMATE, torch.device("cpu"))
    assert not torch.equal(new(211), new(675))


# Streams of different images: certify.py's default image sets at seed 0, n0 = 100 and n = 100,000 (1 selection
# and 1,000 estimation chunks per image)
DEFAULT_IMAGES = {"CIFAR-10": range(0, 10_000, 20), "ImageNet": range(0, 50_000, 100)}  # 500 each (certify.DEFAULT_SKIP)
M32 = 0xFFFFFFFF


def shared_streams(seed_of, keys, chunks: int = 1000) -> np.ndarray:
    """Rows (image a, stream a, image b, stream b), a < b, of streams of different images with equal effective CPU
    seeds; stream 0 is selection chunk 0, stream 1 + c estimation chunk c. seed_of(key, phase, chunks) -> seeds."""
    seeds = np.stack([np.concatenate([seed_of(key, smoothing.SELECT, np.arange(1)), seed_of(key, smoothing.ESTIMATE, np.arange(chunks))])
                      for key in keys]).astype(np.uint64) & M32
    flat = seeds.ravel()
    order = np.argsort(flat, kind="stable")
    same = np.flatnonzero(flat[order][1:] == flat[order][:-1])
    a, b = order[same], order[same + 1]  # stable: a < b
    rows = np.stack([a // (chunks + 1), a % (chunks + 1), b // (chunks + 1), b % (chunks + 1)], axis=1)
    return rows[rows[:, 0] != rows[:, 2]]


def old_stream_seed(key, phase, chunks):
    """The low 32 bits stream_seed gave before: mix32(b + 2 chunk + phase), b the low half of the (seed, key) hash."""
    b = int.from_bytes(hashlib.blake2b(f"0/{key}".encode(), digest_size=8).digest(), "little") & M32
    return smoothing._mix32((b + 2 * chunks.astype(np.uint64) + phase) & M32)


def test_streams_of_different_images_coincide_only_at_the_birthday_rate():
    """No two images of either default set share more than one stream (so never a run of them), and the streams
    shared across images are as many as random 32-bit seeds would share: N = 500,500 seeds give N^2 / 2^33 = 29
    expected pairs; at most 60 (a Poisson(29) exceeds it with probability 1e-7). The previous formula fails it:
    CIFAR-10 images 2960 and 4040 shared 267 estimation chunks in a row."""
    for name, keys in DEFAULT_IMAGES.items():
        rows = shared_streams(lambda key, phase, chunks: smoothing.stream_seed(0, key, phase, chunks), keys)
        pairs, shared = np.unique(rows[:, [0, 2]], axis=0, return_counts=True)
        print(f"{name}: {len(rows)} streams shared across images, by {len(pairs)} pairs of images")
        assert len(rows) <= 60 and (shared <= 1).all(), (name, len(rows), shared.max())
    rows = shared_streams(old_stream_seed, DEFAULT_IMAGES["CIFAR-10"])
    pairs, shared = np.unique(rows[:, [0, 2]], axis=0, return_counts=True)
    worst = pairs[shared.argmax()]
    assert [DEFAULT_IMAGES["CIFAR-10"][i] for i in worst] == [2960, 4040] and shared.max() == 267
    run = rows[(rows[:, 0] == worst[0]) & (rows[:, 2] == worst[1])]
    run = run[np.argsort(run[:, 1])]
    assert (np.diff(run[:, 1]) == 1).all() and (np.diff(run[:, 3]) == 1).all()  # consecutive chunks of both
