"""Randomized smoothing (Cohen et al. 2019) for any base classifier: CERTIFY, PREDICT and adaptive CERTIFY.

A base classifier f maps a batch of noisy inputs x + sigma eps (eps ~ N(0, I), in x's own space) to logits.
The smoothed classifier is g(x) = argmax_c P(f(x + sigma eps) = c). If f returns cA with probability at
least pA > 1/2, g returns cA at every x' with ||x' - x||_2 < sigma Phi^-1(pA) (Cohen et al., Theorem 1);
CERTIFY estimates pA from samples, so its radius holds with probability at least 1 - alpha.

    import smoothing
    smooth = smoothing.Smooth(classifier, num_classes=10, sigma=0.25)         # classifier: noisy images -> logits
    prediction, radius = smooth.certify(x, n0=100, n=100_000, alpha=0.001)    # prediction -1: abstain
    plan = smoothing.AdaptivePlan(n=100_000, alpha=0.001, sigma=0.25, radii=[0, 0.25, 0.5, 0.75, 1.0])
    prediction, radius, samples = smooth.certify_adaptive(x, n0=100, plan=plan)

The shape is locuslab/smoothing's core.py; what differs: the class counts are kept on the device (one host
sync per phase, not one per batch), the noise loop can be torch.compile'd and run under autocast, and the
noise is seeded per (seed, key, phase, chunk of 100 samples) -- `key` names the input, e.g. its index in
the test set -- so a result depends neither on the batch size nor on which process certifies which input.
The statistics are plain functions of the counts (`certify_from_counts`, `predict_from_counts`,
`certify_adaptive`), so they can be checked, replayed and simulated without a model.
"""
import contextlib
import hashlib
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import torch
from scipy.special import bdtr, betaincinv  # not scipy.stats: half a second more at every start

ABSTAIN = -1
CHUNK = 100  # samples per noise stream: the unit in which noise is seeded, and the granularity of batches and looks
SELECT, ESTIMATE = 0, 1  # CERTIFY's two phases: n0 samples select the class, n fresh ones estimate its probability
PHI = NormalDist()  # the standard normal: PHI.cdf, PHI.inv_cdf (exact to double precision, fast for scalars)


# ----------------------------------------------------------------------------------------------------
# The smoothed classifier

