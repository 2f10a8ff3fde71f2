"""smoothing.py used wrongly, as a new user might (issue 22 tried 55 ways): every input that would make a
certificate wrong or meaningless is refused with one ValueError naming the argument, and the inputs it can
handle (float64 x, a bf16 model, numpy integers) get the right certificate. Each row of the tables is one misuse."""
import numpy as np
import pytest
import torch

import smoothing
from test_smoothing import ALPHA, SHAPE, SIGMA, at_distance, linear_classifier

F = linear_classifier()
X = at_distance(F, 0.25)
C = 2


def smooth(classifier=F, **kwargs) -> smoothing.Smooth:
    return smoothing.Smooth(classifier, C, SIGMA, batch=100, **kwargs)


def returning(output):
    """A classifier returning output(logits, z) instead of the logits of noisy batch z."""
    return lambda z: output(F(z), z)


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.head = torch.nn.BatchNorm1d(int(np.prod(SHAPE))), torch.nn.Linear(int(np.prod(SHAPE)), C)

    def forward(self, z):
        return self.head(self.norm(z.flatten(1)))


def with_dropout_training() -> torch.nn.Module:
    """Put in eval mode, then its dropout back in train mode."""
    model = torch.nn.Sequential(linear_classifier(), torch.nn.Dropout()).eval()
    model[1].train()
    return model


def conv_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(C)).eval()


