"""The recipe: schedules against the authors' logs and hand-computed values, the time snapping, the loss
weighting, the classifier's LayerNorm, the frozen head, the recipe a --dataset selects, and the laptop
tutorial's fine-tuning ending in a classifier that learned."""
import argparse
import dataclasses
import math
import os
import pickle
import re
import shlex

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import finetune
import jobs
import model
import pretrain
import trainer
from conftest import ROOT, refusal


# ----------------------------------------------------------------------------------------------------
# Pre-training lr: warm-up over 10k steps, then cosine to 0 at K = 300k (released "warmup-cosine")

@pytest.mark.quick
@pytest.mark.parametrize("step, want", [
    (0, 0.0),                   # LambdaLR gives the first optimizer step scale 0 / W
    (5_000, 0.5e-4),            # half-way through the warm-up
    (10_000, 1e-4),             # end of warm-up: the peak
    (155_000, 0.5e-4),          # cos(pi / 2) = 0: half the peak mid-way through the cosine
    (200_000, 2.65795779650105e-5),  # 1e-4 * 0.5 * (1 + cos(pi * 190 / 290)), by calculator
    (300_000, 0.0),             # the last step reaches 0
])
def test_pretrain_lr_schedule(step, want):
    assert trainer.warmup_cosine(step, 300_000, 10_000, 1e-4) == pytest.approx(want, abs=1e-15)


@pytest.mark.quick
def test_no_warmup_is_a_constant_lr():
    """Released customized_lr_scheduler: `if warmup_steps > 0: ... else: return 1` (099127a:rrcm/utils.py:311,
    323): without warm-up there is no cosine either, in pre-training (steps) and fine-tuning (epochs)."""
    assert [trainer.warmup_cosine(k, 400, 0, 1e-4) for k in (0, 1, 200, 399, 400)] == [1e-4] * 5
    assert [trainer.warmup_cosine(e, 2, 0, 2e-4) for e in (0, 1, 2)] == [2e-4] * 3


def test_pretrain_recipes_per_dataset():
    c, i = pretrain.parse_args([]), pretrain.parse_args(["--dataset", "imagenet"])
    s = pretrain.parse_args(["--dataset", "imagenet", "--preset", "S"])
    assert (c.steps, c.batch, c.lr, c.weight_decay, c.warmup, c.ema_sharpness) == (300_000, 2048, 1e-4, 0.0, 10_000, 15.0)
    assert (i.steps, i.batch, i.lr, i.weight_decay, i.warmup, i.ema_sharpness) == (600_000, 4096, 2e-4, 0.03, 15_000, 10.0)
    assert (s.steps, s.batch, s.lr, s.weight_decay, s.warmup, s.ema_sharpness) == (600_000, 4096, 1e-4, 0.01, 10_000, 10.0)
    assert i.freeze_patch_embed and s.freeze_patch_embed and not c.freeze_patch_embed
    assert pretrain.parse_args(["--dataset", "imagenet", "--lr", "3e-4"]).lr == 3e-4  # a flag beats the recipe
    # no released config for ImageNet rRCM-B-Deep: the paper's Table 4 gives it lr 1e-4 (rRCM-B's config: 2e-4)
    assert pretrain.parse_args(["--dataset", "imagenet", "--preset", "B-Deep"]).lr == 1e-4


