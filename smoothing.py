"""Randomized smoothing (Cohen et al. 2019) for any base classifier: CERTIFY, PREDICT and adaptive CERTIFY.

A base classifier f maps a batch of noisy inputs x + sigma eps (eps ~ N(0, I), in x's own space) to logits.
The smoothed classifier is g(x) = argmax_c P(f(x + sigma eps) = c). If f returns cA with probability at
least pA > 1/2, g returns cA at every x' with ||x' - x||_2 < sigma Phi^-1(pA) (Cohen et al., Theorem 1);
CERTIFY estimates pA from samples, so its radius holds with probability at least 1 - alpha.

    import smoothing
    smooth = smoothing.Smooth(classifier.eval(), num_classes=10, sigma=0.25)        # noisy inputs -> logits
    prediction, radius = smooth.certify(x, n0=100, n=100_000, alpha=0.001, key=i)  # prediction -1: abstain
    plan = smoothing.AdaptivePlan(n=100_000, alpha=0.001, sigma=0.25, radii=[0, 0.25, 0.5, 0.75, 1.0])
    prediction, radius, samples = smooth.certify_adaptive(x, n0=100, plan=plan, key=i)

What it needs, and refuses otherwise (a ValueError naming the argument: a certificate is a security claim,
so a misuse must not produce one):
  x           one input, no batch dimension: a float32 or float64 torch.Tensor, finite, in the space the radius
              is measured in (pixels in [0, 1]: the radius is in those units; uint8 pixels are refused).
  classifier  a torch.nn.Module in eval mode (train mode makes BatchNorm couple the samples of a batch, so
              they are no longer independent, and dropout makes them random), or a plain function, which
              cannot be checked for it. It gets [b, *x.shape] and must return finite floating-point logits
              [b, num_classes]; rows with NaN or inf are counted on the device and refused after the phase.
  key         an int naming the input, e.g. its index in the test set. It seeds the input's noise, so each
              input needs its own: with one key for all, every input would get the same noise, and one
              unlucky draw would make many certificates wrong at once instead of alpha of them at random.

The shape is locuslab/smoothing's core.py; what differs: the class counts are kept on the device (one host
sync per phase, not one per batch, and one per call to check x), the noise loop can be torch.compile'd and run
under autocast, and the noise is seeded per (seed, key, phase, chunk of 100 samples), so a result depends
neither on the batch size nor on which process certifies which input. The statistics are plain functions of the counts
(`certify_from_counts`, `predict_from_counts`, `certify_adaptive`), so they can be checked, replayed and
simulated without a model.
"""
import contextlib
import hashlib
import itertools
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
AUTOCAST = (None, torch.bfloat16, torch.float16)  # what Smooth's autocast= takes


# ----------------------------------------------------------------------------------------------------
# The smoothed classifier