# (what is wrong, the call, a substring of the refusal)
MISUSES = [
    # alpha: NaN radii, a class from predict(alpha=2), a StatisticsError traceback at 1
    ("alpha < 0", lambda: smooth().certify(X, 100, 1000, -0.1, key=0), "alpha must be in (0, 1), got -0.1"),
    ("alpha > 1", lambda: smooth().certify(X, 100, 1000, 1.5, key=0), "alpha must be in (0, 1), got 1.5"),
    ("alpha = 1", lambda: smooth().certify(X, 100, 1000, 1.0, key=0), "alpha must be in (0, 1)"),
    ("alpha = 0", lambda: smooth().certify(X, 100, 1000, 0.0, key=0), "alpha must be in (0, 1)"),
    ("alpha NaN", lambda: smooth().certify(X, 100, 1000, float("nan"), key=0), "alpha must be in (0, 1), got nan"),
    ("predict alpha 2", lambda: smooth().predict(X, 1000, 2, key=0), "alpha must be in (0, 1)"),
    ("alpha a tensor", lambda: smooth().certify(X, 100, 1000, torch.tensor(0.001), key=0), "alpha must be a real number"),
    # sample counts: n0 = 0 always selected class 0, n <= 0 abstained silently, floats were tracebacks
    ("n0 = 0", lambda: smooth().certify(X, 0, 1000, ALPHA, key=0), "n0 must be >= 1, got 0"),
    ("n = 0", lambda: smooth().certify(X, 100, 0, ALPHA, key=0), "n must be >= 1, got 0"),
    ("n < 0", lambda: smooth().certify(X, 100, -5, ALPHA, key=0), "n must be >= 1, got -5"),
    ("n a float", lambda: smooth().certify(X, 100, 1e4, ALPHA, key=0), "n must be an integer, got 10000.0 (float)"),
    ("n0 a float", lambda: smooth().certify(X, 100.0, 1000, ALPHA, key=0), "n0 must be an integer"),
    ("n a bool", lambda: smooth().predict(X, True, ALPHA, key=0), "n must be an integer, got True (bool)"),
    ("counts num 0", lambda: smooth().counts(X, 0, key=0), "num must be >= 1"),
    ("counts phase", lambda: smooth().counts(X, 100, key=0, phase=2), "phase must be SELECT or ESTIMATE"),
    # key: key='3' equalled key=3 but key=3.0 did not
    ("key a str", lambda: smooth().certify(X, 100, 1000, ALPHA, key="3"), "key must be an integer, got '3' (str)"),
    ("key a float", lambda: smooth().certify(X, 100, 1000, ALPHA, key=3.0), "key must be an integer, got 3.0 (float)"),
    ("key a bool", lambda: smooth().predict(X, 1000, ALPHA, key=True), "key must be an integer, got True (bool)"),
    # the constructor
    ("sigma a tensor", lambda: smoothing.Smooth(F, C, torch.tensor(0.5)), "sigma must be a real number, got Tensor: use float(sigma)"),
    ("sigma 0", lambda: smoothing.Smooth(F, C, 0.0), "sigma must be > 0 and finite, got 0.0"),
    ("sigma < 0", lambda: smoothing.Smooth(F, C, -0.5), "sigma must be > 0 and finite"),
    ("sigma inf", lambda: smoothing.Smooth(F, C, float("inf")), "sigma must be > 0 and finite, got inf"),
    ("sigma NaN", lambda: smoothing.Smooth(F, C, float("nan")), "sigma must be > 0 and finite, got nan"),
    ("sigma a bool", lambda: smoothing.Smooth(F, C, True), "sigma must be a real number, got bool"),
    ("one class", lambda: smoothing.Smooth(F, 1, SIGMA), "num_classes must be >= 2, got 1"),
    ("num_classes a float", lambda: smoothing.Smooth(F, 2.0, SIGMA), "num_classes must be an integer"),
    ("batch not of chunks", lambda: smoothing.Smooth(F, C, SIGMA, batch=150), "batch must be a multiple of 100, got 150"),
    ("batch below a chunk", lambda: smoothing.Smooth(F, C, SIGMA, batch=50), "batch must be >= 100, got 50"),
    ("seed a float", lambda: smoothing.Smooth(F, C, SIGMA, seed=1.5), "seed must be an integer"),
    ("autocast 'bf16'", lambda: smoothing.Smooth(F, C, SIGMA, autocast="bf16"), "autocast must be None, torch.bfloat16 or torch.float16 (got 'bf16')"),
    ("autocast True", lambda: smoothing.Smooth(F, C, SIGMA, autocast=True), "autocast must be None, torch.bfloat16 or torch.float16 (got True)"),
    ("autocast fp32", lambda: smoothing.Smooth(F, C, SIGMA, autocast=torch.float32), "autocast must be None"),
    ("compile 'yes'", lambda: smoothing.Smooth(F, C, SIGMA, compile="yes"), "compile a bool (got 'yes')"),
    ("not callable", lambda: smoothing.Smooth(torch.zeros(3), C, SIGMA), "base_classifier must be a torch.nn.Module or a function, got Tensor"),
    # x: uint8 and NaN were certified at the largest radius, numpy and batched x were tracebacks
    ("x numpy", lambda: smooth().certify(X.numpy(), 100, 1000, ALPHA, key=0), "x must be a torch.Tensor, got ndarray: torch.from_numpy(x)"),
    ("x a list", lambda: smooth().certify(X.tolist(), 100, 1000, ALPHA, key=0), "x must be a torch.Tensor, got list"),
    ("x uint8", lambda: smooth().certify((X * 255).to(torch.uint8), 100, 1000, ALPHA, key=0), "x must be float32 or float64, got torch.uint8 (x.float() / 255 for pixels in [0, 1]: radii are in x's units)"),
    ("x int64", lambda: smooth().certify(X.long(), 100, 1000, ALPHA, key=0), "x must be float32 or float64, got torch.int64"),
    ("x bf16", lambda: smooth().certify(X.bfloat16(), 100, 1000, ALPHA, key=0), "got torch.bfloat16 (noise added in 16 bits is rounded to 8 bits; pass x.float(), and autocast="),
    ("x fp16", lambda: smooth().certify(X.half(), 100, 1000, ALPHA, key=0), "got torch.float16 (noise added in 16 bits is rounded to 11 bits"),
    ("x a scalar", lambda: smooth().certify(torch.tensor(0.5), 100, 1000, ALPHA, key=0), "x must be one input of at least one dimension with finite entries, got a scalar"),
    ("x NaN", lambda: smooth().certify(torch.where(torch.arange(X.numel()).view(SHAPE) == 5, float("nan"), X), 100, 1000, ALPHA, key=0),
     "x must be one input of at least one dimension with finite entries, got 1 NaN or inf of 192"),
    ("x inf", lambda: smooth().predict(X.clone().fill_(float("inf")), 1000, ALPHA, key=0), "got 192 NaN or inf of 192"),
    ("x batched, a conv net", lambda: smooth(conv_net()).certify(X[None], 100, 1000, ALPHA, key=0),
     "the classifier failed on a batch of noisy copies of x, [100, 1, 3, 8, 8] torch.float32 on cpu (RuntimeError: "),
    # the classifier's mode: BatchNorm couples the samples, dropout makes them random
    ("BatchNorm in train mode", lambda: smooth(BatchNormNet()).certify(X, 100, 1000, ALPHA, key=0),
     "the classifier is in training mode (BatchNormNet.training is True): BatchNorm would make"),
    ("dropout in train mode", lambda: smooth(with_dropout_training()).predict(X, 1000, ALPHA, key=0),
     "(Sequential.1.training is True)"),
    ("trained after Smooth was made", lambda: (lambda s: (F.train(), s.counts(X, 100, key=0)))(smooth()), "call .eval() on it first"),
    # what the classifier returns: [b, 1] and NaN / inf logits were certified at the largest radius
    ("[b, 1]", lambda: smooth(returning(lambda logits, z: logits[:, :1])).certify(X, 100, 1000, ALPHA, key=0),
     "the classifier must return floating-point logits [batch, num_classes] = [100, 2] for a batch of 100 noisy inputs, got torch.float32 [100, 1]"),
    ("[2b, C]", lambda: smooth(returning(lambda logits, z: torch.cat([logits, logits]))).certify(X, 100, 1000, ALPHA, key=0), "got torch.float32 [200, 2]"),
    ("[1, C]", lambda: smooth(returning(lambda logits, z: logits[:1])).certify(X, 100, 1000, ALPHA, key=0), "got torch.float32 [1, 2]"),
    ("labels [b]", lambda: smooth(returning(lambda logits, z: logits.argmax(1))).certify(X, 100, 1000, ALPHA, key=0), "got torch.int64 [100]"),
    ("integer logits", lambda: smooth(returning(lambda logits, z: logits.long())).certify(X, 100, 1000, ALPHA, key=0), "got torch.int64 [100, 2]"),
    ("a tuple", lambda: smooth(returning(lambda logits, z: (logits, z))).certify(X, 100, 1000, ALPHA, key=0), "got tuple (return the logits tensor alone)"),
    ("a dict", lambda: smooth(returning(lambda logits, z: {"logits": logits})).certify(X, 100, 1000, ALPHA, key=0), "got dict (return the logits tensor alone)"),
    ("num_classes < logits", lambda: smoothing.Smooth(returning(lambda logits, z: torch.cat([logits, logits], 1)), C, SIGMA).certify(X, 100, 1000, ALPHA, key=0),
     "= [100, 2] for a batch of 100 noisy inputs, got torch.float32 [100, 4]"),
    ("num_classes > logits", lambda: smoothing.Smooth(F, 10, SIGMA).certify(X, 100, 1000, ALPHA, key=0), "= [100, 10] for a batch of 100 noisy inputs, got torch.float32 [100, 2]"),
    ("NaN logits", lambda: smooth(returning(lambda logits, z: logits * float("nan"))).certify(X, 100, 1000, ALPHA, key=3),
     "the classifier returned non-finite logits for 100 of 100 noisy samples of input 3: no certificate"),
    ("+inf logits in some rows", lambda: smooth(returning(lambda logits, z: torch.where(z.flatten(1)[:, :1] > 1.2, float("inf"), logits))).certify(X, 100, 1000, ALPHA, key=3),
     "noisy samples of input 3: no certificate"),
    # adaptive CERTIFY: AdaptivePlan(n=1e4) failed only at the last look
    ("plan n a float", lambda: smoothing.AdaptivePlan(1e4, ALPHA, SIGMA, [0.0]), "n must be an integer, got 10000.0"),
    ("plan alpha 1", lambda: smoothing.AdaptivePlan(10_000, 1, SIGMA, [0.0]), "alpha must be in (0, 1)"),
    ("plan sigma a tensor", lambda: smoothing.AdaptivePlan(10_000, ALPHA, torch.tensor(SIGMA), [0.0]), "use float(sigma)"),
    ("plan radius < 0", lambda: smoothing.AdaptivePlan(10_000, ALPHA, SIGMA, [0.0, -1]), "radii must be finite and >= 0"),
    ("plan radius NaN", lambda: smoothing.AdaptivePlan(10_000, ALPHA, SIGMA, [float("nan")]), "radii must be finite and >= 0"),
    ("plan no radius", lambda: smoothing.AdaptivePlan(10_000, ALPHA, SIGMA, []), "at least one"),
    ("plan look a float", lambda: smoothing.AdaptivePlan(10_000, ALPHA, SIGMA, [0.0], looks=[100.0]), "looks must be an integer"),
    ("plan radii all beyond reach", lambda: smoothing.AdaptivePlan(10_000, ALPHA, SIGMA, [2.0, 3.0]),
     "no radius of [2.0, 3.0] is within reach: n = 10,000 samples at sigma 0.5 certify at most 1.5990 at alpha 0.00099"),
    ("plan n certifies nothing", lambda: smoothing.AdaptivePlan(5, ALPHA, SIGMA, [0.0]), "n = 5 samples certify nothing at alpha 0.001 (n must be at least 10)"),
    ("not a plan", lambda: smooth().certify_adaptive(X, 100, {"n": 1000}, key=0), "plan must be an AdaptivePlan for this classifier's sigma 0.5, got dict"),
]

