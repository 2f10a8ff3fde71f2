"""Stage 2: fine-tune the encoder at one noise level sigma (paper Sec. 3.4, Eq. 12).

Every image gets m = 2 noisy copies x + sigma * eps (pixel space; 2 sigma in model space, read at the time
t of the 81-point grid nearest 2 sigma, model.smoothing_time). The loss is the consistency regulariser of
Jeong & Shin (2020):
    mean_i CE(f(x_i), y) + eta1 * mean_i KL(p_bar || p_i) + eta2 * H(p_bar),   p_bar = mean_i p_i
AdamW with layer-wise lr decay; the lr warms up linearly, then follows a cosine, set once per epoch, and is
not scaled by the batch size (the authors' logs: scale_lr false; --scale-lr gives the released configs'
lr x batch / 256). Clean and noisy test accuracy every epoch.

--dataset picks the recipe the authors' fine-tuning logs record (logs/finetune/*/cnsisv1_sigma*.log at
commit 5716a39: batch 1024 and lr 2e-4 (1e-4 for ImageNet at sigma 1.0) for all six runs); every flag left
unset takes its value, and the resolved configuration is printed.
CIFAR-10: no augmentation, the classifier reads the raw class token. ImageNet: RandAugment, mixup/cutmix,
label smoothing, the final LayerNorm on. As in the released code the linear head of a pre-trained encoder
stays at its near-zero random init (--train-head trains it, as the paper's text says); from scratch
(the baselines) it is trained.

    python finetune.py --init out/pretrain/ckpt.pt --sigma 0.25             # rRCM
    python finetune.py --init scratch --preset B --sigma 0.25 --eta1 0 --eta2 0   # Gaussian baseline (Cohen et al.)
    python finetune.py --init scratch --preset B --sigma 0.25               # Consistency baseline (Jeong & Shin)
    python finetune.py --init scratch --preset B --sigma 0.25 --objective macer   # SmoothAdv, MACER, SmoothMix: comparators.py
    torchrun --standalone --nproc_per_node=8 -- finetune.py --init ... --sigma 0.5

Ctrl-C or SIGTERM saves a checkpoint at the current step and exits; the same command continues bit-identically
(a requeued job, torchrun --max-restarts: docs/clusters.md).
"""
import argparse
import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import comparators
import jobs
import kernels
from augment import mixup_cutmix
from data import FINETUNE_AUGMENTS, Images, add_workers_flag, batch_indices, generator, local_shards, seeded_noise
from jobs import load_checkpoint, model_from_checkpoint
from trainer import Trainer, add_run_flags, warmup_cosine
from model import PRESETS, SIGMA_MIN, ViT, noisy_input, smoothing_time, to_model_space, vit_config

COPIES = 2  # m noisy copies per image
# The authors fine-tuned on 8 processes (099127a:readme.md:61 `accelerate launch --num_processes 8`, with
# split_batches=True, rrcm_tune.py:532), each applying timm's Mixup to its own 1/8 of the global batch: 8
# mixing lambdas per step, partners taken within each eighth. A run with fewer shards does the same.
MIXUP_GROUPS = 8


# ----------------------------------------------------------------------------------------------------
# Loss, Eq. (12)