class Smooth:
    """The smoothed classifier g of a base classifier: a torch.nn.Module in eval mode, or a function, mapping a
    batch of noisy inputs [b, *x.shape] -- in the same space as x -- to logits [b, num_classes].

    batch:    noisy copies per forward pass (a multiple of CHUNK).
    seed:     the noise seed; with an input's `key` it fixes that input's noise (see `gaussian_noise`).
    compile:  torch.compile the noise loop (noise add, classifier, argmax); `warm_up` compiles it ahead.
    autocast: torch.bfloat16 or torch.float16 to run the classifier under torch.autocast, or None for full precision.
              A lower precision is another deterministic base classifier: its certificates are as sound.
    A Module's inputs go to the device and dtype of its parameters: x is moved there, and for a 16-bit model the
    noise is added in x's precision and the noisy batch rounded to the model's dtype -- the rounding is part of
    the deterministic base classifier, so the certificate stays sound (noise drawn in 16 bits would not be).
    """

    def __init__(self, base_classifier: Callable[[torch.Tensor], torch.Tensor], num_classes: int, sigma: float, *,
                 batch: int = 1000, seed: int = 0, compile: bool = False, autocast: torch.dtype | None = None):
        if not callable(base_classifier):
            raise ValueError(f"base_classifier must be a torch.nn.Module or a function, got {type(base_classifier).__name__}")
        if _integer("batch", batch, CHUNK) % CHUNK:
            raise ValueError(f"batch must be a multiple of {CHUNK}, got {batch}")
        if not any(autocast is a for a in AUTOCAST) or not isinstance(compile, bool):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16 (got {autocast!r}); "
                             f"compile a bool (got {compile!r})")
        self.base_classifier, self.num_classes = base_classifier, _integer("num_classes", num_classes, 2)
        self.sigma, self.batch, self.seed, self.autocast = _positive("sigma", sigma), batch, _integer("seed", seed), autocast
        self.dtype = getattr(_weight(base_classifier), "dtype", None)  # the classifier's input dtype (None: x's own)
        self.decisions = torch.compile(self._decisions) if compile else self._decisions
        # Compiled, the logits' check is a graph break: an exception raised while Dynamo traces would make it stop
        # compiling the loop for good. Wrapped only then: torch.compiler.disable imports Dynamo, 1.7 s of every start.
        self._check_logits = torch.compiler.disable(_check_logits) if compile else _check_logits

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, *, key: int, tick=None) -> tuple[int, float]:
        """CERTIFY (Cohen et al.): (cA, radius) or (ABSTAIN, 0.0). With probability at least 1 - alpha over the
        noise, if it does not abstain, g returns cA at every x' with ||x' - x||_2 < radius."""
        n0, n, alpha, key, x = _integer("n0", n0, 1), _integer("n", n, 1), _level(alpha), _integer("key", key), self._input(x)
        counts0 = self._count(x, n0, key, SELECT, tick=tick)
        return certify_from_counts(counts0, self._count(x, n, key, ESTIMATE, tick=tick), n, alpha, self.sigma)

    def predict(self, x: torch.Tensor, n: int, alpha: float, *, key: int, tick=None) -> int:
        """PREDICT (Cohen et al.): g(x) or ABSTAIN; with probability at least 1 - alpha it is not a class other
        than g(x)."""
        n, alpha, key = _integer("n", n, 1), _level(alpha), _integer("key", key)
        return predict_from_counts(self._count(self._input(x), n, key, ESTIMATE, tick=tick), alpha)

    def certify_adaptive(self, x: torch.Tensor, n0: int, plan: "AdaptivePlan", *, key: int,
                         tick=None) -> tuple[int, float, int]:
        """Adaptive CERTIFY (`certify_adaptive`): (cA or ABSTAIN, radius, estimation samples drawn), with CERTIFY's
        guarantee at plan.alpha. The samples drawn are the first ones of CERTIFY's with plan.n: an image that
        goes to n sees exactly CERTIFY's counts."""
        if not isinstance(plan, AdaptivePlan) or plan.sigma != self.sigma:
            raise ValueError(f"plan must be an AdaptivePlan for this classifier's sigma {self.sigma}, got "
                             + (f"one for sigma {plan.sigma}" if isinstance(plan, AdaptivePlan) else type(plan).__name__))
        n0, key, x = _integer("n0", n0, 1), _integer("key", key), self._input(x)
        drawn = [0, np.zeros(self.num_classes, dtype=np.int64)]  # samples drawn so far and their counts

        def estimate(m: int) -> np.ndarray:
            drawn[1] = drawn[1] + self._count(x, m, key, ESTIMATE, first=drawn[0], tick=tick)
            drawn[0] = m
            return drawn[1]
        return certify_adaptive(self._count(x, n0, key, SELECT, tick=tick), estimate, plan)

    def counts(self, x: torch.Tensor, num: int, *, key: int, phase: int = ESTIMATE, first: int = 0,
               tick: Callable[[int], None] | None = None) -> np.ndarray:
        """Class counts of f(x + sigma eps) over samples first .. num - 1 of (key, phase); `tick(b)` after each
        batch of b samples (progress). Counted on the classifier's device: one host sync per call (and one to check x)."""
        first = _integer("first", first, 0)
        num = _integer("num", num, first + 1)
        if phase not in (SELECT, ESTIMATE):
            raise ValueError(f"phase must be SELECT or ESTIMATE, got {phase!r}")
        return self._count(self._input(x), num, _integer("key", key), phase, first, tick)

    def warm_up(self, x: torch.Tensor, n0: int, looks: list[int]) -> None:
        """Run the classifier once at every batch size that n0 selection samples and estimation up to each of
        `looks` will use, so that torch.compile compiles now and not inside the first input's time."""
        x, looks = self._input(x), [_integer("looks", m, 1) for m in looks]
        spans = [(0, _integer("n0", n0, 1))] + list(zip([0, *looks[:-1]], looks))
        sizes = {min(self.batch, end - start) for first, end in spans for start in range(first, end, self.batch)}
        with torch.no_grad(), self._precision(x.device):
            for size in sorted(sizes):
                self.decisions(x, torch.zeros(size, *x.shape, device=x.device, dtype=x.dtype))

    @torch.no_grad()
    def _count(self, x: torch.Tensor, num: int, key: int, phase: int, first: int = 0, tick=None) -> np.ndarray:
        """The noise loop: class counts of samples first .. num - 1, kept on the device until the phase ends."""
        counts = torch.zeros(self.num_classes + 1, dtype=torch.long, device=x.device)  # the last bin: non-finite logits
        with self._precision(x.device):
            for start in range(first, num, self.batch):
                size = min(self.batch, num - start)
                eps = gaussian_noise(tuple(x.shape), start, size, self.seed, key, phase, x.device, x.dtype)
                try:
                    counts += torch.bincount(self.decisions(x, eps), minlength=self.num_classes + 1)
                except (RuntimeError, TypeError, IndexError) as e:  # the classifier's own error on these inputs
                    if start == first and not isinstance(e, torch.OutOfMemoryError) and (refusal := self._refusal(x, eps, e)):
                        raise refusal from e
                    raise
                if tick:
                    tick(len(eps))
        counts = counts.cpu().numpy()
        if counts[-1]:
            raise ValueError(f"the classifier returned non-finite logits for {counts[-1]} of {num - first} noisy samples of "
                             f"input {key}: no certificate")
        return counts[:-1]

    def _decisions(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """f(x + sigma eps) for a batch of noise; num_classes where the logits are not finite (counted, then refused)."""
        noisy = x[None] + self.sigma * eps
        logits = self.base_classifier(noisy if self.dtype is None else noisy.to(self.dtype))
        self._check_logits(logits, len(eps), self.num_classes)  # shapes and types only: no host sync
        return torch.where(logits.isfinite().all(1), logits.argmax(1), self.num_classes)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x checked (`_check_input`), on the classifier's device; the classifier checked for train mode."""
        _check_input(x)
        if isinstance(self.base_classifier, torch.nn.Module):
            training = next((name for name, m in self.base_classifier.named_modules() if m.training), None)
            if training is not None:
                where = ".".join([type(self.base_classifier).__name__] + ([training] if training else []))
                raise ValueError(f"the classifier is in training mode ({where}.training is True): BatchNorm would make the "
                                 "noisy samples of a batch depend on each other and dropout makes them random; call .eval() "
                                 "on it first")
            weight = _weight(self.base_classifier)  # read again: the model may have been cast or moved since
            self.dtype = getattr(weight, "dtype", None)
            x = x if weight is None else x.to(weight.device)
        return x

    def _refusal(self, x: torch.Tensor, eps: torch.Tensor, error: Exception) -> ValueError | None:
        """The classifier's error on a first batch as one line with its likely cause; under torch.compile the
        error of an eager run (Dynamo's own says little), or None if that runs: then x is not the problem."""
        if self.decisions is not self._decisions:
            try:
                self._decisions(x, eps)
                return None
            except (RuntimeError, TypeError, IndexError) as eager:
                error = eager
        said = (str(error).strip() or "?").splitlines()[0]
        return ValueError(f"the classifier failed on a batch of noisy copies of x, {list(eps.shape)} {x.dtype} on {x.device} "
                          f"({type(error).__name__}: {said}); x must be one input without a batch dimension "
                          f"(x.shape is {list(x.shape)})")

    def _precision(self, device: torch.device):
        return torch.autocast(device.type, self.autocast) if self.autocast is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# Statistics: functions of the class counts alone

def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k successes in n:
    with probability at least 1 - alpha over the samples it is <= the true proportion."""
    (k, n), alpha = _successes(k, n), _level(alpha)
    return 0.0 if k == 0 else float(betaincinv(k, n - k + 1, alpha))  # the Beta(k, n - k + 1) quantile at alpha


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion from k successes in n."""
    (k, n), alpha = _successes(k, n), _level(alpha)
    return 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - alpha))