# The statistics, as plain functions of the counts
STATISTICS = [
    ("k > n", lambda: smoothing.lower_confidence_bound(11, 10, ALPHA), "k must be <= n, got k = 11 of n = 10"),
    ("k < 0", lambda: smoothing.upper_confidence_bound(-1, 10, ALPHA), "k must be >= 0"),
    ("n = 0", lambda: smoothing.lower_confidence_bound(0, 0, ALPHA), "n must be >= 1, got 0"),
    ("k a float", lambda: smoothing.lower_confidence_bound(5.0, 10, ALPHA), "k must be an integer"),
    ("bound alpha 1", lambda: smoothing.upper_confidence_bound(5, 10, 1.0), "alpha must be in (0, 1)"),
    ("bound alpha NaN", lambda: smoothing.lower_confidence_bound(5, 10, float("nan")), "alpha must be in (0, 1)"),
    ("p_lower > 1", lambda: smoothing.radius_from_bound(1.5, SIGMA), "p_lower must be in [0, 1], got 1.5"),
    ("p_lower NaN", lambda: smoothing.radius_from_bound(float("nan"), SIGMA), "p_lower must be in [0, 1]"),
    ("radius sigma < 0", lambda: smoothing.radius_from_bound(0.9, -1.0), "sigma must be > 0"),
    ("float counts", lambda: smoothing.certify_from_counts(np.array([1.0, 99.0]), np.array([10, 990]), 1000, ALPHA, SIGMA),
     "counts0 must be a 1-D array of non-negative integer counts, got float64 [2]"),
    ("negative counts", lambda: smoothing.certify_from_counts(np.array([1, 99]), np.array([-10, 1010]), 1000, ALPHA, SIGMA), "counts must be a 1-D array of non-negative"),
    ("2-D counts", lambda: smoothing.predict_from_counts(np.array([[1, 99]]), ALPHA), "got int64 [1, 2]"),
    ("counts of other classes", lambda: smoothing.certify_from_counts(np.array([1, 99, 0]), np.array([10, 990]), 1000, ALPHA, SIGMA),
     "counts must be a 1-D array of non-negative integer counts of 3 classes"),
    ("counts not of n samples", lambda: smoothing.certify_from_counts(np.array([1, 99]), np.array([10, 990]), 100, ALPHA, SIGMA),
     "counts must count each of the 100 samples once, but sum to 1000"),
    ("no selection sample", lambda: smoothing.certify_from_counts(np.array([0, 0]), np.array([10, 990]), 1000, ALPHA, SIGMA), "counts0 must count each of the n >= 1 samples"),
    ("certify alpha 1", lambda: smoothing.certify_from_counts(np.array([1, 99]), np.array([10, 990]), 1000, 1.0, SIGMA), "alpha must be in (0, 1)"),
    ("predict alpha < 0", lambda: smoothing.predict_from_counts(np.array([1, 99]), -1), "alpha must be in (0, 1)"),
    ("predict one class", lambda: smoothing.predict_from_counts(np.array([99]), ALPHA), "counts must have at least two classes"),
    ("sign test float", lambda: smoothing.sign_test_pvalue(60.0, 35), "n_a must be an integer"),
    ("sign test < 0", lambda: smoothing.sign_test_pvalue(60, -1), "n_b must be >= 0"),
    ("largest radius n a float", lambda: smoothing.largest_radius(1e5, ALPHA, SIGMA), "n must be an integer"),
    ("adaptive estimate not of n_k samples", lambda: smoothing.certify_adaptive(np.array([1, 99]), lambda m: np.array([0, 2 * m]),
                                                                              smoothing.AdaptivePlan(1000, ALPHA, SIGMA, [0.0])),
     "estimate(100) must count each of the 100 samples once, but sum to 200"),
    ("stream chunk < 0", lambda: smoothing.stream_seed(0, 0, smoothing.ESTIMATE, -1), "must be integers in [0, 2^31)"),
    ("stream key a str", lambda: smoothing.stream_seed(0, "3", smoothing.ESTIMATE, 0), "key must be an integer"),
]