@pytest.mark.quick
def test_ema_rate_against_closed_forms():
    """ema(k) = s + (e - s) c with c = 2 sigmoid(A (r - s) / (e - s)) - 1 = tanh(A (r - s) / (2 (e - s))), where
    r = sqrt(k / K (e^2 - s^2) + s^2). At k = K (r = e) c = tanh(A / 2); where r = (s + e) / 2, which is
    k / K = (3s + e) / (4 (s + e)), c = tanh(A / 4)."""
    s, e, K = 0.99, 0.9999, 1000
    assert pretrain.ema_rate(0, K, 15.0) == pytest.approx(s, abs=1e-15)
    assert pretrain.ema_rate(K, K, 15.0) == pytest.approx(s + (e - s) * 0.9999993881955461, abs=1e-13)  # tanh(7.5)
    mid = K * (3 * s + e) / (4 * (s + e))
    assert pretrain.ema_rate(mid, K, 15.0) == pytest.approx(s + (e - s) * 0.9988944427261528, abs=1e-13)  # tanh(3.75)
    assert pretrain.ema_rate(mid, K, 10.0) == pytest.approx(s + (e - s) * math.tanh(2.5), abs=1e-13)  # ImageNet's A


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: the recipe and schedule of the authors' six logs (5716a39:logs/finetune/*/cnsisv1_sigma*.log)

# The lr of the head's group (the last of the 28 listed) each log prints after epoch e: log lines 100, 102, ...
# (cifar10 sigma 0.25), 105, 107, ... (imagenet sigma 0.25 and 1.0), 106, 108, ... (imagenet sigma 0.5).
LOGGED_LR = {
    ("cifar10", 0.25): {0: 2e-05, 4: 0.0001, 9: 0.0002, 10: 0.0001999390827019096, 11: 0.00019975640502598244,
                        19: 0.00019396926207859084, 49: 0.00011736481776669306, 98: 6.09172980904238e-08, 99: 0.0},
    ("imagenet", 0.25): {0: 4e-05, 4: 0.0002, 9: 0.00019941379571543596, 49: 0.00015611870653623825,
                         99: 5.3159155930021e-05, 148: 2.347019815158724e-08, 149: 0.0},
    ("imagenet", 0.5): {0: 4e-05, 9: 0.00019941379571543596, 49: 0.00015611870653623825},  # 50 of a 150-epoch cosine
    ("imagenet", 1.0): {0: 2e-05, 9: 9.970689785771798e-05, 99: 2.65795779650105e-05, 148: 1.173509907579362e-08},
}


@pytest.mark.quick
@pytest.mark.parametrize("dataset, sigma", LOGGED_LR)
def test_finetune_schedule_reproduces_the_logged_lr(dataset, sigma):
    """The logs run LambdaLR.step() after each epoch and print get_last_lr(): the line of epoch e holds the lr
    of epoch e + 1, so epoch 0 runs at lr 0 (cifar10 sigma 0.25: test accuracy 9.7 % after it, log line 100).
    The default recipe (no lr scaling: `scale_lr: false` in every log) must give those numbers exactly."""
    a = finetune.parse_args(["--dataset", dataset, "--sigma", str(sigma)])
    assert not a.scale_lr
    assert trainer.warmup_cosine(0, a.schedule_epochs, a.warmup_epochs, a.lr) == 0.0
    for epoch, logged in LOGGED_LR[dataset, sigma].items():
        assert trainer.warmup_cosine(epoch + 1, a.schedule_epochs, a.warmup_epochs, a.lr) == logged, epoch


@pytest.mark.parametrize("sigma, decay, logged_first", [(0.25, 0.75, 4.7514528036117553e-07), (1.0, 0.65, 7.394411782037431e-08)])
def test_layer_decay_matches_the_logged_groups(sigma, decay, logged_first):
    """The first group of each CIFAR-10 log's lr list (the embeddings) after epoch 0 is the head's 2e-5 times
    decay^13 for the 12-block rRCM-B (log line 100 of cnsisv1_sigma0.25 / 103 of cnsisv1_sigma1.0)."""
    a = finetune.parse_args(["--sigma", str(sigma)])
    net = model.ViT(dataclasses.replace(model.vit_config("tiny", "cifar10"), depth=12))
    groups = finetune.layer_groups(net, a.layer_decay)
    assert a.layer_decay == decay and groups[-1]["lr_scale"] == 1.0
    head_lr = trainer.warmup_cosine(1, a.schedule_epochs, a.warmup_epochs, a.lr)
    assert groups[0]["lr_scale"] * head_lr == pytest.approx(logged_first, rel=1e-12)