def radius_from_bound(p_lower: float, sigma: float) -> float | None:
    """sigma Phi^-1(pA_lower), the certified L2 radius; None (abstain) when pA_lower < 1/2."""
    if not 0 <= _real("p_lower", p_lower) <= 1:
        raise ValueError(f"p_lower must be in [0, 1], got {p_lower}")
    return None if p_lower < 0.5 else _positive("sigma", sigma) * PHI.inv_cdf(p_lower)


def certify_from_counts(counts0: np.ndarray, counts: np.ndarray, n: int, alpha: float, sigma: float) -> tuple[int, float]:
    """CERTIFY from the selection counts (n0 samples) and independent estimation counts (n samples):
    cA = the most frequent class of the selection; pA_lower = the (1 - alpha) lower bound from counts[cA] of n;
    abstain if pA_lower < 1/2, else (cA, sigma Phi^-1(pA_lower)).
    Guarantee: with probability at least 1 - alpha over the noise, if it does not abstain, g(x') = cA for every
    ||x' - x||_2 < radius (and in particular cA = g(x))."""
    counts0 = _counts("counts0", counts0)
    counts = _counts("counts", counts, _integer("n", n, 1), len(counts0))
    c_a = int(np.argmax(counts0))
    radius = radius_from_bound(lower_confidence_bound(int(counts[c_a]), n, alpha), sigma)
    return (ABSTAIN, 0.0) if radius is None else (c_a, radius)


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT: the top class, unless a two-sided binomial test of the top two counts has p-value > alpha
    (abstain). Guarantee: with probability at least 1 - alpha it does not return a class other than g(x)."""
    counts, alpha = _counts("counts", counts), _level(alpha)
    if len(counts) < 2:
        raise ValueError(f"counts must have at least two classes, got {len(counts)}")
    top2 = np.argsort(counts)[::-1][:2]
    return ABSTAIN if sign_test_pvalue(int(counts[top2[0]]), int(counts[top2[1]])) > alpha else int(top2[0])


def sign_test_pvalue(n_a: int, n_b: int) -> float:
    """Two-sided p-value of n_a against n_b under Bin(n_a + n_b, 1/2) (the binomial test PREDICT uses): the
    distribution is symmetric, so it is twice the tail P(X <= min(n_a, n_b)), at most 1."""
    n_a, n_b = _integer("n_a", n_a, 0), _integer("n_b", n_b, 0)
    return min(1.0, 2 * float(bdtr(min(n_a, n_b), n_a + n_b, 0.5)))


def largest_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius n samples can certify at level alpha: all n correct, pA_lower = alpha^(1/n); 0.0 if
    even that abstains (n < log2(1 / alpha))."""
    n = _integer("n", n, 1)
    return radius_from_bound(lower_confidence_bound(n, n, alpha), sigma) or 0.0