@pytest.mark.quick
@pytest.mark.parametrize("call,message", [m[1:] for m in MISUSES + STATISTICS], ids=[m[0] for m in MISUSES + STATISTICS])
def test_a_misuse_is_refused_in_one_line_naming_it(call, message):
    F.eval()  # "trained after Smooth was made" puts it in train mode
    try:
        with pytest.raises(ValueError) as refused:
            call()
    finally:
        F.eval()
    said = str(refused.value)
    assert message in said and "\n" not in said, said


@pytest.mark.quick
def test_key_is_required_and_named_by_an_integer():
    """No default (key 0 for every input gave every input the same noise); numpy integers are the same key."""
    with pytest.raises(TypeError, match="key"):
        smooth().certify(X, 100, 1000, ALPHA)
    assert np.array_equal(smooth().counts(X, 300, key=np.int64(3)), smooth().counts(X, 300, key=3))


@pytest.mark.parametrize("misuse", ["a tuple", "[2b, C]", "NaN logits", "x batched, a conv net", "BatchNorm in train mode"])
def test_the_compiled_noise_loop_refuses_the_same(misuse):
    """Under Smooth(compile=True) the same ValueError: the output check is a graph break (torch.compiler.disable)
    between the classifier's graph and the counting one, so it raises in eager code."""
    call, message = next(m[1:] for m in MISUSES if m[0] == misuse)
    real = smoothing.Smooth.__init__
    try:
        smoothing.Smooth.__init__ = lambda self, *args, **kwargs: real(self, *args, **kwargs | {"compile": True})
        with pytest.raises(ValueError) as refused:
            call()
    finally:
        smoothing.Smooth.__init__ = real
    assert message in str(refused.value), str(refused.value)