def test_scale_lr_gives_the_released_configs_lr():
    """configs/*_finetune.py: scale_lr=True, lr x batch / 256: 8e-4 at the logs' batch 1024."""
    a = finetune.parse_args(["--scale-lr"])
    assert a.scale_lr and a.lr * a.batch / 256 == pytest.approx(8e-4)


@pytest.mark.parametrize("sigma, epochs, lr, augment, smoothing, eta1", [
    (0.25, 150, 2e-4, "autoaug", 0.1, 10.0),  # imagenet cnsisv1_sigma0.25 log lines 2-93
    (0.5, 50, 2e-4, "strong", 0.0, 20.0),     # cnsisv1_sigma0.5 lines 2-94
    (1.0, 150, 1e-4, "weak", 0.0, 20.0),      # cnsisv1_sigma1.0 lines 2-93
])
def test_imagenet_finetune_recipe_per_sigma(sigma, epochs, lr, augment, smoothing, eta1):
    """Batch 1024 at every sigma, as each log's line 4 records (the released README commands say 2048 and 256
    at sigma 0.5 and 1.0)."""
    a = finetune.parse_args(["--dataset", "imagenet", "--sigma", str(sigma)])
    assert (a.epochs, a.batch, a.lr, a.augment, a.label_smoothing, a.eta1) == (epochs, 1024, lr, augment, smoothing, eta1)
    assert (a.layer_decay, a.mixup, a.cutmix, a.warmup_epochs, a.schedule_epochs, a.eta2) == (0.65, 0.8, 1.0, 5, 150, 0.5)
    # the 50-epoch run stops on the way down its 150-epoch cosine: 0.5 (1 + cos(pi 44 / 145)) of the peak at the end
    if epochs == 50:
        end = trainer.warmup_cosine(49, a.schedule_epochs, a.warmup_epochs, 1.0)
        assert end == pytest.approx(0.5 * (1 + math.cos(math.pi * 44 / 145)))


@pytest.mark.parametrize("sigma, eta1, layer_decay", [(0.25, 10.0, 0.75), (0.5, 20.0, 0.75), (1.0, 20.0, 0.65)])
def test_cifar_finetune_recipe(sigma, eta1, layer_decay):
    """cifar10 cnsisv1_sigma*.log lines 2-93: weak (no) augmentation, no mixing, lbd / eta, decay, 100 epochs."""
    a = finetune.parse_args(["--sigma", str(sigma)])
    assert (a.epochs, a.warmup_epochs, a.batch, a.lr, a.augment, a.mixup, a.cutmix, a.label_smoothing, a.eta2) == \
        (100, 10, 1024, 2e-4, "weak", 0.0, 0.0, 0.0, 0.5)
    assert (a.eta1, a.layer_decay, a.scale_lr) == (eta1, layer_decay, False)


def test_label_smoothing_only_with_mixing():
    """rrcm_tune.py (099127a:662-664) smooths only through timm's mixed targets; without mixing it uses plain
    nn.CrossEntropyLoss. So the ImageNet sigma 0.25 recipe loses its 0.1 when mixing is turned off, and an
    explicit --label-smoothing without mixing is refused."""
    assert finetune.parse_args(["--dataset", "imagenet", "--mixup", "0", "--cutmix", "0"]).label_smoothing == 0.0
    assert finetune.parse_args(["--dataset", "imagenet", "--mixup", "0"]).label_smoothing == 0.1  # cutmix still on
    message = refusal("finetune.py", ["--label-smoothing", "0.1"])
    assert message == ("finetune.py: error: --label-smoothing needs --mixup or --cutmix: the released code smooths "
                       "labels only through timm's mixed targets")


class ConstantImages:
    """Stands in for data.Images: image i is the constant i, its label i."""

    def __len__(self):
        return 1024

    def finetune_batch(self, idx, g, augment):
        return idx.float()[:, None, None, None].expand(len(idx), 3, 16, 16) / 1024, idx.clone()