# ----------------------------------------------------------------------------------------------------
# Noise: one seeded stream per (seed, key, phase, chunk of CHUNK samples)

_M32 = 0xFFFFFFFF


def _mix32(v):
    """MurmurHash3's finaliser: a bijection of 32-bit integers that scatters neighbouring values (an int, or a
    uint64 array of them)."""
    v = v ^ (v >> 16)
    v = (v * 0x85EBCA6B) & _M32
    v = v ^ (v >> 13)
    v = (v * 0xC2B2AE35) & _M32
    return v ^ (v >> 16)


def stream_seed(seed: int, key: int, phase: int, chunk):
    """The 63-bit generator seed of samples chunk*CHUNK .. chunk*CHUNK + CHUNK - 1 of input `key` in `phase`
    (chunk: an int, or an integer array of them for many seeds at once).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so seeds that differ only above bit 31
    give the same noise; CUDA's Philox keeps all 64. So the low 32 bits are mix32(mix32(2 chunk + phase) + b)
    (mod 2^32), with b the low half of a hash of (seed, key):
    - within an input they are distinct for every (phase, chunk), since 2 chunk + phase < 2^32 and mix32 and the
      shift by b are bijections: no sample of an input is ever counted twice, in either phase;
    - two inputs share a stream only where mix32(v) - mix32(w) = b2 - b1: at scattered single chunks, at the
      birthday rate of random 32-bit seeds. b is added after the chunk number is mixed, not before: mix32(b +
      2 chunk + phase) would give inputs whose b differ by a small even number long runs of shared chunks. It is
      added, not XORed, since XOR would pair each shared (v, w) with a shared (w, v).
    The high 31 bits are more of the same hash, which separates the inputs' streams on CUDA too."""
    chunks = np.asarray(chunk)
    in_range = chunks.size == 0 or 0 <= chunks.min() <= chunks.max() < 2 ** 31
    if phase not in (SELECT, ESTIMATE) or chunks.dtype.kind not in "iu" or not in_range:
        raise ValueError(f"chunk {chunk} must be integers in [0, 2^31) and phase {phase} SELECT or ESTIMATE")
    name = f"{_integer('seed', seed)}/{_integer('key', key)}".encode()
    base = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little")
    seeds = (base >> 33) << 32 | _mix32((_mix32(2 * chunks.astype(np.uint64) + phase) + (base & _M32)) & _M32)
    return seeds if isinstance(chunk, np.ndarray) else int(seeds)