class Smooth:
    """The smoothed classifier g of a base classifier: any torch.nn.Module or callable mapping a batch of noisy
    inputs [b, *x.shape] -- in the same space as x -- to logits [b, num_classes].

    batch:    noisy copies per forward pass (a multiple of CHUNK).
    seed:     the noise seed; with an input's `key` it fixes that input's noise (see `gaussian_noise`).
    compile:  torch.compile the noise loop (noise add, classifier, argmax); `warm_up` compiles it ahead.
    autocast: a dtype (torch.bfloat16) to run the classifier under torch.autocast, or None for full precision.
              A lower precision is another deterministic base classifier: its certificates are as sound.
    """

    def __init__(self, base_classifier: Callable[[torch.Tensor], torch.Tensor], num_classes: int, sigma: float, *,
                 batch: int = 1000, seed: int = 0, compile: bool = False, autocast: torch.dtype | None = None):
        if batch < CHUNK or batch % CHUNK:
            raise ValueError(f"batch must be a multiple of {CHUNK}, got {batch}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be > 0 and finite, got {sigma}")
        self.base_classifier, self.num_classes, self.sigma = base_classifier, num_classes, sigma
        self.batch, self.seed, self.autocast = batch, seed, autocast
        self.decisions = torch.compile(self._decisions) if compile else self._decisions

    def _decisions(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """f(x + sigma eps) for a batch of noise."""
        return self.base_classifier(x[None] + self.sigma * eps).argmax(1)

    def _precision(self, device: torch.device):
        return torch.autocast(device.type, self.autocast) if self.autocast is not None else contextlib.nullcontext()

    @torch.no_grad()
    def counts(self, x: torch.Tensor, num: int, *, key: int = 0, phase: int = ESTIMATE, first: int = 0,
               tick: Callable[[int], None] | None = None) -> np.ndarray:
        """Class counts of f(x + sigma eps) over samples first .. num - 1 of (key, phase); `tick(b)` after each
        batch of b samples (progress). Counted on x's device: one host sync per call."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        with self._precision(x.device):
            for start in range(first, num, self.batch):
                eps = gaussian_noise(tuple(x.shape), start, min(self.batch, num - start), self.seed, key, phase, x.device)
                counts += torch.bincount(self.decisions(x, eps), minlength=self.num_classes)
                if tick:
                    tick(len(eps))
        return counts.cpu().numpy()

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, *, key: int = 0, tick=None) -> tuple[int, float]:
        """CERTIFY (Cohen et al.): (cA, radius) or (ABSTAIN, 0.0). With probability at least 1 - alpha over the
        noise, if it does not abstain, g returns cA at every x' with ||x' - x||_2 < radius."""
        counts0 = self.counts(x, n0, key=key, phase=SELECT, tick=tick)
        return certify_from_counts(counts0, self.counts(x, n, key=key, phase=ESTIMATE, tick=tick), n, alpha, self.sigma)

    def certify_adaptive(self, x: torch.Tensor, n0: int, plan: "AdaptivePlan", *, key: int = 0, tick=None) -> tuple[int, float, int]:
        """Adaptive CERTIFY (`certify_adaptive`): (cA or ABSTAIN, radius, estimation samples drawn), with CERTIFY's
        guarantee at plan.alpha. The samples drawn are the first ones of CERTIFY's with plan.n: an image that
        goes to n sees exactly CERTIFY's counts."""
        if plan.sigma != self.sigma:
            raise ValueError(f"the plan is for sigma {plan.sigma}, this classifier smooths at sigma {self.sigma}")
        drawn = [0, np.zeros(self.num_classes, dtype=np.int64)]  # samples drawn so far and their counts

        def estimate(m: int) -> np.ndarray:
            drawn[1] = drawn[1] + self.counts(x, m, key=key, phase=ESTIMATE, first=drawn[0], tick=tick)
            drawn[0] = m
            return drawn[1]
        return certify_adaptive(self.counts(x, n0, key=key, phase=SELECT, tick=tick), estimate, plan)

    def predict(self, x: torch.Tensor, n: int, alpha: float, *, key: int = 0, tick=None) -> int:
        """PREDICT (Cohen et al.): g(x) or ABSTAIN; with probability at least 1 - alpha it is not a class other
        than g(x)."""
        return predict_from_counts(self.counts(x, n, key=key, phase=ESTIMATE, tick=tick), alpha)

    def warm_up(self, x: torch.Tensor, n0: int, looks: list[int]) -> None:
        """Run the classifier once at every batch size that n0 selection samples and estimation up to each of
        `looks` will use, so that torch.compile compiles now and not inside the first input's time."""
        spans = [(0, n0)] + list(zip([0, *looks[:-1]], looks))
        sizes = {min(self.batch, end - start) for first, end in spans for start in range(first, end, self.batch)}
        with torch.no_grad(), self._precision(x.device):
            for size in sorted(sizes):
                self.decisions(x, torch.zeros(size, *x.shape, device=x.device))


# ----------------------------------------------------------------------------------------------------
# Statistics: functions of the class counts alone

def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n:
    with probability at least 1 - alpha over the samples it is <= the true proportion."""
    return 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha))  # the Beta(k, n - k + 1) quantile at alpha


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion from k successes in n."""
    return 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha))


def radius_from_bound(p_lower: float, sigma: float) -> float | None:
    """sigma Phi^-1(pA_lower), the certified L2 radius; None (abstain) when pA_lower < 1/2."""
    return None if p_lower < 0.5 else sigma * PHI.inv_cdf(p_lower)


