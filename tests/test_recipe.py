"""The released recipe: schedules at given steps against hand-computed values, the time snapping, the
loss weighting, the classifier's LayerNorm, the frozen head, and the recipe a --dataset selects."""
import math

import pytest
import torch
import torch.nn.functional as F

import finetune
import model
import pretrain


# ----------------------------------------------------------------------------------------------------
# Pre-training lr: warm-up over 10k steps, then cosine to 0 at K = 300k (released "warmup-cosine")

@pytest.mark.parametrize("step, want", [
    (0, 0.0),                   # LambdaLR gives the first optimizer step scale 0 / W
    (5_000, 0.5e-4),            # half-way through the warm-up
    (10_000, 1e-4),             # end of warm-up: the peak
    (155_000, 0.5e-4),          # cos(pi / 2) = 0: half the peak mid-way through the cosine
    (200_000, 2.65795779650105e-5),  # 1e-4 * 0.5 * (1 + cos(pi * 190 / 290)), by calculator
    (300_000, 0.0),             # the last step reaches 0
])
def test_pretrain_lr_schedule(step, want):
    assert pretrain.learning_rate(step, 300_000, 1e-4, 10_000) == pytest.approx(want, abs=1e-15)


def test_pretrain_recipes_per_dataset():
    c, i = pretrain.parse_args([]), pretrain.parse_args(["--dataset", "imagenet"])
    s = pretrain.parse_args(["--dataset", "imagenet", "--preset", "S"])
    assert (c.steps, c.batch, c.lr, c.weight_decay, c.warmup, c.ema_sharpness) == (300_000, 2048, 1e-4, 0.0, 10_000, 15.0)
    assert (i.steps, i.batch, i.lr, i.weight_decay, i.warmup, i.ema_sharpness) == (600_000, 4096, 2e-4, 0.03, 15_000, 10.0)
    assert (s.steps, s.batch, s.lr, s.weight_decay, s.warmup, s.ema_sharpness) == (600_000, 4096, 1e-4, 0.01, 10_000, 10.0)
    assert i.freeze_patch_embed and s.freeze_patch_embed and not c.freeze_patch_embed
    assert pretrain.parse_args(["--dataset", "imagenet", "--lr", "3e-4"]).lr == 3e-4  # a flag beats the recipe


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
# Fine-tuning lr: scaled by batch / 256, warm-up then cosine, once per epoch

def test_finetune_lr_is_scaled_and_stepped_per_epoch():
    args = finetune.parse_args([])
    peak = args.lr * args.batch / 256
    assert peak == pytest.approx(8e-4)  # 2e-4 * 1024 / 256
    lr = lambda e: finetune.learning_rate(e, peak, args.warmup_epochs, args.schedule_epochs)
    assert lr(0) == 0.0 and lr(5) == pytest.approx(4e-4) and lr(10) == pytest.approx(8e-4)
    assert lr(55) == pytest.approx(4e-4)  # cos(pi * 45 / 90) = 0
    assert lr(100) == pytest.approx(0.0, abs=1e-18)


@pytest.mark.parametrize("sigma, epochs, batch, lr, augment, smoothing, eta1", [
    (0.25, 150, 1024, 2e-4, "autoaug", 0.1, 10.0),
    (0.5, 50, 2048, 2e-4, "strong", 0.0, 20.0),
    (1.0, 150, 256, 1e-4, "weak", 0.0, 20.0),
])
def test_imagenet_finetune_recipe_per_sigma(sigma, epochs, batch, lr, augment, smoothing, eta1):
    a = finetune.parse_args(["--dataset", "imagenet", "--sigma", str(sigma)])
    assert (a.epochs, a.batch, a.lr, a.augment, a.label_smoothing, a.eta1) == (epochs, batch, lr, augment, smoothing, eta1)
    assert (a.layer_decay, a.mixup, a.cutmix, a.warmup_epochs, a.schedule_epochs, a.eta2) == (0.65, 0.8, 1.0, 5, 150, 0.5)
    # the 50-epoch run stops on the way down its 150-epoch cosine: 0.5 (1 + cos(pi 45 / 145)) of the peak at the end
    if epochs == 50:
        end = finetune.learning_rate(49, 1.0, a.warmup_epochs, a.schedule_epochs)
        assert end == pytest.approx(0.5 * (1 + math.cos(math.pi * 44 / 145)))


@pytest.mark.parametrize("sigma, eta1, layer_decay", [(0.25, 10.0, 0.75), (0.5, 20.0, 0.75), (1.0, 20.0, 0.65)])
def test_cifar_finetune_recipe(sigma, eta1, layer_decay):
    a = finetune.parse_args(["--sigma", str(sigma)])
    assert (a.epochs, a.warmup_epochs, a.batch, a.lr, a.augment, a.mixup, a.cutmix, a.label_smoothing, a.eta2) == \
        (100, 10, 1024, 2e-4, "weak", 0.0, 0.0, 0.0, 0.5)
    assert (a.eta1, a.layer_decay) == (eta1, layer_decay)


# ----------------------------------------------------------------------------------------------------
# Time input and classifier

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


def test_head_init_is_near_zero():
    """trunc_normal_(std=2e-5) truncates at +-2 in absolute terms (timm's and PyTorch's default), so in effect
    a normal of std 2e-5; the bias starts at 0."""
    net = model.ViT(model.vit_config("B", "imagenet"))
    assert net.head.weight.std().item() == pytest.approx(2e-5, rel=0.01) and torch.all(net.head.bias == 0)


# ----------------------------------------------------------------------------------------------------
# Loss weighting: consistency + both contrastive directions (released) or one direction (paper)

def reference_info_nce(q, k, tau):
    return F.cross_entropy(q @ k.T / tau, torch.arange(len(q)))


def test_contrastive_loss_sums_both_directions():
    torch.manual_seed(0)
    q1, q2, k1, k2 = (F.normalize(torch.randn(6, 8), dim=1) for _ in range(4))
    both = pretrain.contrastive_loss(q1, q2, k1, k2, 0.2)
    one = pretrain.contrastive_loss(q1, q2, k1, k2, 0.2, one_direction=True)
    assert both.item() == pytest.approx((reference_info_nce(q1, k2, 0.2) + reference_info_nce(q2, k1, 0.2)).item(), rel=1e-5)
    assert one.item() == pytest.approx(reference_info_nce(q1, k2, 0.2).item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Mixup / label smoothing loss: the hard-label form equals CE against the explicit soft target

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
    ("S", "cifar10", 2048), ("B", "cifar10", 2048), ("B-Deep", "cifar10", 4096),
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