@pytest.mark.parametrize("shards", [1, 2, 8])
def test_mixing_draws_eight_lambdas_per_step_like_the_authors_8_processes(shards):
    """The authors' 8 processes each mixed their own 1/8 of the batch (timm Mixup, batch mode: one lambda,
    partners from the eighth reversed). A step draws a lambda per eighth and pairs images within it whatever
    --shards is (one lambda for the whole batch would pair image 0 with image 63)."""
    args = argparse.Namespace(batch=64, seed=0, shards=shards, augment="weak", mixup=0.8, cutmix=1.0, sigma=0.25)
    _, _, y_a, y_b, lam = finetune.step_inputs(ConstantImages(), 3, args, 0, 1, torch.device("cpu"))
    assert len(torch.unique(lam)) > 4  # 8 draws; cutmix's box areas can coincide
    for eighth in range(8):
        part = slice(8 * eighth, 8 * eighth + 8)
        assert torch.equal(y_b[part], y_a[part].flip(0)) and len(torch.unique(lam[part])) == 1


# ----------------------------------------------------------------------------------------------------
# Time input and classifier

@pytest.mark.quick
@pytest.mark.parametrize("sigma, t", [(0.25, 0.4927), (0.5, 0.9654), (1.0, 2.0036)])
def test_smoothing_time_snaps_to_the_81_point_grid(sigma, t):
    assert model.smoothing_time(sigma) == pytest.approx(t, abs=1e-4)
    x, eps = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, t_seen = model.noisy_input(x, sigma, eps)
    assert t_seen == pytest.approx(t, abs=1e-4)
    assert torch.allclose(x_t, (x + sigma * eps) * 2 - 1)  # the noise itself is exactly sigma in pixel space


def test_cifar_classifier_reads_the_raw_class_token():
    """Scaling the final LayerNorm's weight changes ImageNet-style logits but not CIFAR-10's."""
    torch.manual_seed(0)
    net = model.ViT(model.vit_config("tiny", "cifar10")).eval()
    torch.nn.init.normal_(net.head.weight)
    x = torch.randn(2, 3, 32, 32)
    for norm, changes in ((True, True), (False, False)):
        net.cfg.classifier_norm = norm
        before = net(x, 0.5)
        with torch.no_grad():
            net.norm.weight.mul_(3.0)
        after = net(x, 0.5)
        with torch.no_grad():
            net.norm.weight.div_(3.0)
        assert (not torch.allclose(before, after)) == changes


@pytest.mark.quick
def test_head_init_is_near_zero():
    """trunc_normal_(std=2e-5) truncates at +-2 in absolute terms (timm's and PyTorch's default), so in effect
    a normal of std 2e-5; the bias starts at 0."""
    net = model.ViT(model.vit_config("B", "imagenet"))
    assert net.head.weight.std().item() == pytest.approx(2e-5, rel=0.01) and torch.all(net.head.bias == 0)


# ----------------------------------------------------------------------------------------------------
# Loss weighting: consistency + one contrastive direction, 1 : 1 (paper and paper-time code), or both (HEAD)

def reference_info_nce(q, k, tau):
    return F.cross_entropy(q @ k.T / tau, torch.arange(len(q)))


def test_contrastive_loss_one_direction_or_both():
    torch.manual_seed(0)
    q1, q2, k1, k2 = (F.normalize(torch.randn(6, 8), dim=1) for _ in range(4))
    plain = torch.nn.Module()
    plain.projector = torch.nn.Identity()  # the loss itself, without a projector in the way
    one = pretrain.contrastive_loss(plain, q1, [k2], 0.2)
    both = pretrain.contrastive_loss(plain, torch.cat([q1, q2]), [k2, k1], 0.2)
    assert one.item() == pytest.approx(reference_info_nce(q1, k2, 0.2).item(), rel=1e-5)
    assert both.item() == pytest.approx((reference_info_nce(q1, k2, 0.2) + reference_info_nce(q2, k1, 0.2)).item(), rel=1e-5)