def certify_from_counts(counts0: np.ndarray, counts: np.ndarray, n: int, alpha: float, sigma: float) -> tuple[int, float]:
    """CERTIFY from the selection counts (n0 samples) and independent estimation counts (n samples):
    cA = the most frequent class of the selection; pA_lower = the (1 - alpha) lower bound from counts[cA] of n;
    abstain if pA_lower < 1/2, else (cA, sigma Phi^-1(pA_lower)).
    Guarantee: with probability at least 1 - alpha over the noise, if it does not abstain, g(x') = cA for every
    ||x' - x||_2 < radius (and in particular cA = g(x))."""
    c_a = int(np.argmax(counts0))
    radius = radius_from_bound(lower_confidence_bound(int(counts[c_a]), n, alpha), sigma)
    return (ABSTAIN, 0.0) if radius is None else (c_a, radius)


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT: the top class, unless a two-sided binomial test of the top two counts has p-value > alpha
    (abstain). Guarantee: with probability at least 1 - alpha it does not return a class other than g(x)."""
    top2 = np.argsort(counts)[::-1][:2]
    return ABSTAIN if sign_test_pvalue(int(counts[top2[0]]), int(counts[top2[1]])) > alpha else int(top2[0])


def sign_test_pvalue(n_a: int, n_b: int) -> float:
    """Two-sided p-value of n_a against n_b under Bin(n_a + n_b, 1/2) (the binomial test PREDICT uses): the
    distribution is symmetric, so it is twice the tail P(X <= min(n_a, n_b)), at most 1."""
    return min(1.0, 2 * float(bdtr(min(n_a, n_b), n_a + n_b, 0.5)))


def largest_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius n samples can certify at level alpha: all n correct, pA_lower = alpha^(1/n)."""
    return radius_from_bound(lower_confidence_bound(n, n, alpha), sigma) or 0.0


# ----------------------------------------------------------------------------------------------------
# Noise: one seeded stream per (seed, key, phase, chunk of CHUNK samples)

_M32 = 0xFFFFFFFF


def _mix32(v: int) -> int:
    """MurmurHash3's finaliser: a bijection of 32-bit integers that scatters neighbouring values."""
    v ^= v >> 16
    v = (v * 0x85EBCA6B) & _M32
    v ^= v >> 13
    v = (v * 0xC2B2AE35) & _M32
    return v ^ (v >> 16)


def stream_seed(seed: int, key: int, phase: int, chunk: int) -> int:
    """The 63-bit generator seed of samples chunk*CHUNK .. chunk*CHUNK + CHUNK - 1 of input `key` in `phase`.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so seeds that differ only above bit 31
    give the same noise; CUDA's Philox keeps all 64. So the low 32 bits are mix32(base + 2 chunk + phase), with
    base a hash of (seed, key): distinct for every (phase, chunk) of one input, because 2 chunk + phase < 2^32
    and mix32 is a bijection -- no sample of an input is ever counted twice, in either phase. The high 31 bits
    are more of the same hash, which separates the inputs' streams on CUDA too. (Hashed 63-bit seeds per chunk,
    as before, collided within an image with probability 1.2e-4 at n = 100,000.)"""
    if not 0 <= chunk < 2 ** 31 or phase not in (SELECT, ESTIMATE):
        raise ValueError(f"chunk {chunk} must be in [0, 2^31) and phase {phase} SELECT or ESTIMATE")
    base = int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "little")
    return (base >> 33) << 32 | _mix32((base + 2 * chunk + phase) & _M32)