def test_a_refusal_under_compile_does_not_stop_compiling():
    """Raised while Dynamo traces, the refusal made Dynamo skip the noise loop's code for good: every later Smooth
    in the process, right ones too, ran eagerly. Raised between two graphs, it does not."""
    from torch._dynamo.utils import counters
    with pytest.raises(ValueError, match="got tuple"):
        smooth(returning(lambda logits, z: (logits, z)), compile=True).counts(X, 100, key=0)
    compiled = counters["frames"]["ok"]
    smooth(linear_classifier(), compile=True).counts(X, 200, key=0)  # another model: no cached graph fits
    assert counters["frames"]["ok"] > compiled


def test_the_classifiers_error_is_chained():
    with pytest.raises(ValueError) as refused:
        smooth(conv_net()).certify(X[None], 100, 1000, ALPHA, key=0)
    assert isinstance(refused.value.__cause__, RuntimeError)
    assert "x must be one input without a batch dimension (x.shape is [1, 3, 8, 8])" in str(refused.value)


# ----------------------------------------------------------------------------------------------------
# What it can handle, it certifies right

def test_float64_x_certifies_soundly():
    """Noise is drawn in x's dtype and added in float64; the float32 model sees the noisy batch rounded to its
    dtype (a deterministic part of the base classifier). The linear classifier's exact radius is |m| = 0.25."""
    x64 = X.double()
    prediction, radius = smoothing.Smooth(F, C, SIGMA).certify(x64, 100, 20_000, ALPHA, key=7)
    reference = smoothing.Smooth(F, C, SIGMA).certify(X, 100, 20_000, ALPHA, key=7)
    assert prediction == reference[0] == 0 and radius <= 0.25 and abs(radius - reference[1]) < 0.03


