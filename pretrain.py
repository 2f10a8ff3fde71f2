"""Stage 1: pre-train the rRCM encoder (paper Sec. 3.3, Algorithm 1, App. C).

Each step, for a batch of images x:
  consistency loss (Eq. 7-8, 11): one time index n for the whole batch; x_{t_n} = x + t_n eps and
      x_{t_{n+1}} = x + t_{n+1} eps share eps, so they are adjacent points of one PF-ODE trajectory.
      InfoNCE pulls h(x_{t_n}, t_n) towards stop-grad h(x_{t_{n+1}}, t_{n+1}) of the *same* online model
      (EMA rate 0), with the other images of the (global) batch as negatives.
  contrastive loss: MoCo-v3 InfoNCE between the online projector output of view 1 and the key of view 2
      at t = sigma_min, from a target copy whose EMA rate rises 0.99 -> 0.9999 (App. C, Eq. 13-15).
The loss is consistency + contrastive, 1 : 1, one contrastive direction: the paper's Algorithm 1 and every
release up to the paper (rrcm_denoiser.py at 099127a); --symmetric adds the second direction (view 2's
query against view 1's key, 2 : 1) that came in commit 25403e9 on 2025-01-23, after acceptance. The
discretisation N grows 20 -> 40 -> 80 (improved consistency training's doubling curriculum). The lr warms
up linearly, then decays with a cosine to 0 at the last step (released code; its config comment says "no
cosine annealing").

--dataset picks the recipe of the released configs (CIFAR-10 rRCM-B, ImageNet rRCM-B/S); every flag left
unset takes that recipe's value, and the resolved configuration is printed at start.

    python pretrain.py --dataset cifar10 --data-dir data --preset B          # one GPU
    torchrun --standalone --nproc_per_node=8 -- pretrain.py --preset B         # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -- pretrain.py --preset B  # two nodes (node_rank=1 on the other)
    python pretrain.py ... --resume                                          # continue out/pretrain/ckpt.pt
    python pretrain.py --dataset imagenet --data-dir IMAGENET --preset B       # ImageNet recipe

Ctrl-C or SIGTERM saves a checkpoint at the current step and exits; --resume continues bit-identically.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import jobs
import kernels
from data import Images, add_workers_flag, batch_indices, generator, local_shards
from jobs import Trainer, gather_rows, warmup_cosine
from model import PRESETS, SIGMA_MIN, ViT, edm_sigmas, global_batchnorm, to_model_space, vit_config


# ----------------------------------------------------------------------------------------------------
# Losses

def consistency_loss(model: ViT, x0, eps, t_n: float, t_next: float, tau: float) -> torch.Tensor:
    """Eq. (7)-(8), (11): InfoNCE between h(x_{t_n}) and stop-grad h(x_{t_{n+1}}) on one trajectory."""
    q = F.normalize(model.features(x0 + t_n * eps, t_n), dim=1)
    with torch.no_grad():  # EMA rate 0: the key is the online model itself, without gradient
        k = F.normalize(model.features(x0 + t_next * eps, t_next), dim=1)
    keys, offset = gather_rows(k)
    return kernels.info_nce(q, keys, tau, offset).mean()


def project(model: ViT, views: tuple, eps) -> list[torch.Tensor]:
    """L2-normalised projector outputs of the views at t = sigma_min. One encoder pass for all views; the
    projector (BatchNorm) sees each view on its own, as in MoCo v3."""
    h = model.features(torch.cat(views) + SIGMA_MIN * eps.repeat(len(views), 1, 1, 1), SIGMA_MIN).chunk(len(views))
    return [F.normalize(model.projector(part), dim=1) for part in h]


def contrastive_loss(queries: list, keys: list, tau: float) -> torch.Tensor:
    """MoCo-v3 InfoNCE of each query against the target key of the other view, summed over the directions
    given: [q1] against [k2] (one direction, Algorithm 1), or [q1, q2] against [k2, k1] (--symmetric)."""
    loss = 0.0
    for q, k in zip(queries, keys):
        gathered, offset = gather_rows(k)
        loss = loss + kernels.info_nce(q, gathered, tau, offset).mean()
    return loss


class Objective(nn.Module):
    """Every online pass of a step in one forward, so DDP sees them all (and syncs gradients once). One
    direction: only view 1 goes through the online encoder and only view 2 through the target, summed 1 : 1
    with consistency (099127a:rrcm/rrcm_denoiser.py:174-180, 198); --symmetric: both views through both."""

    def __init__(self, model: ViT, tau: float, symmetric: bool):
        super().__init__()
        self.model, self.tau, self.symmetric = model, tau, symmetric

    def forward(self, x0, v1, v2, eps, t_n: float, t_next: float, keys: list):
        queries = project(self.model, (v1, v2) if self.symmetric else (v1,), eps)
        return (consistency_loss(self.model, x0, eps, t_n, t_next, self.tau),
                contrastive_loss(queries, keys, self.tau))


def target_views(v1, v2, symmetric: bool) -> tuple:
    """The views the target encodes, in the order of Objective's queries: view 2's key for view 1's query."""
    return (v2, v1) if symmetric else (v2,)