def gaussian_noise(shape: tuple, first: int, count: int, seed: int, key: int, phase: int, device: torch.device) -> torch.Tensor:
    """eps ~ N(0, I) for samples first .. first + count - 1 of (seed, key, phase): [count, *shape]. A sample's
    noise depends on its number alone, not on the batch or process that draws it (on one device type; CPU and
    CUDA generators differ)."""
    chunks = range(first // CHUNK, (first + count - 1) // CHUNK + 1)
    eps = torch.cat([torch.randn((CHUNK, *shape), device=device,
                                 generator=torch.Generator(device).manual_seed(stream_seed(seed, key, phase, c))) for c in chunks])
    offset = first - chunks[0] * CHUNK
    return eps[offset:offset + count]


# ----------------------------------------------------------------------------------------------------
# Adaptive CERTIFY: the same estimation samples, looked at in stages, stopping once more cannot matter

LAST_LOOK_SHARE = 0.99  # of alpha, spent at n; the earlier looks share the other 1 % (see `split_alpha`)


def default_looks(n: int) -> list[int]:
    """The looks 100, 200, 400, 800, ... (doubling) below n, then n (n = 100,000: eleven looks, the last two
    51,200 and 100,000). Simulated on the mix of tests/test_adaptive.py (bench/README.md), looks x2 apart need
    15.8x fewer samples than n; x10 apart 7.3x, x3 13.0x, 1-2-5 15.1x; x1.41 apart (20 looks) 18.2x, but each
    look ends a batch early and syncs with the host, which a GPU pays for in time that sample counts hide."""
    looks = []
    while CHUNK * 2 ** len(looks) < n:
        looks.append(CHUNK * 2 ** len(looks))
    return looks + [n]


def split_alpha(alpha: float, looks: list[int]) -> list[float]:
    """alpha_k for each look, summing to alpha: LAST_LOOK_SHARE of it at the last look (n), the rest evenly
    over the earlier ones. Any split that sums to alpha keeps the union-bound guarantee. The images that need
    every sample are decided by the last look, so its bound should be as close to fixed-n CERTIFY's as possible;
    the early looks only decide clear cases, where a smaller alpha_k costs little (the bound's width grows like
    sqrt(log 1 / alpha_k)). Simulated (bench/README.md): 90 % at n saves 9 % more samples than 99 % but lets
    10x as many table rows differ from fixed-n's (0.06 % instead of 0.006 % at sigma 0.25); 99.9 % costs 8 %."""
    if len(looks) == 1:
        return [alpha]
    early = [alpha * (1 - LAST_LOOK_SHARE) / (len(looks) - 1)] * (len(looks) - 1)
    return early + [alpha - sum(early)]


def _smallest(holds: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest integer c in [low, high] where `holds` (false, then true as c grows) is true; high + 1 if none."""
    high += 1
    while low < high:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid + 1
    return low


class AdaptivePlan:
    """What adaptive CERTIFY needs, fixed before any sample is drawn: the looks n_1 < ... < n_K = n, each look's
    level alpha_k (`split_alpha`, summing to alpha), the radii the certified-accuracy table reports, and from
    them integer thresholds on the count nA:
      certifies[k][j]:    the smallest nA of n_k samples whose (1 - alpha_k) bound certifies radii[j];
      out_of_reach[k][j]: the largest nA of n_k samples at which radii[j] is out of reach at n: even if pA were
                          its (1 - alpha) upper confidence bound, nA plus that share of the remaining n - n_k
                          samples would fall short of certifies[K][j].
    Radii above what n samples can certify at alpha_K are dropped (only 0 if nothing else fits)."""

    def __init__(self, n: int, alpha: float, sigma: float, radii: list[float], looks: list[int] | None = None):
        if not (0 < alpha < 1 and sigma > 0 and n >= 1):
            raise ValueError(f"need 0 < alpha < 1, sigma > 0, n >= 1; got alpha {alpha}, sigma {sigma}, n {n}")
        looks = default_looks(n) if looks is None else sorted({m for m in looks if 0 < m < n} | {n})
        self.n, self.alpha, self.sigma, self.looks = n, alpha, sigma, looks
        self.alphas = split_alpha(alpha, looks)
        top = largest_radius(n, self.alphas[-1], sigma)
        self.radii = [float(r) for r in sorted(set(radii)) if 0 <= r <= top] or [0.0]
        self.certifies = [[self._smallest_certifying(m, a, r) for r in self.radii] for m, a in zip(looks, self.alphas)]
        need = self.certifies[-1]
        self.out_of_reach = [[self._largest_out_of_reach(m, c) for c in need] for m in looks[:-1]]

    def _smallest_certifying(self, m: int, alpha_k: float, r: float) -> int:
        def certified(c: int) -> bool:
            radius = radius_from_bound(lower_confidence_bound(c, m, alpha_k), self.sigma)
            return radius is not None and radius >= r
        return _smallest(certified, 0, m)

    def _largest_out_of_reach(self, m: int, need: int) -> int:
        # The futility level is alpha itself: how early a hopeless image stops, traded against how often the
        # optimistic continuation is wrong (then the image's row is lower than fixed-n's); it never touches
        # the guarantee, which rests on the certifying bounds alone. Simulated: 10 alpha saves 13 % of the
        # samples and lets 0.06 % of rows differ; alpha / 10 costs 9 % and none differ.
        reach = lambda c: c + math.ceil(upper_confidence_bound(c, m, self.alpha) * (self.n - m)) >= need
        return _smallest(reach, 0, m) - 1

    def row(self, k: int, n_a):
        """Index of the largest reported radius certified by nA of looks[k] samples, -1 if none (array or int)."""
        return np.searchsorted(self.certifies[k], n_a, side="right") - 1

    def stops(self, k: int, n_a):
        """Whether sampling stops after look k with count nA: the last look, or the largest reported radius
        is certified, or the next reported radius is out of reach at n (array or bool)."""
        if k == len(self.looks) - 1:
            return np.ones_like(n_a, dtype=bool)
        row = self.row(k, n_a)
        following = np.minimum(row + 1, len(self.radii) - 1)
        return (row == len(self.radii) - 1) | (n_a <= np.asarray(self.out_of_reach[k])[following])

    def radius(self, k: int, n_a: int) -> float | None:
        """The certified radius from nA of looks[k] samples at alpha_k; None to abstain."""
        return radius_from_bound(lower_confidence_bound(int(n_a), self.looks[k], self.alphas[k]), self.sigma)

    def replay(self, wins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """certify_adaptive's stopping rule over many sample paths at once (simulations, benchmarks):
        wins[i, k] = nA among the first looks[k] samples of path i. Returns each path's stopping look index and
        its nA there; `radius` of those is what certify_adaptive returns."""
        stop = np.full(len(wins), len(self.looks) - 1)
        running = np.ones(len(wins), dtype=bool)
        for k in range(len(self.looks) - 1):
            now = running & self.stops(k, wins[:, k])
            stop[now] = k
            running &= ~now
        return stop, wins[np.arange(len(wins)), stop]

    def describe(self) -> str:
        return (f"looks {self.looks} at alpha {self.alphas[0]:.3g} each, the last at {self.alphas[-1]:.6g}; "
                f"radii {self.radii}")


def certify_adaptive(counts0: np.ndarray, estimate: Callable[[int], np.ndarray], plan: AdaptivePlan) -> tuple[int, float, int]:
    """Adaptive CERTIFY: (prediction or ABSTAIN, radius, estimation samples drawn).

    cA is selected from counts0 exactly as in CERTIFY; `estimate(m)` returns the class counts of the first m
    estimation samples (m = each look of `plan` in turn, until it stops). After look k the count nA of the
    first n_k samples gives pA_lower_k, the (1 - alpha_k) Clopper-Pearson bound, and sampling stops once the
    largest reported radius is certified or the next one is out of reach at n (`AdaptivePlan`), or at n.
    It returns CERTIFY's decision from pA_lower_k at the look where it stopped.

    Guarantee (CERTIFY's): with probability at least 1 - alpha over the noise, if it does not abstain, the
    smoothed classifier g returns cA at every x' with ||x' - x||_2 < radius. Proof: the first n_k samples are
    i.i.d. whatever the stopping rule, so P(pA_lower_k > pA) <= alpha_k for each fixed k; a wrong certificate
    needs this at the look where it stopped, so its probability is at most sum_k alpha_k = alpha (union
    bound), whatever the stopping rule.

    The price, at the same n: (1) the bound at n uses alpha_K = 0.99 alpha, so the radius is a hair smaller
    than CERTIFY's (the largest at n = 100,000 is 3.8111 sigma instead of 3.8115 sigma); (2) an image stops
    once it certifies the largest reported radius, so its radius is cut there and the ACR is lower than
    CERTIFY's; (3) an image stopped as out of reach could have reached the next radius at n, and the last
    look's smaller alpha can drop an image just over a threshold: its table row (the largest reported radius
    it certifies) differs from CERTIFY's on the same samples for 0.006 % of the images of the simulated mix
    in tests/test_adaptive.py (limit asserted there: 0.2 %), at 1/16 of the samples (bench/README.md).
    Radii are never rounded up: the bounds are exact Clopper-Pearson."""
    c_a = int(np.argmax(counts0))
    for k, n_k in enumerate(plan.looks):
        n_a = int(estimate(n_k)[c_a])
        if plan.stops(k, n_a):
            break
    radius = plan.radius(k, n_a)
    return (ABSTAIN, 0.0, n_k) if radius is None else (c_a, radius, n_k)
