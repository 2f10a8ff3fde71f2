"""The classical comparators (comparators.py, certify.py's ensembles) against independent computations at toy size:
MACER's radius term against scipy's normal quantile, SmoothAdv's attack raising the soft smoothed loss inside its
epsilon-ball, SmoothMix's mixed points and targets written out by hand, an ensemble's logits against a plain loop over
its members; then each objective trains through finetune.py, in one process and in two. Everything in fp32 (the
unit tests build their own fp32 tensors; the script runs pass FAST's --precision fp32)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

import certify
import comparators
import finetune
import smoothing
from conftest import FAST, finetune_args, refusal, torchrun_runs, update_difference
from jobs import load_checkpoint, model_from_checkpoint
from data import Images
from model import ViT, to_model_space, vit_config


class Toy(torch.nn.Module):
    """A smooth two-layer classifier of model-space images [B, 3, 4, 4] that reads the time like the ViT does."""

    def __init__(self, classes: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden, self.out = torch.nn.Linear(48, 32), torch.nn.Linear(32, classes)

    def forward(self, x_t, t):
        return self.out(torch.tanh(self.hidden(x_t.flatten(1)) + t))


def soft_loss_by_hand(model, x, eps, y, sigma, t) -> np.ndarray:
    """-log of the mean over the noise draws of softmax f(x + sigma eps_i) at y, per image, one draw at a time."""
    with torch.no_grad():
        p = sum(F.softmax(model(to_model_space(x + sigma * e), t), dim=-1) for e in eps) / len(eps)
    return -np.log(p[torch.arange(len(y)), y].numpy())


# ----------------------------------------------------------------------------------------------------
# MACER

@pytest.mark.quick
def test_macer_radius_term_matches_the_normal_quantile_by_hand():
    torch.manual_seed(0)
    sigma, beta, gamma = 0.5, 2.0, 1.5
    logits = torch.randn(6, 40, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (40,))
    got = comparators.macer_radius_term(logits, y, sigma, beta, gamma).numpy()
    p = F.softmax(beta * logits, dim=-1).mean(0).numpy()
    want = []
    for row, label in zip(p, y.numpy()):
        order = np.argsort(-row)
        margin = norm.ppf(row[order[0]]) - norm.ppf(row[order[1]])
        want.append(sigma / 2 * (gamma - margin) if order[0] == label and margin <= gamma else 0.0)
    want = np.array(want)
    assert (want > 0).sum() >= 5 and (want == 0).sum() >= 5  # both branches of the hinge are exercised
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # the term is computed in fp32


@pytest.mark.quick
def test_macer_loss_is_smoothed_ce_plus_lambda_radius_and_its_gradient_finite_when_saturated():
    torch.manual_seed(1)
    logits = torch.randn(4, 8, 5)
    logits[:, 0, 2] = 80.0  # pA rounds to 1 in fp32: Phi^-1 is infinite there, the image must drop out, not give NaN
    y = torch.randint(0, 5, (8,))
    y[0] = 2
    logits.requires_grad_()
    loss, parts = comparators.macer_loss(logits, y, 0.25, 12.0, 16.0, 8.0)
    p = F.softmax(logits.detach().double(), dim=-1).mean(0)
    ce = -torch.log(p[torch.arange(8), y])
    radius = comparators.macer_radius_term(logits.detach(), y, 0.25, 16.0, 8.0)
    assert radius[0] == 0
    assert abs(loss.item() - (ce + 12.0 * radius.double()).mean().item()) < 1e-5
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------------------------------
# SmoothAdv

@pytest.mark.quick
def test_smoothadv_attack_raises_the_soft_smoothed_loss_and_stays_in_its_ball():
    torch.manual_seed(2)
    model, sigma, t = Toy(), 0.25, 0.49
    x, y = torch.rand(6, 3, 4, 4), torch.randint(0, 5, (6,))
    eps = torch.randn(4, 6, 3, 4, 4)
    for epsilon, steps in ((0.5, 5), (0.05, 10)):  # the second's steps add up to 2 epsilon: the ball binds
        x_hat = comparators.smoothadv_attack(model, x, eps, y, sigma, t, epsilon, steps)
        norms = (x_hat - x).flatten(1).norm(dim=1)
        assert (norms <= epsilon * (1 + 1e-5)).all() and (x_hat >= 0).all() and (x_hat <= 1).all()
        assert (soft_loss_by_hand(model, x_hat, eps, y, sigma, t) > soft_loss_by_hand(model, x, eps, y, sigma, t)).all()
    assert norms.min() > 0.05 * (1 - 1e-4)  # projected onto the sphere, not short of it


@pytest.mark.quick
def test_smoothadv_trains_on_the_attack_with_the_same_noise():
    torch.manual_seed(3)
    model, sigma, t = Toy(), 0.5, 0.96
    x, y, eps = torch.rand(3, 3, 4, 4), torch.randint(0, 5, (3,)), torch.randn(2, 3, 3, 4, 4)
    loss, _ = comparators.smoothadv_loss(model, model, x, eps, y, sigma, t, 0.3, 2)
    x_hat = comparators.smoothadv_attack(model, x, eps, y, sigma, t, 0.3, 2)
    with torch.no_grad():
        want = np.mean([F.cross_entropy(model(to_model_space(x_hat + sigma * e), t), y).item() for e in eps])
    assert abs(loss.item() - want) < 1e-6


# ----------------------------------------------------------------------------------------------------
# SmoothMix

@pytest.mark.quick
@pytest.mark.parametrize("mix_step", [0, 1])
def test_smoothmix_mixes_points_and_targets_as_written_by_hand(mix_step, monkeypatch):
    """The attack's two ends stand in (x and a random x_adv; with mix_step 1 a random start, on which the released code
    also trains its clean branch); the loss is then written out one image and one noise draw at a time."""
    torch.manual_seed(4)
    model, sigma, t, eta, warm, C = Toy(), 0.25, 0.49, 5.0, 0.3, 5
    x, eps, u = torch.rand(4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4), torch.rand(4)
    start = x if mix_step == 0 else (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():  # labels the model gets right on average, so the mixup term is on for some images
        y = sum(F.softmax(model(to_model_space(start + sigma * e), t), -1) for e in eps).argmax(-1)
    y[0] = (y[0] + 1) % C  # and one it gets wrong: its term is off
    x_adv = torch.rand(4, 3, 4, 4)
    monkeypatch.setattr(comparators, "smoothmix_attack", lambda *a: (start, x_adv))
    loss, parts = comparators.smoothmix_loss(model, model, x, eps, y, u, sigma, t, 1.0, 2, eta, mix_step, warm)
    with torch.no_grad():
        ce, mix, p_bar = [], [], torch.zeros(4, C)
        for e in eps:
            logits = model(to_model_space(start + sigma * e), t)
            ce.append(F.cross_entropy(logits, y).item())
            p_bar += F.softmax(logits, -1) / len(eps)
        for b in range(4):
            lam = u[b].item() / 2
            x_mix = (1 - lam) * start[b] + lam * x_adv[b]
            target = (1 - lam) * p_bar[b] + lam / C
            for e in eps:
                q = F.softmax(model(to_model_space(x_mix + sigma * e[b])[None], t)[0], -1)
                kl = (target * (target.log() - q.log())).sum().item()
                mix.append(kl if p_bar[b].argmax() == y[b] else 0.0)
    assert 0 < sum(m > 0 for m in mix) < len(mix)
    assert abs(parts["ce"].item() - np.mean(ce)) < 1e-6 and abs(parts["mix"].item() - np.mean(mix)) < 1e-6
    assert abs(loss.item() - (np.mean(ce) + eta * warm * np.mean(mix))) < 1e-5


@pytest.mark.quick
def test_smoothmix_attack_steps_by_hand_and_the_one_step_adversary_in_its_ball():
    torch.manual_seed(5)
    model, sigma, t, alpha = Toy(), 0.5, 0.96, 0.7
    x, y, eps = torch.rand(3, 3, 4, 4), torch.randint(0, 5, (3,)), torch.randn(2, 3, 3, 4, 4)
    adv, path = x.clone(), [x.clone()]
    for _ in range(3):  # unprojected steps of alpha along the per-image normalised gradient, clamped to [0, 1]
        a = adv.clone().requires_grad_()
        p = sum(F.softmax(model(to_model_space(a + sigma * e), t), -1) for e in eps) / len(eps)
        g, = torch.autograd.grad(-torch.log(p[torch.arange(3), y]).sum(), [a])
        adv = (adv + alpha * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
        path.append(adv.clone())
    start, x_adv = comparators.smoothmix_attack(model, x, eps, y, sigma, t, alpha, 3, 0, 0.0)
    assert torch.allclose(x_adv, adv, atol=1e-5) and torch.equal(start, x)
    start, _ = comparators.smoothmix_attack(model, x, eps, y, sigma, t, alpha, 3, 1, 0.2)
    step_one = path[1] - x
    shrunk = step_one * (0.2 / step_one.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    assert torch.allclose(start, (x + shrunk).clamp(0, 1), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Boosting: an ensemble as one base classifier

@pytest.mark.quick
def test_ensemble_logits_are_the_members_logits_summed_in_fp32():
    members = [Toy(seed=s).eval() for s in range(3)]
    noisy = torch.rand(7, 3, 4, 4)
    f = certify.RRCMClassifier(members, 0.5)
    want = torch.zeros(7, 5)
    for member in members:
        want += member(2 * noisy - 1, f.t).float()
    assert torch.allclose(f(noisy), want, atol=1e-6) and f(noisy).dtype == torch.float32
    single = certify.RRCMClassifier(members[0], 0.5)
    assert torch.equal(single(noisy), members[0](2 * noisy - 1, f.t))
    counts = smoothing.Smooth(f, 5, 0.5, batch=100).counts(noisy[0], 100, key=3)  # the library takes it as any classifier
    assert counts.sum() == 100


def test_certify_an_ensemble_of_checkpoints_and_refuse_mismatches(cifar_dir, finetuned, tmp_path):
    second = tmp_path / "second"
    finetune.main(finetune_args(cifar_dir, second, "--seed", "1"))
    out = tmp_path / "ensemble.tsv"
    argv = ["--checkpoint", finetuned, str(second / "ckpt.pt"), "--data-dir", cifar_dir, "--out", str(out), "--sigma", "0.25",
            "--n", "100", "--n0", "100", "--num", "3", "--skip", "5", "--batch", "100", *FAST]
    certify.main(argv)
    rows = [line.split("\t") for line in open(out).read().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [0, 5, 10]
    config = json.load(open(f"{out}.json"))
    assert config["checkpoint"] == [os.path.abspath(finetuned), os.path.abspath(second / "ckpt.pt")] and len(config["step"]) == 2
    # the ensemble's prediction on image 0 is the top class of summed logits on the same noise stream
    models = [model_from_checkpoint(load_checkpoint(p, "finetune")).eval() for p in (finetuned, second / "ckpt.pt")]
    smooth = smoothing.Smooth(certify.RRCMClassifier(models, 0.25), 10, 0.25, batch=100)
    x, _ = Images("cifar10", cifar_dir, "test", torch.device("cpu")).batch(torch.tensor([0]))
    assert int(rows[0][2]) == smooth.certify(x[0], 100, 100, 0.001, key=0)[0]
    certify.main(argv)  # resumed: nothing left to do, nothing added
    assert len(open(out).read().splitlines()) == 4
    said = refusal("certify.py", ["--checkpoint", finetuned, finetuned, "--data-dir", cifar_dir, *FAST])
    assert "twice" in said and "\n" not in said
    said = refusal("certify.py", ["--checkpoint", *[finetuned] * 11, "--data-dir", cifar_dir, *FAST])
    assert "at most 10" in said


# ----------------------------------------------------------------------------------------------------
# Through finetune.py: flags, two steps, one process and two

def scratch_blocks() -> dict:
    """The transformer blocks' weights before training: finetune.build_model's scratch init at seed 0."""
    torch.manual_seed(0)
    return {k: v for k, v in ViT(vit_config("tiny", "cifar10")).state_dict().items() if k.startswith("blocks")}


TOY = {"smoothadv": ["--noise-samples", "2", "--attack-steps", "1", "--epsilon", "0.5"],
       "macer": ["--noise-samples", "4"],
       "smoothmix": ["--noise-samples", "2", "--attack-steps", "1", "--attack-step-size", "0.5"]}
TWO_STEPS = ["--train-images", "8", "--batch", "4", "--eval-images", "4", "--log-every", "1"]


@pytest.mark.quick
@pytest.mark.parametrize("objective", comparators.COMPARATORS)
def test_each_objective_trains_two_steps_without_nan(objective, cifar_dir, tmp_path):
    out = tmp_path / objective
    finetune.main(finetune_args(cifar_dir, out, "--objective", objective, *TOY[objective], *TWO_STEPS))
    ckpt = load_checkpoint(str(out / "ckpt.pt"), "finetune")
    assert ckpt["step"] == 2 and ckpt["config"]["objective"] == objective
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    losses = [line for line in open(out / "log.txt") if line.startswith("step ")]
    assert len(losses) == 2 and "nan" not in "".join(losses)


def test_micro_batches_give_the_whole_batch_step(cifar_dir, tmp_path):
    """SmoothMix (an attack, clean and mixed copies, one uniform per image): 2 micro-batches of 2 = one batch of 4."""
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    for out, extra in ((whole, []), (micro, ["--micro-batch", "2"])):  # one step of 4 images
        finetune.main(finetune_args(cifar_dir, out, "--objective", "smoothmix", *TOY["smoothmix"], "--train-images", "4",
                                    "--batch", "4", "--eval-images", "2", *extra))
    a, b = (load_checkpoint(str(o / "ckpt.pt"), "finetune")["model"] for o in (whole, micro))
    assert update_difference(b, a, scratch_blocks()) < 1e-4


@pytest.mark.quick
@pytest.mark.parametrize("argv, said", [
    (["--objective", "macer", "--epsilon", "0.5"], "--epsilon is not a setting of --objective macer"),
    (["--epsilon", "0.5"], "--epsilon goes with a comparator's --objective, not rrcm"),
    (["--objective", "smoothadv", "--eta1", "1"], "--eta1 / --eta2 weight Eq. (12)'s terms"),
    (["--objective", "smoothmix", "--mixup", "0.8"], "no --mixup"),
    (["--objective", "smoothmix", "--mix-step", "1", "--attack-steps", "1"], "--mix-step 1 needs more than 1 --attack-steps"),
    (["--objective", "smoothadv", "--epsilon", "0"], "--epsilon must be > 0"),
    (["--objective", "macer", "--noise-samples", "0"], "--noise-samples must be >= 1"),
])
def test_bad_settings_are_refused_in_one_line(argv, said, cifar_dir, tmp_path):
    got = refusal("finetune.py", finetune_args(cifar_dir, tmp_path / "x", *argv))
    assert said in got and "\n" not in got


@pytest.mark.quick
def test_defaults_are_the_papers_settings_for_dataset_and_sigma():
    args = finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--objective", "smoothmix", "--sigma", "1.0"])
    assert (args.noise_samples, args.attack_steps, args.attack_step_size, args.smoothmix_eta) == (2, 4, 2.0, 5.0)
    args = finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--objective", "macer", "--sigma", "0.5"])
    assert (args.noise_samples, args.macer_lambda, args.macer_beta, args.macer_gamma) == (16, 12.0, 16.0, 8.0)
    args = finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--objective", "smoothadv", "--dataset", "imagenet"])
    assert (args.noise_samples, args.attack_steps, args.mixup, args.cutmix, args.label_smoothing) == (1, 1, 0.0, 0.0, 0.0)
    assert comparators.passes(finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--objective", "smoothadv"])) == (92, 4)
    # SmoothAdv at the larger sigmas: epsilon 2.0 (512/256) with m = 2, the released runs' setting there
    args = finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--objective", "smoothadv", "--sigma", "1.0"])
    assert (args.noise_samples, args.attack_steps, args.epsilon) == (2, 10, 2.0) and comparators.passes(args) == (46, 2)
    args = finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--objective", "smoothadv", "--sigma", "0.5", "--dataset", "imagenet"])
    assert args.epsilon == 1.0 and finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--objective", "smoothadv",
                                                        "--sigma", "1.0", "--dataset", "imagenet"]).epsilon == 2.0


def test_two_processes_train_each_objective_as_one_process_with_two_shards(cifar_dir, tmp_path):
    """Under torchrun (gloo) every objective trains, and agrees with one process drawing the same two shards: the
    attacks run on the bare model, the training forward through DDP."""
    flags = {o: [*TOY[o], *TWO_STEPS, "--shards", "2", "--objective", o] for o in comparators.COMPARATORS}
    torchrun_runs([("finetune.py", finetune_args(cifar_dir, tmp_path / f"two_{o}", *f)) for o, f in flags.items()], tmp_path / "logs")
    for o, f in flags.items():
        finetune.main(finetune_args(cifar_dir, tmp_path / f"one_{o}", *f))
        a, b = (load_checkpoint(str(tmp_path / f"{n}_{o}" / "ckpt.pt"), "finetune")["model"] for n in ("two", "one"))
        assert all(torch.isfinite(v).all() for v in a.values())
        assert update_difference(a, b, scratch_blocks()) < 1e-4, o