def test_one_direction_by_default():
    """099127a:rrcm/rrcm_denoiser.py:174-180, 198: the online encoder sees view 1 (x_aug) only, the target view 2
    (x_aug2) only, and the loss is contrastive + consistency; the second direction came in 25403e9 (2025-01-23).
    So by default view 2 must not reach the online loss, and the target must encode view 2 alone."""
    assert not pretrain.parse_args([]).symmetric and pretrain.parse_args(["--symmetric"]).symmetric
    torch.manual_seed(0)
    net = model.ViT(model.vit_config("tiny", "cifar10"))
    x0, v1, v2, v2_other, eps = (torch.rand(4, 3, 32, 32) for _ in range(5))
    assert pretrain.directions(["v1", "v2"], False) == (["v1"], ["v2"])
    assert pretrain.directions(["v1", "v2"], True) == (["v1", "v2"], ["v2", "v1"])
    objective = pretrain.OnlinePasses(net, 0.2)
    with torch.no_grad():
        h_key = pretrain.encode(net, [pretrain.point(x0, 1.5, eps)], None)
    for symmetric, depends in ((False, False), (True, True)):
        losses = []
        for second in (v2, v2_other):
            views = pretrain.contrastive_views(v1, second, eps, None, [80.0, 0.002])
            queries, key_views = pretrain.directions(views, symmetric)
            keys = pretrain.project(net, pretrain.directions(pretrain.contrastive_views(v1, v2, eps, None, [80.0, 0.002]), symmetric)[1])
            with torch.no_grad():
                losses.append(objective([pretrain.point(x0, 2.0, eps)], queries, h_key, keys)[1])
        assert (not torch.equal(*losses)) == depends
    assert pretrain.forwards_per_image(pretrain.parse_args([])) == 8
    assert pretrain.forwards_per_image(pretrain.parse_args(["--symmetric"])) == 12
    assert pretrain.forwards_per_image(pretrain.parse_args([]), micro=4) == 10  # micro-batches encode once more


def test_pretrain_refuses_a_batch_of_one_and_temperatures_out_of_range():
    assert refusal("pretrain.py", ["--batch", "1"]) == ("pretrain.py: error: --batch must be >= 2: the projector's BatchNorm "
                                                        "normalises over the batch (one image has no variance)")
    for tau, span in (("1e-6", "1e+06"), ("5", "0.2")):
        assert refusal("pretrain.py", ["--tau", tau]) == (f"pretrain.py: error: --tau must be in [0.01, 1], got {float(tau)}: "
                                                          f"the logits q.k / tau of unit vectors span +-{span} (the paper uses 0.2)")


# ----------------------------------------------------------------------------------------------------
# Mixup / label smoothing loss: the hard-label form equals CE against the explicit soft target

@pytest.mark.quick
def test_classification_loss_equals_soft_target_cross_entropy():
    torch.manual_seed(0)
    logits, y_a, y_b = torch.randn(5, 7, dtype=torch.float64), torch.tensor([0, 3, 6, 2, 2]), torch.tensor([1, 3, 0, 5, 4])
    lam, s = 0.3, 0.1
    target = lam * ((1 - s) * F.one_hot(y_a, 7) + s / 7) + (1 - lam) * ((1 - s) * F.one_hot(y_b, 7) + s / 7)
    want = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    got = finetune.classification_loss(logits, y_a, s, y_b, torch.full((5,), lam, dtype=torch.float64))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Parameter counts: enumeration against the closed form of a pre-norm ViT with the released widths