@torch.no_grad()
def update_target(target: ViT, model: ViT, rate: float) -> None:
    for p_t, p in zip(target.parameters(), model.parameters()):
        p_t.lerp_(p, 1 - rate)
    for b_t, b in zip(target.buffers(), model.buffers()):
        b_t.copy_(b)


# ----------------------------------------------------------------------------------------------------
# Schedules

def num_scales(step: int, total_steps: int, start: int = 20, end: int = 80) -> int:
    """N(k) = min(s0 * 2^ceil(k / K'), s1) + 1 with K' = ceil(K / log2(ceil(s1 / s0) + 1)): the iCT
    doubling curriculum exactly as the authors implement it (with ceil, N = 21 only at step 0)."""
    k_prime = math.ceil(total_steps / math.log2(math.ceil(end / start) + 1))
    return min(start * 2 ** math.ceil(step / k_prime), end) + 1


def ema_rate(step: int, total_steps: int, A: float, start: float = 0.99, end: float = 0.9999) -> float:
    """Target EMA rate, App. C Eq. (13)-(15): a square-root ramp pushed through a sigmoid of sharpness A."""
    ramp = math.sqrt(step / total_steps * (end**2 - start**2) + start**2) if step < total_steps else end
    c = 2 / (1 + math.exp(-A * (ramp - start) / (end - start))) - 1
    return c * end + (1 - c) * start


# ----------------------------------------------------------------------------------------------------
# The training loop