def test_a_bf16_model_certifies_with_fp32_noise():
    """The noise is added in float32 and the noisy batch cast to bf16 for the model: a bf16 copy of the linear
    classifier certifies the same class, with a radius close to the fp32 model's."""
    model = linear_classifier().to(torch.bfloat16)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    prediction, radius = smoothing.Smooth(model, C, SIGMA).certify(X, 100, 20_000, ALPHA, key=7)
    reference = smoothing.Smooth(F, C, SIGMA).certify(X, 100, 20_000, ALPHA, key=7)
    assert seen[0] == torch.bfloat16 and prediction == reference[0] == 0 and abs(radius - reference[1]) < 0.03


def test_a_model_of_buffers_gets_its_dtype():
    """A Module with no parameters, only a float64 buffer: the float32 noisy batch is cast to float64 for it."""
    class Buffered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.cat([F[1].weight, F[1].bias[:, None]], 1).detach().double())

        def forward(self, z):
            assert z.dtype == torch.float64
            return z.flatten(1) @ self.w[:, :-1].T + self.w[:, -1]
    prediction, radius = smoothing.Smooth(Buffered().eval(), C, SIGMA).certify(X, 100, 20_000, ALPHA, key=7)
    assert (prediction, radius) == pytest.approx(smoothing.Smooth(F, C, SIGMA).certify(X, 100, 20_000, ALPHA, key=7), abs=0.01)


def test_fp16_autocast_runs():
    assert smoothing.Smooth(F, C, SIGMA, autocast=torch.float16).certify(X, 100, 1000, ALPHA, key=1)[0] == 0


@pytest.mark.quick
def test_a_plan_says_which_radii_are_beyond_reach():
    plan = smoothing.AdaptivePlan(100_000, ALPHA, 0.25, [0, 0.25, 0.5, 0.75, 1.0, 2.0])
    assert plan.radii == [0.0, 0.25, 0.5, 0.75] and plan.beyond == [1.0, 2.0]
    assert plan.describe().endswith("radii [0.0, 0.25, 0.5, 0.75]; 1, 2 beyond reach: n = 100,000 samples at sigma 0.25 "
                                    "certify at most 0.9527 at alpha 0.00099")
    assert "beyond" not in smoothing.AdaptivePlan(100_000, ALPHA, 1.0, [0, 0.5]).describe()