def closed_form_counts(width, depth, proj_hidden, img, patch, classes, proj_dim=256):
    W, H, tokens = width, proj_hidden, 2 + (img // patch) ** 2
    block = 12 * W * W + 10 * W  # qkv (no bias) 3W^2, proj W^2 + W, MLP 8W^2 + 5W, two LayerNorms 4W
    encoder = (3 * patch * patch * W + W) + W + tokens * W + depth * block + 2 * W  # patch, cls, pos, blocks, norm
    projector = W * H + 2 * H + H * H + 2 * H + H * proj_dim  # Linear, BN, Linear, BN, Linear (no biases)
    return dict(encoder=encoder, projector=projector, head=W * classes + classes)


@pytest.mark.parametrize("preset, dataset, hidden", [
    pytest.param("S", "cifar10", 2048, marks=pytest.mark.quick), ("B", "cifar10", 2048), ("B-Deep", "cifar10", 4096),
    ("S", "imagenet", 2048), ("B", "imagenet", 4096), ("B-Deep", "imagenet", 4096),
])
def test_parameter_counts(preset, dataset, hidden):
    cfg = model.vit_config(preset, dataset)
    net = model.ViT(cfg)
    img, patch, classes = (32, 4, 10) if dataset == "cifar10" else (224, 16, 1000)
    assert net.param_counts() == closed_form_counts(cfg.width, cfg.depth, hidden, img, patch, classes)


def test_rrcm_b_sizes():
    """rRCM-B's encoder is a ViT-B: 85.1M parameters on CIFAR-10 (4x4 patches), 85.8M on ImageNet (16x16);
    the released projectors add 6.3M (hidden 2048) and 21.0M (hidden 4096)."""
    cifar, imagenet = (model.ViT(model.vit_config("B", d)).param_counts() for d in ("cifar10", "imagenet"))
    assert round(cifar["encoder"] / 1e5) == 851 and round(imagenet["encoder"] / 1e5) == 858
    assert round(cifar["projector"] / 1e5) == 63 and round(imagenet["projector"] / 1e5) == 210


def test_imagenet_moco_init_and_cifar_defaults():
    """ImageNet: xavier-uniform bounds per q/k/v matrix and zero biases; CIFAR-10: PyTorch's default Linear
    init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with non-zero biases."""
    torch.manual_seed(0)
    net = model.ViT(model.vit_config("tiny", "imagenet"))
    W = net.cfg.width
    qkv = net.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (W + W)) and qkv.abs().max() > 0.95 * math.sqrt(6 / (W + W))
    fc1 = net.blocks[0].mlp[0]
    assert fc1.weight.abs().max() <= math.sqrt(6 / (5 * W)) and torch.all(fc1.bias == 0)
    cifar = model.ViT(model.vit_config("tiny", "cifar10"))
    fc1 = cifar.blocks[0].mlp[0]
    assert fc1.weight.abs().max() <= 1 / math.sqrt(W) and fc1.weight.abs().max() > 0.95 / math.sqrt(W)
    assert fc1.bias.abs().max() > 0


# ----------------------------------------------------------------------------------------------------
# The laptop tutorial (README "Try it on a laptop CPU") must end in a classifier that learned

def write_low_contrast_cifar(folder: str, n_train: int = 100, n_test: int = 50, seed: int = 0) -> None:
    """A CIFAR-10 in the official pickle layout whose classes differ by a small colour shift (+-3 of 255
    around grey, pixel noise std 2, labels cycling over the 10 classes): the features of all images share a
    large common part, as on real data, so a near-zero head that is not trained picks one class for almost
    every image, while a trained one separates them."""
    rng = np.random.default_rng(seed)
    palette = 128 + rng.integers(-3, 4, size=(10, 3))
    os.makedirs(os.path.join(folder, "cifar-10-batches-py"))
    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = np.arange(n) % 10
        images = palette[labels][:, :, None].repeat(1024, axis=2) + rng.normal(0, 2, size=(n, 3, 1024))
        with open(os.path.join(folder, "cifar-10-batches-py", name), "wb") as f:
            pickle.dump({b"data": np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels.tolist()}, f)