def main(argv=None) -> None:
    args = parse_args(argv)
    run = Trainer(args, "pretrain", RUN_KEYS)
    data = Images(args.dataset, args.data_dir, "train", run.device, limit=args.train_images, workers=args.workers)
    if args.batch > len(data):
        raise jobs.UsageError(f"--batch {args.batch} is larger than the training set ({len(data)} images)")
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = ViT(vit_config(args.preset, args.dataset)).to(run.device)
    model.head.requires_grad_(False)  # the classification head is fine-tuning's
    if args.freeze_patch_embed:
        model.patch_embed.requires_grad_(False)
    target = ViT(model.cfg).to(run.device).requires_grad_(False)
    target.load_state_dict(model.state_dict())
    if run.world > 1:  # the projector's BatchNorm sees the global batch, as in the authors' (SyncBatchNorm) runs;
        global_batchnorm(model), global_batchnorm(target)  # before the optimizer takes the parameters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    step = run.resume(model=model, target=target, optimizer=opt)
    objective = run.distribute(Objective(model, args.tau, args.symmetric))
    if args.compile:  # the encoders' blocks, where the time goes; the projector and the losses stay eager
        model.compile_blocks()
        target.compile_blocks()
    run.start(model, to_model_space(data.batch(torch.arange(1))[0]), step, args.steps, forwards_per_image(args.symmetric))
    data.prefetch_steps(step, args.batch, args.seed, run.rank, run.world, args.shards, "pretrain")  # ImageNet: decode ahead

    for step in run.steps(step, args.steps, data=data):
        N = num_scales(step, args.steps)
        sigmas = edm_sigmas(N).tolist()
        n = int(torch.randint(0, N - 1, (1,), generator=generator(torch.device("cpu"), args.seed, "n", step)))
        x0, v1, v2, eps = step_inputs(data, step, args, run.rank, run.world, run.device)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, args.steps, args.warmup, args.lr)
        with run.autocast:
            with torch.no_grad():
                keys = project(target, target_views(v1, v2, args.symmetric), eps)
            loss_cons, loss_ctr = objective(x0, v1, v2, eps, sigmas[n], sigmas[n + 1], keys)
            loss = loss_cons + loss_ctr
        run.check_finite(loss.detach(), dict(consistency=loss_cons.detach(), contrastive=loss_ctr.detach()), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if step >= args.warmup else float("inf"))
        opt.step()
        rate = ema_rate(step, args.steps, args.ema_sharpness)
        update_target(target, model, rate)
        if run.log_due(step + 1):
            run.log(step + 1, dict(consistency=loss_cons, contrastive=loss_ctr), f"lr {opt.param_groups[0]['lr']:.2e}",
                    f"ema {rate:.5f}", f"N {N}", f"grad {grad_norm.item():.3f}")


def step_inputs(data: Images, step: int, args, rank: int, world: int, device) -> tuple[torch.Tensor, ...]:
    """This rank's (x0, v1, v2, eps) of step k in model space, drawn shard by shard (data.local_shards).
    eps is shared by both trajectory points (Eq. 11) and, at t = sigma_min, by both views."""
    parts = []
    for shard, idx in local_shards(batch_indices(len(data), args.batch, step, args.seed, rank, world), rank, world, args.shards):
        g = generator(device, args.seed, "step", step, shard)
        x0, v1, v2 = (to_model_space(v) for v in data.pretrain_views(idx, g))
        parts.append((x0, v1, v2, torch.randn(x0.shape, generator=g, device=device)))
    return tuple(torch.cat(p) for p in zip(*parts))


def forwards_per_image(symmetric: bool) -> int:
    """Forward-equivalents per image and step (a backward counts as 2): online passes with gradients x 3 plus
    passes without. One direction: consistency query + view 1 online (6), consistency key + target view 2
    (2) = 8; --symmetric adds view 2 online and target view 1: 9 + 3 = 12."""
    return 12 if symmetric else 8


# ----------------------------------------------------------------------------------------------------
# The recipes and the flags

# The released configs: configs/cifar10_pretrain_rcmb.py (every preset), imagenet_pretrain_rcmb.py (B) and
# imagenet_pretrain_rcms.py (S, and tiny). No config for ImageNet B-Deep was released: the paper's Table 4
# gives it lr 1e-4, the rest is rRCM-B's. ImageNet keeps the patch embedding at its random init
# (stop_grad_conv1, MoCo v3's trick for stable ViT training).
RECIPES = {
    "cifar10": dict(steps=300_000, batch=2048, lr=1e-4, weight_decay=0.0, warmup=10_000, ema_sharpness=15.0,
                    freeze_patch_embed=False),
    "imagenet": dict(steps=600_000, batch=4096, lr=2e-4, weight_decay=0.03, warmup=15_000, ema_sharpness=10.0,
                     freeze_patch_embed=True),
    "imagenet-S": dict(steps=600_000, batch=4096, lr=1e-4, weight_decay=0.01, warmup=10_000, ema_sharpness=10.0,
                       freeze_patch_embed=True),
    "imagenet-B-Deep": dict(steps=600_000, batch=4096, lr=1e-4, weight_decay=0.03, warmup=15_000, ema_sharpness=10.0,
                            freeze_patch_embed=True),  # paper Table 4's lr; not a released config
}
TAU_RANGE = (0.01, 1.0)  # the paper and MoCo v3 (ViT) use 0.2