def gaussian_noise(shape: tuple, first: int, count: int, seed: int, key: int, phase: int, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps ~ N(0, I) for samples first .. first + count - 1 of (seed, key, phase): [count, *shape]. A sample's
    noise depends on its number alone, not on the batch or process that draws it (on one device type and dtype;
    CPU and CUDA generators differ, and float64 draws are not float32 draws)."""
    chunks = np.arange(first // CHUNK, (first + count - 1) // CHUNK + 1)
    eps = torch.cat([torch.randn((CHUNK, *shape), device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(s))
                     for s in stream_seed(seed, key, phase, chunks).tolist()])
    offset = first - int(chunks[0]) * CHUNK
    return eps[offset:offset + count]


# ----------------------------------------------------------------------------------------------------
# Adaptive CERTIFY: the same estimation samples, looked at in stages, stopping once more cannot matter

LAST_LOOK_SHARE = 0.99  # of alpha, spent at n; the earlier looks share the other 1 % (see `split_alpha`)


def default_looks(n: int) -> list[int]:
    """The looks 100, 200, 400, 800, ... (doubling) below n, then n (n = 100,000: eleven looks, the last two
    51,200 and 100,000). Closer looks stop images sooner, but each look ends a batch early and syncs with the
    host, which a GPU pays for in time that sample counts hide; doubling keeps the looks few (the designs
    compared: bench/adaptive.md)."""
    looks = []
    while CHUNK * 2 ** len(looks) < n:
        looks.append(CHUNK * 2 ** len(looks))
    return looks + [n]


def split_alpha(alpha: float, looks: list[int]) -> list[float]:
    """alpha_k for each look, summing to alpha: LAST_LOOK_SHARE of it at the last look (n), the rest evenly
    over the earlier ones. Any split that sums to alpha keeps the union-bound guarantee. The images that need
    every sample are decided by the last look, so its bound should be as close to fixed-n CERTIFY's as possible;
    the early looks only decide clear cases, where a smaller alpha_k costs little (the bound's width grows like
    sqrt(log 1 / alpha_k)). A smaller share at n saves samples but lets more table rows differ from fixed-n
    CERTIFY's (the shares compared: bench/adaptive.md)."""
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
    Radii above what n samples can certify at alpha_K are left out (`beyond`, said by `describe`); a ValueError
    if none is left."""

    def __init__(self, n: int, alpha: float, sigma: float, radii: list[float], looks: list[int] | None = None):
        n, alpha, sigma = _integer("n", n, 1), _level(alpha), _positive("sigma", sigma)
        requested = sorted({_real("radii", r) for r in radii})
        if not requested or not all(math.isfinite(r) and r >= 0 for r in requested):
            raise ValueError(f"radii must be finite and >= 0, at least one, got {list(radii)}")
        looks = default_looks(n) if looks is None else [_integer("looks", m) for m in looks]
        looks = sorted({m for m in looks if 0 < m < n} | {n})
        self.n, self.alpha, self.sigma, self.looks = n, alpha, sigma, looks
        self.alphas = split_alpha(alpha, looks)
        self.top = radius_from_bound(lower_confidence_bound(n, n, self.alphas[-1]), sigma)  # None: n certifies nothing
        self.radii = [r for r in requested if self.top is not None and r <= self.top]
        self.beyond = [r for r in requested if r not in self.radii]
        if not self.radii:
            raise ValueError(f"no radius of {requested} is within reach: {self.reach()}")
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
        # the guarantee, which rests on the certifying bounds alone (other levels compared: bench/adaptive.md).
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

    def reach(self) -> str:
        """What n samples can certify at sigma and the last look's level, in words."""
        alpha = self.alphas[-1]
        if self.top is None:  # all n correct give pA_lower = alpha^(1/n) < 1/2
            need = math.ceil(math.log2(1 / alpha))
            return f"n = {self.n:,} samples certify nothing at alpha {alpha:.6g} (n must be at least {need})"
        top = math.floor(self.top * 1e4) / 1e4  # rounded down, as the TSV's radii
        return f"n = {self.n:,} samples at sigma {self.sigma:g} certify at most {top:.4f} at alpha {alpha:.6g}"

    def describe(self) -> str:
        beyond = f"; {', '.join(f'{r:g}' for r in self.beyond)} beyond reach: {self.reach()}" if self.beyond else ""
        return (f"looks {self.looks} at alpha {self.alphas[0]:.3g} each, the last at {self.alphas[-1]:.6g}; "
                f"radii {self.radii}{beyond}")


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
    it certifies) can differ from CERTIFY's on the same samples: for a small share of images, which
    tests/test_adaptive.py bounds (the figures, and the samples saved: bench/README.md).
    Radii are never rounded up: the bounds are exact Clopper-Pearson."""
    if not isinstance(plan, AdaptivePlan):
        raise ValueError(f"plan must be an AdaptivePlan, got {type(plan).__name__}")
    counts0 = _counts("counts0", counts0)
    c_a = int(np.argmax(counts0))
    for k, n_k in enumerate(plan.looks):
        n_a = int(_counts(f"estimate({n_k})", estimate(n_k), n_k, len(counts0))[c_a])
        if plan.stops(k, n_a):
            break
    radius = plan.radius(k, n_a)
    return (ABSTAIN, 0.0, n_k) if radius is None else (c_a, radius, n_k)


# ----------------------------------------------------------------------------------------------------
# Checks: what would make a certificate wrong or meaningless is refused, in one line naming the argument

def _weight(classifier) -> torch.Tensor | None:
    """A Module's first floating-point parameter or buffer, whose device and dtype its inputs need; None for a function."""
    if not isinstance(classifier, torch.nn.Module):
        return None
    return next((t for t in itertools.chain(classifier.parameters(), classifier.buffers()) if t.is_floating_point()), None)