def classification_loss(logits: torch.Tensor, y_a: torch.Tensor, smoothing: float = 0.0, y_b: torch.Tensor | None = None,
                        lam: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy against the soft target lam * smooth(y_a) + (1 - lam) * smooth(y_b) (per row lam;
    y_b only with mixup/cutmix), smooth(y) = (1 - s) onehot(y) + s / C: by linearity, hard-label CE terms
    plus s times the mean of -log p over the classes, so the fused hard-label kernel still serves. In fp32
    whatever autocast made the logits: a bf16 result would carry 3 significant digits."""
    logits = logits.float()
    ce = kernels.cross_entropy(logits, y_a)
    if y_b is not None:
        ce = lam * ce + (1 - lam) * kernels.cross_entropy(logits, y_b)
    if smoothing:
        uniform = -F.log_softmax(logits, dim=-1).mean(-1)
        ce = (1 - smoothing) * ce + smoothing * uniform
    return ce.mean()


def finetune_loss(logits: torch.Tensor, y: torch.Tensor, eta1: float, eta2: float, smoothing: float = 0.0,
                  y_b: torch.Tensor | None = None, lam: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. (12). logits: [m, B, C] for the m noisy copies of a batch with labels y [B] (mixed with y_b [B]
    at per-image weight lam [B] by mixup/cutmix). Every term in fp32, under autocast too. As released
    (rrcm_tune.py consistency_loss), the KL is to the mean p_bar, which is not detached."""
    m, B, C = logits.shape
    if y_b is None:
        ce = classification_loss(logits.reshape(m * B, C), y.repeat(m), smoothing)
    else:
        ce = classification_loss(logits.reshape(m * B, C), y.repeat(m), smoothing, y_b.repeat(m), lam.repeat(m))
    log_p = F.log_softmax(logits.float(), dim=-1)
    p_bar = log_p.exp().mean(0)
    # KL(p_bar || p_i) = sum_c p_bar (log p_bar - log p_i); xlogy makes 0 log 0 = 0 exactly. It is >= 0 (Gibbs),
    # but for near-equal copies (a near-zero head) rounding of the two sums can dip below 0: clamp per row.
    kl = (torch.special.xlogy(p_bar, p_bar).sum(-1) - (p_bar * log_p).sum(-1)).clamp_min(0).mean()
    entropy = -torch.special.xlogy(p_bar, p_bar).sum(-1).mean()
    return ce + eta1 * kl + eta2 * entropy, dict(ce=ce, kl=kl, entropy=entropy)


# ----------------------------------------------------------------------------------------------------
# The training loop

def main(argv=None) -> None:
    args = parse_args(argv)
    run = Trainer(args, "finetune", RUN_KEYS + comparators.run_keys(args))
    model = build_model(args).to(run.device)
    train = Images(args.dataset, args.data_dir, "train", run.device, limit=args.train_images, workers=args.workers)
    test = Images(args.dataset, args.data_dir, "test", run.device, workers=args.workers)
    steps_per_epoch = len(train) // args.batch
    if steps_per_epoch == 0:
        raise jobs.UsageError(f"--batch {args.batch} is larger than the training set ({len(train)} images)")
    peak_lr = args.lr * args.batch / 256 if args.scale_lr else args.lr
    opt = torch.optim.AdamW(layer_groups(model, args.layer_decay), lr=peak_lr, weight_decay=0.0)
    total = args.epochs * steps_per_epoch
    step = run.resume(model=model, optimizer=opt)
    comparator = args.objective != "rrcm"
    forwards, grad_passes = comparators.passes(args) if comparator else (COPIES * 3, COPIES)
    micro = run.micro_batch(args.micro_batch, model, grad_passes, input_bytes=(2 + grad_passes) * 3 * model.cfg.img_size ** 2 * 4)
    net = run.distribute(model)
    if args.compile:
        model.compile_blocks()
    run.start(model, to_model_space(test.batch(torch.arange(1))[0]), step, total, forwards,
              f" | {total} steps | peak lr {peak_lr:.3g} | t = {smoothing_time(args.sigma):.4f} | objective {args.objective}")
    train.prefetch_steps(step, args.batch, args.seed, run.rank, run.world, args.shards, args.augment)  # ImageNet: decode ahead

    for step in run.steps(step, total, save_also=lambda done: done % steps_per_epoch == 0, data=train):
        lr = warmup_cosine(step // steps_per_epoch, args.schedule_epochs, args.warmup_epochs, peak_lr)  # set per epoch
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        opt.zero_grad(set_to_none=True)
        if comparator:  # SmoothAdv, MACER or SmoothMix instead of Eq. (12): the same loop around another loss
            x, eps, y, _, _, u = clean_inputs(train, step, args, run.rank, run.world, run.device, args.noise_samples)
            t = smoothing_time(args.sigma)
            loss, parts = backward_micro_batches(net, len(y), micro or len(y), run.autocast, lambda rows: comparators.batch_loss(
                args, net, model, x[rows], eps[:, rows], y[rows], u[rows], t, step // steps_per_epoch))
            run.check_finite(loss, parts, step)
        elif micro is None:
            x_t, t, y_a, y_b, lam = step_inputs(train, step, args, run.rank, run.world, run.device)
            with run.autocast:
                logits = net(x_t, t).reshape(COPIES, len(y_a), -1)
                loss, parts = finetune_loss(logits, y_a, args.eta1, args.eta2, args.label_smoothing, y_b, lam)
            run.check_finite(loss.detach(), {k: v.detach() for k, v in parts.items()}, step)
            loss.backward()
        else:
            x_t, t, y_a, y_b, lam = step_inputs(train, step, args, run.rank, run.world, run.device)
            loss, parts = backward_micro_batches(net, len(y_a), micro, run.autocast, eq12_rows(net, x_t, t, y_a, y_b, lam, args))
            run.check_finite(loss, parts, step)  # before the optimizer step: the weights stay untouched
        opt.step()
        if run.log_due(step + 1):  # the lr is the head's (lr_scale 1), as the authors' logs print it
            run.log(step + 1, dict(loss=loss, **parts), f"lr {lr:.2e}")
        if (step + 1) % steps_per_epoch == 0:
            clean, noisy = evaluate(model, test, args.sigma, args.eval_images, args.seed, run.rank, run.world, args.batch, run.autocast)
            run.log_line(f"epoch {(step + 1) // steps_per_epoch} | clean acc {clean:.4f} | noisy acc (sigma {args.sigma:g}) {noisy:.4f}")


def step_inputs(train: Images, step: int, args, rank: int, world: int, device) -> tuple:
    """This rank's batch of step k: (x_t, t, y_a, y_b, lam) with the m noisy copies stacked (`clean_inputs`)."""
    x, eps, y_a, y_b, lam, _ = clean_inputs(train, step, args, rank, world, device, COPIES)
    x_t, t = noisy_input(x.expand(COPIES, *x.shape), args.sigma, eps)
    return x_t.flatten(0, 1), t, y_a, y_b, lam


def clean_inputs(train: Images, step: int, args, rank: int, world: int, device, copies: int) -> tuple:
    """This rank's batch of step k in pixel space: (x, eps, y_a, y_b, lam, u) with `copies` noise draws eps
    [copies, B, ...], drawn shard by shard (data.local_shards); y_b and lam (per image) are None without
    mixup/cutmix; u [B]: one uniform per image for a comparator (SmoothMix's mixing weight), drawn last so that
    nothing before it depends on it. Mixing comes before the noise, so both copies share the mixed image (as
    released). Each shard is mixed in ceil(MIXUP_GROUPS / shards) groups, so a step draws MIXUP_GROUPS lambdas, as
    the authors' 8 processes did."""
    mixing = args.mixup > 0 or args.cutmix > 0
    xs, ys_a, ys_b, lams, epss, us = [], [], [], [], [], []
    for shard, idx in local_shards(batch_indices(len(train), args.batch, step, args.seed, rank, world), rank, world, args.shards):
        g = generator(device, args.seed, "step", step, shard)
        x, y = train.finetune_batch(idx, g, args.augment)
        if mixing:
            groups = min(len(y), -(-MIXUP_GROUPS // args.shards))
            mixed = [mixup_cutmix(xg, yg, g, args.mixup, args.cutmix) for xg, yg in zip(x.tensor_split(groups), y.tensor_split(groups))]
            x, y = torch.cat([m[0] for m in mixed]), torch.cat([m[1] for m in mixed])
            ys_b.append(torch.cat([m[2] for m in mixed]))
            lams.append(torch.cat([torch.full((len(m[1]),), m[3], device=device) for m in mixed]))
        xs.append(x), ys_a.append(y)
        epss.append(torch.randn((copies, *x.shape), generator=g, device=device))
        us.append(torch.rand(len(y), generator=g, device=device))
    y_b, lam = (torch.cat(ys_b), torch.cat(lams)) if mixing else (None, None)
    return torch.cat(xs), torch.cat(epss, dim=1), torch.cat(ys_a), y_b, lam, torch.cat(us)


def backward_micro_batches(net: nn.Module, B: int, micro: int, autocast, loss_of) -> tuple[torch.Tensor, dict]:
    """The step's loss and gradients `micro` of its B images (with their noisy copies) at a time, loss_of(rows) giving
    (loss, terms) of the images `rows`: every term of Eq. (12), and of each comparator, is a mean over the images,
    so the batch's loss is the micro-batches' losses weighted by their share, and so are its gradients (exact, to
    float rounding). DDP syncs gradients once, after the last micro-batch."""
    loss, parts = 0.0, {}
    for k in range(0, B, micro):
        rows = slice(k, k + micro)
        last = k + micro >= B
        with (contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()):
            with autocast:
                part_loss, part = loss_of(rows)
            share = len(range(B)[rows]) / B
            (share * part_loss).backward()
        loss = loss + share * part_loss.detach()
        parts = {name: parts.get(name, 0.0) + share * v.detach() for name, v in part.items()}
    return loss, parts


def eq12_rows(net: nn.Module, x_t, t, y_a, y_b, lam, args):
    """loss_of(rows) for `backward_micro_batches`: Eq. (12) on the images `rows` of the step's batch."""
    copies = x_t.view(COPIES, len(y_a), *x_t.shape[1:])

    def loss_of(rows: slice) -> tuple[torch.Tensor, dict]:
        logits = net(copies[:, rows].flatten(0, 1), t).reshape(COPIES, len(y_a[rows]), -1)
        return finetune_loss(logits, y_a[rows], args.eta1, args.eta2, args.label_smoothing,
                             None if y_b is None else y_b[rows], None if lam is None else lam[rows])
    return loss_of


@torch.no_grad()
def evaluate(model: nn.Module, test: Images, sigma: float, count: int, seed: int, rank: int, world: int, batch: int,
             autocast) -> tuple[float, float]:
    """(clean, noisy) top-1 accuracy on `count` test images spread evenly over the test set (ImageNet's val folder
    is sorted by class: the first 10,000 would be 200 classes): clean read at t = sigma_min (the end of the
    trajectory, as the released evaluation), noisy at the smoothing time of sigma. Noise is seeded per image
    index, so every epoch sees the same noise."""
    import torch.distributed as dist
    model.eval()
    correct = torch.zeros(2, device=test.labels.device)
    chosen = torch.arange(0, len(test), max(1, len(test) // count))[:count]
    idx = chosen[rank::world]
    test.prefetch(idx.split(batch))  # ImageNet: decode ahead of the loop
    for chunk in idx.split(batch):
        x, y = test.batch(chunk)
        eps = seeded_noise(x.shape[1:], chunk, x.device, seed, "eval")
        with autocast:
            correct[0] += (model(to_model_space(x), SIGMA_MIN).argmax(1) == y).sum()
            correct[1] += (model(*noisy_input(x, sigma, eps)).argmax(1) == y).sum()
    if world > 1:
        dist.all_reduce(correct)
    model.train()
    n = len(chosen)
    return (correct[0] / n).item(), (correct[1] / n).item()


def build_model(args) -> ViT:
    if args.init == "scratch":
        torch.manual_seed(args.seed)
        model = ViT(vit_config(args.preset, args.dataset))
    else:
        ckpt = load_checkpoint(args.init, "pretrain")
        if ckpt["config"]["dataset"] != args.dataset:
            raise jobs.UsageError(f"{args.init} was pre-trained on {ckpt['config']['dataset']}, not --dataset {args.dataset}")
        model = model_from_checkpoint(ckpt)  # the online encoder (MoCo v3 fine-tunes the online one, too)
    model.cfg.classifier_norm = args.dataset == "imagenet"  # released train.layernorm
    model.norm.requires_grad_(model.cfg.classifier_norm)  # unused without it
    model.projector.requires_grad_(False)  # pre-training's; unused here
    model.head.requires_grad_(args.train_head or args.init == "scratch")
    return model


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_groups(model: ViT, decay: float) -> list[dict]:
    """Layer-wise lr decay: embeddings get lr * decay^(depth+1), block i lr * decay^(depth-i), head lr."""
    depth = model.cfg.depth
    groups: dict[int, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(layer_id(name, depth), []).append(p)
    return [dict(params=ps, lr_scale=decay ** (depth + 1 - layer)) for layer, ps in sorted(groups.items())]


# ----------------------------------------------------------------------------------------------------
# The recipes and the flags

# The recipes of the authors' six fine-tuning logs (the config each log opens with), which made the
# paper's tables: 5716a39:logs/finetune/{cifar10,imagenet}-rRCM-B/cnsisv1_sigma*.log. They differ from the
# released README commands (ImageNet batch 2048 / 256 at sigma 0.5 / 1.0) and configs (scale_lr=True).
RECIPES = {
    "cifar10": {sigma: dict(epochs=100, warmup_epochs=10, schedule_epochs=None, batch=1024, lr=2e-4,
                            layer_decay=layer_decay, eta1=eta1, eta2=0.5, augment="weak", mixup=0.0, cutmix=0.0,
                            label_smoothing=0.0)
                for sigma, eta1, layer_decay in ((0.25, 10.0, 0.75), (0.5, 20.0, 0.75), (1.0, 20.0, 0.65))},
    "imagenet": {sigma: dict(epochs=epochs, warmup_epochs=5, schedule_epochs=schedule, batch=batch, lr=lr, layer_decay=0.65,
                             eta1=eta1, eta2=0.5, augment=augment, mixup=0.8, cutmix=1.0, label_smoothing=smoothing)
                 for sigma, epochs, schedule, batch, lr, augment, smoothing, eta1 in (
                     (0.25, 150, None, 1024, 2e-4, "autoaug", 0.1, 10.0),
                     # the 50-epoch run keeps its config's 150-epoch cosine (its log: total_training_steps 150);
                     # batch 1024 as its log:4 records (the released README command says 2048)
                     (0.5, 50, 150, 1024, 2e-4, "strong", 0.0, 20.0),
                     (1.0, 150, None, 1024, 1e-4, "weak", 0.0, 20.0))},  # log:4 batch 1024 (README: 256)
}


def recipe(dataset: str, sigma: float) -> dict:
    """The logged recipe of the listed sigma nearest to `sigma`."""
    listed = RECIPES[dataset]
    return listed[min(listed, key=lambda s: abs(math.log(s / sigma)))]


def parse_args(argv=None) -> argparse.Namespace:
    p = jobs.Parser("finetune.py", "rRCM fine-tuning")
    unset = "unset: the recipe of --dataset at the nearest of sigma 0.25 / 0.5 / 1.0"
    g = p.add_argument_group("what to fine-tune")
    g.add_argument("--init", default="out/pretrain/ckpt.pt", help="pre-trained checkpoint, or 'scratch' for the baselines")
    g.add_argument("--preset", default=None, choices=PRESETS, help="with --init scratch: paper Table 3 (tiny: ours)")
    g.add_argument("--dataset", default="cifar10", choices=RECIPES, help="picks the recipe")
    g.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/ or ImageNet train/ val/")
    g.add_argument("--train-images", type=jobs.at_least(1), default=None, help="train on a fixed, seeded subset of N training images (quick trials)")
    add_workers_flag(g)
    g.add_argument("--sigma", type=jobs.positive, default=0.25, help="noise std in pixel space [0, 1]")
    g.add_argument("--train-head", action="store_true", help="train the linear head of a pre-trained encoder (paper "
                   "text); the released code leaves it at its random init. Always trained with --init scratch")
    g = p.add_argument_group(f"loss, Eq. (12) ({unset})")
    g.add_argument("--eta1", type=jobs.non_negative, default=None, help="KL weight: 10 at sigma 0.25, 20 at 0.5 and 1.0")
    g.add_argument("--eta2", type=jobs.non_negative, default=None, help="entropy weight: 0.5")
    g.add_argument("--label-smoothing", type=jobs.interval(0, 1), default=None, help="cifar10 0; imagenet 0.1 / 0 / 0; only with "
                   "--mixup or --cutmix (the released code smooths only through timm's mixed targets)")
    g = p.add_argument_group(f"optimisation ({unset})")
    g.add_argument("--epochs", type=jobs.at_least(1), default=None, help="cifar10 100; imagenet 150 / 50 / 150")
    g.add_argument("--warmup-epochs", type=jobs.at_least(0), default=None, help="then a cosine; 0: a constant lr. cifar10 10; imagenet 5")
    g.add_argument("--schedule-epochs", type=jobs.at_least(1), default=None, help="where the cosine reaches 0: --epochs, except "
                   "imagenet at sigma 0.5: 150 (its 50-epoch run ends at 78%% of the peak lr, as released)")
    g.add_argument("--batch", type=jobs.at_least(1), default=None, help="global batch of images (each gets 2 noisy copies): "
                   "1024 (the authors' logs, both datasets, every sigma)")
    g.add_argument("--lr", type=jobs.positive, default=None, help="peak lr: cifar10 2e-4; imagenet 2e-4 / 2e-4 / 1e-4")
    g.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=False, help="peak lr = lr * batch "
                   "/ 256, as the released configs (scale_lr=True); the authors' logs ran without (scale_lr: false)")
    g.add_argument("--layer-decay", type=jobs.interval(0, 1, low_open=True, high_open=False), default=None, help="layer-wise lr decay: cifar10 0.75 / 0.75 / 0.65; imagenet 0.65")
    g = p.add_argument_group(f"augmentation ({unset})")
    g.add_argument("--augment", default=None, choices=FINETUNE_AUGMENTS,
                   help="released names (data.Images.finetune_batch): cifar10 weak (= none); imagenet autoaug "
                        "(RandAugment rand-m9-mstd0.5-inc1) / strong / weak")
    g.add_argument("--mixup", type=jobs.non_negative, default=None, help="mixup Beta alpha (0: off): cifar10 0; imagenet 0.8")
    g.add_argument("--cutmix", type=jobs.non_negative, default=None, help="cutmix Beta alpha (0: off): cifar10 0; imagenet 1.0")
    comparators.add_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="directory for ckpt.pt and log.txt; unset: out/finetune_sigma<sigma>")
    g.add_argument("--micro-batch", type=jobs.at_least(1), default=None, help="images (each with its noisy copies) "
                   "per forward and backward, gradients accumulated: the whole batch's step; unset: the whole batch "
                   "where it fits the device's free memory, else the largest micro-batch that does")
    g.add_argument("--eval-images", type=jobs.at_least(1), default=10_000, help="test images for the per-epoch accuracies, spread evenly over the test set")
    add_run_flags(g, 1000, "also at each epoch end and on SIGINT/SIGTERM")
    args = p.parse_args(argv)
    explicit_smoothing = args.label_smoothing is not None
    comparators.resolve(args, p.error)
    if args.objective != "rrcm":  # its paper's inputs and its own loss: no mixing, no smoothing, no Eq. (12) weights
        args.mixup = args.cutmix = args.label_smoothing = 0.0
    for key, value in recipe(args.dataset, args.sigma).items():
        if getattr(args, key) is None and not (args.objective != "rrcm" and key in ("eta1", "eta2")):
            setattr(args, key, value)
    mixing = args.mixup > 0 or args.cutmix > 0
    args.schedule_epochs = max(args.schedule_epochs or args.epochs, args.epochs)
    if args.label_smoothing and not mixing:
        # rrcm_tune.py:662-664 (099127a): timm's mixed targets carry the smoothing; without mixing there is none
        if explicit_smoothing:
            p.error("--label-smoothing needs --mixup or --cutmix: the released code smooths labels only through "
                    "timm's mixed targets")
        args.label_smoothing = 0.0  # the recipe's 0.1 (imagenet, sigma 0.25) with mixing turned off
    if args.init == "scratch" and args.preset is None:
        p.error("--init scratch needs --preset")
    if args.init != "scratch" and args.preset is not None:
        p.error("--preset only goes with --init scratch (a checkpoint knows its own shape)")
    args.out = args.out or f"out/finetune_sigma{args.sigma:g}"
    args.data_dir = os.path.abspath(args.data_dir)  # resuming checks it, so it must not depend on the cwd
    return args


RUN_KEYS = ("init", "preset", "dataset", "data_dir", "train_images", "sigma", "train_head", "eta1", "eta2", "label_smoothing",
            "epochs", "warmup_epochs", "schedule_epochs", "batch", "lr", "scale_lr", "layer_decay", "augment", "mixup",
            "cutmix", "seed", "shards", "precision")



if __name__ == "__main__":
    jobs.run_script(main)