IMAGENET_RECIPES = {"S": "imagenet-S", "tiny": "imagenet-S", "B-Deep": "imagenet-B-Deep"}  # else "imagenet" (B's)


def recipe_name(dataset: str, preset: str) -> str:
    return IMAGENET_RECIPES.get(preset, dataset) if dataset == "imagenet" else dataset


def recipe_help(key: str) -> str:
    return ", ".join(f"{d} {r[key]:g}" for d, r in RECIPES.items())


def parse_args(argv=None) -> argparse.Namespace:
    p = jobs.Parser("pretrain.py", "rRCM pre-training")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="cifar10", choices=("cifar10", "imagenet"), help="picks the recipe below")
    g.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/ or ImageNet train/ val/")
    g.add_argument("--train-images", type=jobs.at_least(1), default=None, help="train on a fixed, seeded subset of N "
                   "training images (quick trials)")
    g.add_argument("--preset", default="B", choices=PRESETS, help="paper Table 3 (tiny: ours, for CPUs and tests)")
    add_workers_flag(g)
    g = p.add_argument_group("optimisation (unset: the --dataset recipe's value)")
    g.add_argument("--steps", type=jobs.at_least(1), default=None, help=recipe_help("steps"))
    g.add_argument("--batch", type=jobs.at_least(1), default=None, help="global batch, split across ranks: " + recipe_help("batch"))
    g.add_argument("--lr", type=jobs.positive, default=None, help="AdamW peak lr: " + recipe_help("lr"))
    g.add_argument("--weight-decay", type=jobs.non_negative, default=None, help=recipe_help("weight_decay"))
    g.add_argument("--warmup", type=jobs.at_least(0), default=None, help="linear warm-up steps, then cosine to 0 (0: a "
                   "constant lr): " + recipe_help("warmup"))
    g.add_argument("--grad-clip", type=jobs.positive, default=2.0, help="max grad norm, applied after warm-up")
    g = p.add_argument_group("rRCM")
    g.add_argument("--tau", type=tau, default=0.2, help=f"InfoNCE temperature of both losses, in [{TAU_RANGE[0]:g}, "
                   f"{TAU_RANGE[1]:g}]")
    g.add_argument("--ema-sharpness", type=jobs.positive, default=None, help="A of the target EMA sigmoid: " + recipe_help("ema_sharpness"))
    g.add_argument("--symmetric", action="store_true",
                   help="add the second contrastive direction (view 2's query against view 1's key; 2 : 1 with "
                        "consistency), as the released code since 2025-01-23; default: one direction, 1 : 1, as the "
                        "paper's Algorithm 1 and the code the paper's tables came from")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="out/pretrain", help="directory for ckpt.pt and log.txt")
    jobs.add_run_flags(g, 5000, "also the last, and on SIGINT/SIGTERM")
    args = p.parse_args(argv)
    for key, value in RECIPES[recipe_name(args.dataset, args.preset)].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.batch < 2:
        p.error("--batch must be >= 2: the projector's BatchNorm normalises over the batch (one image has no variance)")
    args.data_dir = os.path.abspath(args.data_dir)  # resuming checks it, so it must not depend on the cwd
    return args


def tau(text: str) -> float:
    """--tau in TAU_RANGE: unit vectors give logits within +-1/tau; below 0.01 they pass +-100 and the loss scales
    as 1/tau, above 1 InfoNCE sits near log(batch) whatever the features."""
    value = float(text)
    if not TAU_RANGE[0] <= value <= TAU_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}], got {value}: the logits "
                                         f"q.k / tau of unit vectors span +-{1 / value:.3g} (the paper uses 0.2)")
    return value
tau.__name__ = "float"


RUN_KEYS = ("dataset", "data_dir", "train_images", "preset", "steps", "batch", "lr", "weight_decay", "warmup",
            "grad_clip", "tau", "ema_sharpness", "symmetric", "seed", "shards", "precision")


if __name__ == "__main__":
    jobs.run_script(main)