def _check_input(x) -> None:
    """x: one finite float32 / float64 tensor (one host sync, per call: not per batch)."""
    if not isinstance(x, torch.Tensor):
        hint = ": torch.from_numpy(x)" if isinstance(x, np.ndarray) else ""
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.dtype not in (torch.float32, torch.float64):
        fast = "pass x.float(), and autocast= for a fast classifier"
        hint = {torch.uint8: "x.float() / 255 for pixels in [0, 1]: radii are in x's units",
                torch.bfloat16: f"noise added in 16 bits is rounded to 8 bits; {fast}",
                torch.float16: f"noise added in 16 bits is rounded to 11 bits; {fast}"}
        raise ValueError(f"x must be float32 or float64, got {x.dtype}" + (f" ({hint[x.dtype]})" if x.dtype in hint else ""))
    if x.dim() == 0 or not torch.isfinite(x).all():
        raise ValueError(f"x must be one input of at least one dimension with finite entries, got "
                         + ("a scalar" if x.dim() == 0 else f"{int((~torch.isfinite(x)).sum())} NaN or inf of {x.numel()}"))


def _check_logits(logits, b: int, num_classes: int) -> None:
    """The classifier's output must be floating-point logits [b, num_classes] for b noisy inputs."""
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and tuple(logits.shape) == (b, num_classes):
        return
    got = f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
    alone = " (return the logits tensor alone)" if isinstance(logits, (tuple, list, dict)) else ""
    raise ValueError(f"the classifier must return floating-point logits [batch, num_classes] = [{b}, {num_classes}] for a "
                     f"batch of {b} noisy inputs, got {got}{alone}")