def tutorial_finetune_flags() -> list[str]:
    """The README tutorial's finetune.py command line, without the paths it names (--init, --data-dir, --out)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Try it on a laptop CPU")[1].split("\n## ")[0]
    argv = shlex.split(next(line for line in section.splitlines() if line.startswith("python finetune.py")))[2:]
    flags, i = [], 0
    while i < len(argv):
        if argv[i] in ("--init", "--data-dir", "--out"):
            i += 2
            continue
        flags.append(argv[i])
        i += 1
    return flags


@pytest.fixture(scope="module")
def low_contrast(tmp_path_factory) -> tuple[str, str]:
    """(data folder, a tiny pre-trained checkpoint on it): one pre-training step, fp32."""
    folder = str(tmp_path_factory.mktemp("low_contrast"))
    write_low_contrast_cifar(folder)
    pretrain.main(["--data-dir", folder, "--out", os.path.join(folder, "pre"), "--preset", "tiny", "--steps", "1", "--batch", "20",
                   "--no-compile", "--kernels", "torch", "--precision", "fp32"])
    return folder, os.path.join(folder, "pre", "ckpt.pt")


def test_tutorial_finetuning_ends_in_a_classifier_that_learned(low_contrast, tmp_path):
    """The tutorial's fine-tuning flags, read from the README, in fp32 with the PyTorch kernels; the batch is
    cut from 250 to 20 for the 100 synthetic training images. With --train-head the test predictions must not
    fall on one or two classes (here they spread over 4-6 classes, the top two holding at most 72 %, over data
    seeds 0-2); without it the released frozen near-zero head ends on one or two classes for every image, as
    the tutorial run on real CIFAR-10 did (classes 7 and 8 for 98 of 100 images): that is what this catches."""
    folder, init = low_contrast
    flags = tutorial_finetune_flags()
    assert "--train-head" in flags
    flags[flags.index("--batch") + 1] = "20"

    def top_two(out, argv) -> int:
        finetune.main(["--init", init, "--data-dir", folder, "--out", str(out), *argv, "--kernels", "torch", "--precision", "fp32"])
        net = jobs.model_from_checkpoint(jobs.load_checkpoint(str(out / "ckpt.pt"), "finetune")).eval()
        x, _ = data.Images("cifar10", folder, "test", torch.device("cpu")).batch(torch.arange(50))
        with torch.no_grad():
            predicted = net(model.to_model_space(x), model.SIGMA_MIN).argmax(1)
        return int(torch.bincount(predicted, minlength=10).sort(descending=True).values[:2].sum())

    assert top_two(tmp_path / "head", flags) < 45  # of 50
    assert top_two(tmp_path / "frozen", [f for f in flags if f != "--train-head"]) >= 45


def test_bf16_fine_tuning_of_a_near_zero_head_keeps_its_loss_terms_fp32(low_contrast, tmp_path, monkeypatch):
    """--precision bf16 (native on this project's CPU box, emulated elsewhere) with the frozen near-zero head,
    where the two copies' predictions nearly agree: every step's CE, KL and entropy are fp32, KL >= 0."""
    folder, init = low_contrast
    real, seen = finetune.finetune_loss, []

    def recording(*args):
        loss, parts = real(*args)
        seen.append(parts)
        return loss, parts

    monkeypatch.setattr(finetune, "finetune_loss", recording)
    finetune.main(["--init", init, "--data-dir", folder, "--out", str(tmp_path), "--sigma", "0.25", "--epochs", "1", "--warmup-epochs", "0",
                   "--train-images", "8", "--batch", "4", "--eval-images", "4", "--no-compile", "--kernels", "torch",
                   "--precision", "bf16"])
    assert len(seen) == 2  # 8 images, batch 4 (bf16 is emulated, and slow, on CPUs without AVX512-BF16)
    for parts in seen:
        assert all(v.dtype == torch.float32 for v in parts.values()) and parts["kl"].item() >= 0, parts