def _integer(name: str, value, low: int | None = None) -> int:
    """An int (numpy's too; not a bool or a float, even 1e4: a count or a key is exact), at least `low`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        hint = f": use float({name})" if isinstance(value, torch.Tensor) else ""
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    return float(value)


def _level(alpha) -> float:
    """alpha in (0, 1): 0 or 1 (or NaN) makes the bound meaningless."""
    if not 0 < _real("alpha", alpha) < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(alpha)


def _positive(name: str, value) -> float:
    if not (math.isfinite(_real(name, value)) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    return float(value)


def _successes(k, n) -> tuple[int, int]:
    """k of n: integers, 0 <= k <= n, n >= 1."""
    if _integer("k", k, 0) > _integer("n", n, 1):
        raise ValueError(f"k must be <= n, got k = {k} of n = {n}")
    return int(k), int(n)


def _counts(name: str, counts, total: int | None = None, length: int | None = None) -> np.ndarray:
    """A 1-D array of non-negative integer class counts of at least one sample: `total` of them if given (each
    sample counted once), over `length` classes if given."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or not len(counts) or counts.min() < 0 or length not in (None, len(counts)):
        classes = f" of {length} classes" if length else ""
        raise ValueError(f"{name} must be a 1-D array of non-negative integer counts{classes}, "
                         f"got {counts.dtype} {list(counts.shape)}")
    if counts.sum() < 1 or total not in (None, counts.sum()):
        raise ValueError(f"{name} must count each of the {total or 'n >= 1'} samples once, but sum to {counts.sum()}")
    return counts
