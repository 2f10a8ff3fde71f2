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
    python pretrain.py --dataset imagenet --data-dir IMAGENET --preset B       # ImageNet recipe

Ctrl-C or SIGTERM saves a checkpoint at the current step and exits; the same command continues bit-identically
(a requeued job, torchrun --max-restarts: docs/clusters.md).
"""
import argparse
import math
import os
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

import jobs
import kernels
from data import Images, add_workers_flag, batch_indices, generator, local_shards
from jobs import gather_rows
from trainer import Trainer, add_run_flags, warmup_cosine
from model import PRESETS, SIGMA_MAX, SIGMA_MIN, ViT, edm_sigmas, global_batchnorm, to_model_space, vit_config


# ----------------------------------------------------------------------------------------------------
# Losses

def consistency_loss(h_query: torch.Tensor, h_key: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. (7)-(8), (11): InfoNCE of h(x_{t_n}, t_n) against the stop-grad key h(x_{t_{n+1}}, t_{n+1}) of the same
    trajectory (the same eps), the other images' keys of the global batch as negatives."""
    keys, offset = gather_rows(F.normalize(h_key, dim=1))
    return kernels.info_nce(F.normalize(h_query, dim=1), keys, tau, offset).mean()


def contrastive_loss(model: ViT, h_views: torch.Tensor, keys: list, tau: float) -> torch.Tensor:
    """MoCo v3: the online projector's outputs of the query views against the target's keys of the other views,
    summed over the directions: view 1 against view 2's key (Algorithm 1), or both ways (--symmetric)."""
    loss = 0.0
    for h, k in zip(h_views.chunk(len(keys)), keys):  # the projector's BatchNorm sees each view on its own
        gathered, offset = gather_rows(k)
        loss = loss + kernels.info_nce(F.normalize(model.projector(h), dim=1), gathered, tau, offset).mean()
    return loss


def losses(model: ViT, h_query, h_views, h_key, keys, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(consistency, contrastive) from the encoder's outputs; a term left out by --objective is 0."""
    zero = torch.zeros((), device=(h_query if h_query is not None else h_views).device)
    return (consistency_loss(h_query, h_key, tau) if h_query is not None else zero,
            contrastive_loss(model, h_views, keys, tau) if h_views is not None else zero)


# ----------------------------------------------------------------------------------------------------
# Encoder passes. A view is (x, t, eps), the point x + t eps of the trajectory of x, with one time per image
# (the same for all but under --objective moco-noise); a term left out by --objective has no views.

def point(x: torch.Tensor, t: float, eps: torch.Tensor) -> tuple:
    """The view x + t eps, every image at time t."""
    return x, torch.full((len(x),), t, device=x.device), eps


def noisy(views: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's input x + t eps of views, one after the other, and its times."""
    return torch.cat([x + t[:, None, None, None] * e for x, t, e in views]), torch.cat([t for _, t, _ in views])


class OnlinePasses(nn.Module):
    """Every online pass with gradient of a step in one forward, so DDP sees them all and syncs gradients once:
    the consistency query x_{t_n} and the contrastive query views. Both losses are summed 1 : 1 (Algorithm 1,
    099127a:rrcm/rrcm_denoiser.py:174-198)."""

    def __init__(self, model: ViT, tau: float):
        super().__init__()
        self.model, self.tau = model, tau

    def forward(self, query: list, views: list, h_key, keys) -> tuple[torch.Tensor, torch.Tensor]:
        h_query = self.model.features(*noisy(query)) if query else None
        h_views = self.model.features(*noisy(views)) if views else None
        return losses(self.model, h_query, h_views, h_key, keys, self.tau)


@torch.no_grad()
def encode(model: ViT, views: list[tuple], micro: int | None) -> torch.Tensor | None:
    """model.features of views without gradient, `micro` images at a time (all at once if None); None for no views."""
    if not views:
        return None
    if micro is None:
        return model.features(*noisy(views))
    return torch.cat([model.features(*noisy([part])) for part in micro_batches(views, micro)])


@torch.no_grad()
def project(model: ViT, views: list[tuple], micro: int | None = None) -> list[torch.Tensor] | None:
    """The target's contrastive keys: L2-normalised projector outputs of each view (its BatchNorm over the view)."""
    if not views:
        return None
    return [F.normalize(model.projector(h), dim=1) for h in encode(model, views, micro).chunk(len(views))]


def losses_and_gradients(run: Trainer, net: nn.Module, query: list, views: list, h_key, keys, micro: int | None,
                         step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The online passes: the step's (consistency, contrastive) losses, checked finite before any gradient exists,
    and their gradients in the model's .grad, from the whole batch at once or `micro` images at a time."""
    with run.autocast:
        if micro is None:
            loss_cons, loss_ctr = net(query, views, h_key, keys)
        else:  # net is not DDP-wrapped here: the micro-batches average the gradients themselves
            outputs, (loss_cons, loss_ctr) = cached_losses(net, query, views, h_key, keys, micro)
    run.check_finite((loss_cons + loss_ctr).detach(), dict(consistency=loss_cons.detach(), contrastive=loss_ctr.detach()), step)
    (loss_cons + loss_ctr).backward()
    if micro is not None:
        backward_micro_batches(net.model, outputs, micro, run.autocast)
        run.average_gradients(net.model)
    return loss_cons, loss_ctr


# ----------------------------------------------------------------------------------------------------
# Micro-batches: the whole batch's gradients at one micro-batch's memory (GradCache, Gao et al. 2021). The keys
# carry no gradient and each query's loss depends on its own row, so: the encoder outputs without gradient, micro-
# batch by micro-batch; the projector, its BatchNorm and both losses on the whole batch with gradient w.r.t. those
# outputs; then each micro-batch encoded again with gradient and handed its rows of the outputs' gradient. Exact,
# for one more encoder forward.

def micro_batches(views: list[tuple], micro: int) -> Iterator[tuple]:
    """The views cut into views of at most `micro` images, in order."""
    for x, t, e in views:
        for k in range(0, len(x), micro):
            yield x[k:k + micro], t[k:k + micro], e[k:k + micro]


def cached_losses(online: OnlinePasses, query: list, views: list, h_key, keys, micro: int) -> tuple[list, tuple]:
    """([(views, their encoder outputs as leaves that collect the gradient)], (consistency, contrastive))."""
    outputs = [(part, encode(online.model, part, micro).requires_grad_()) for part in (query, views) if part]
    h_query = outputs[0][1] if query else None
    h_views = outputs[-1][1] if views else None
    return outputs, losses(online.model, h_query, h_views, h_key, keys, online.tau)


def backward_micro_batches(model: ViT, outputs: list, micro: int, autocast) -> None:
    """The encoder's share of the gradient: each micro-batch encoded again with gradient and its output given its
    rows of the cached outputs' gradient."""
    for views, h in outputs:
        rows = 0
        for part in micro_batches(views, micro):
            with autocast:
                out = model.features(*noisy([part]))
            out.backward(h.grad[rows:rows + len(out)])
            rows += len(out)


# ----------------------------------------------------------------------------------------------------
# Schedules: the trajectory's discretisation, the points each step aligns, the target's EMA

def num_scales(step: int, total_steps: int, start: int = 20, end: int = 80) -> int:
    """N(k) = min(s0 * 2^ceil(k / K'), s1) + 1 with K' = ceil(K / log2(ceil(s1 / s0) + 1)): the iCT
    doubling curriculum exactly as the authors implement it (with ceil, N = 21 only at step 0)."""
    k_prime = math.ceil(total_steps / math.log2(math.ceil(end / start) + 1))
    return min(start * 2 ** math.ceil(step / k_prime), end) + 1


def consistency_times(step: int, args) -> tuple[float, float, list[float]]:
    """(t_n, the key's time, the step's grid t_0 > ... > t_{N-1}): n uniform in 0 .. N - 2 and the adjacent point
    t_{n+1} (Eq. 11). Ablations (App. G, Fig. 11): --align initial keys to the trajectory's initial point sigma_min;
    --query-times draws t_n from a set or an interval instead; --sigma-max ends the trajectory at T. One draw per
    step, the same on every rank."""
    sigmas = edm_sigmas(num_scales(step, args.steps), args.sigma_max).tolist()
    g = generator(torch.device("cpu"), args.seed, "n", step)
    if args.query_times is None:
        n = int(torch.randint(0, len(sigmas) - 1, (1,), generator=g))
        t_n, t_next = sigmas[n], sigmas[n + 1]
    elif isinstance(args.query_times, tuple):  # an interval (low, high)
        t_n = args.query_times[0] + float(torch.rand(1, generator=g)) * (args.query_times[1] - args.query_times[0])
    else:
        t_n = args.query_times[int(torch.randint(0, len(args.query_times), (1,), generator=g))]
    return t_n, (SIGMA_MIN if args.align == "initial" else t_next), sigmas


def contrastive_views(v1, v2, eps, view_noise, sigmas: list[float]) -> list[tuple]:
    """The two MoCo views: read at t = sigma_min with the trajectory's eps (App. C); under --objective moco-noise
    each view with its own eps at a time drawn per image from the step's grid."""
    if view_noise is None:
        return [point(v1, SIGMA_MIN, eps), point(v2, SIGMA_MIN, eps)]
    u, e = view_noise
    grid = torch.tensor(sigmas, dtype=torch.float32, device=v1.device)
    times = grid[(u * len(sigmas)).long().clamp_max(len(sigmas) - 1)]
    return [(v1, times[0], e[0]), (v2, times[1], e[1])]


def positive_pairs(args, x0, v1, v2, eps, view_noise, t_n: float, t_key: float, sigmas: list[float]) -> tuple[list, list, list, list]:
    """The step's (queries, keys) of each loss: consistency's x_{t_n} against x_{t_{n+1}}, one trajectory, the same
    eps (Eq. 11); contrastive's view 1 against view 2's key. A term that --objective leaves out has no views."""
    consistency, contrastive = TERMS[args.objective]
    query, key = ([point(x0, t_n, eps)], [point(x0, t_key, eps)]) if consistency else ([], [])
    query_views, key_views = directions(contrastive_views(v1, v2, eps, view_noise, sigmas), args.symmetric) if contrastive else ([], [])
    return query, key, query_views, key_views


def directions(views: list, symmetric: bool) -> tuple[list, list]:
    """(the online encoder's query views, the target's key views, in the same order): view 1 against view 2's key
    (Algorithm 1 and the paper-time code), and with --symmetric view 2 against view 1's as well."""
    return (views, views[::-1]) if symmetric else (views[:1], views[1:])


def ema_rate(step: int, total_steps: int, A: float, start: float = 0.99, end: float = 0.9999) -> float:
    """Target EMA rate, App. C Eq. (13)-(15): a square-root ramp pushed through a sigmoid of sharpness A."""
    ramp = math.sqrt(step / total_steps * (end**2 - start**2) + start**2) if step < total_steps else end
    c = 2 / (1 + math.exp(-A * (ramp - start) / (end - start))) - 1
    return c * end + (1 - c) * start


@torch.no_grad()
def update_target(target: ViT, model: ViT, rate: float) -> None:
    for p_t, p in zip(target.parameters(), model.parameters()):
        p_t.lerp_(p, 1 - rate)
    for b_t, b in zip(target.buffers(), model.buffers()):
        b_t.copy_(b)


def update_targets(target: ViT, key_model: ViT, model: ViT, rate: float, consistency_ema: float) -> None:
    """The contrastive target follows the online model at `rate`; the consistency key's encoder is the online model
    itself (EMA2 = 0, the paper's), or under --consistency-ema an EMA copy that follows at that rate."""
    update_target(target, model, rate)
    if key_model is not model:
        update_target(key_model, model, consistency_ema)


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
    # the consistency key's encoder: the online model itself (EMA rate 0, the paper's), or an EMA copy (App. G)
    key_model = ViT(model.cfg).to(run.device).requires_grad_(False) if args.consistency_ema > 0 else model
    key_model.load_state_dict(model.state_dict())
    if run.world > 1:  # the projector's BatchNorm sees the global batch, as in the authors' (SyncBatchNorm) runs;
        global_batchnorm(model), global_batchnorm(target)  # before the optimizer takes the parameters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    step = run.resume(model=model, target=target, optimizer=opt, **({"consistency_target": key_model} if args.consistency_ema > 0 else {}))
    micro = run.micro_batch(args.micro_batch, model, grad_passes(args), input_bytes=6 * 3 * model.cfg.img_size ** 2 * 4)
    online = OnlinePasses(model, args.tau)
    net = run.distribute(online) if micro is None else online  # micro-batches average gradients themselves
    if args.compile:  # the encoders' blocks, where the time goes; the projector and the losses stay eager
        for m in {model, target, key_model}:
            m.compile_blocks()
    run.start(model, to_model_space(data.batch(torch.arange(1))[0]), step, args.steps, forwards_per_image(args, micro))
    data.prefetch_steps(step, args.batch, args.seed, run.rank, run.world, args.shards, "pretrain")  # ImageNet: decode ahead

    for step in run.steps(step, args.steps, data=data):  # Algorithm 1
        t_n, t_key, sigmas = consistency_times(step, args)  # one n for the whole batch; t_key = t_{n+1}
        x0, v1, v2, eps, view_noise = step_inputs(data, step, args, run.rank, run.world, run.device)
        query, key, query_views, key_views = positive_pairs(args, x0, v1, v2, eps, view_noise, t_n, t_key, sigmas)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, args.steps, args.warmup, args.lr)
        opt.zero_grad(set_to_none=True)
        with run.autocast:  # the keys, without gradient: h(x_{t_{n+1}}) of the online model, the target's views
            h_key, keys = encode(key_model, key, micro), project(target, key_views, micro)
        loss_cons, loss_ctr = losses_and_gradients(run, net, query, query_views, h_key, keys, micro, step)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if step >= args.warmup else float("inf"))
        opt.step()
        rate = ema_rate(step, args.steps, args.ema_sharpness)
        update_targets(target, key_model, model, rate, args.consistency_ema)
        if run.log_due(step + 1):
            run.log(step + 1, dict(consistency=loss_cons, contrastive=loss_ctr), f"lr {opt.param_groups[0]['lr']:.2e}",
                    f"ema {rate:.5f}", f"N {len(sigmas)}", f"grad {grad_norm.item():.3f}")


def step_inputs(data: Images, step: int, args, rank: int, world: int, device) -> tuple:
    """This rank's (x0, v1, v2, eps, view_noise) of step k in model space, drawn shard by shard (data.local_shards).
    eps is shared by both trajectory points (Eq. 11) and, at t = sigma_min, by both views; view_noise is None, or
    under --objective moco-noise each view's uniforms (for its times) and its own noise."""
    parts = []
    for shard, idx in local_shards(batch_indices(len(data), args.batch, step, args.seed, rank, world), rank, world, args.shards):
        g = generator(device, args.seed, "step", step, shard)
        x0, v1, v2 = (to_model_space(v) for v in data.pretrain_views(idx, g))
        parts.append((x0, v1, v2, torch.randn(x0.shape, generator=g, device=device)))
        if args.objective == "moco-noise":  # drawn after the rest, so the other objectives' draws are unchanged
            parts[-1] += (torch.rand(2, len(x0), generator=g, device=device), torch.randn((2, *x0.shape), generator=g, device=device))
    x0, v1, v2, eps, *noise = (torch.cat(p, dim=1 if k > 3 else 0) for k, p in enumerate(zip(*parts)))
    return x0, v1, v2, eps, (tuple(noise) if noise else None)


def grad_passes(args) -> int:
    """Encoder passes with gradient per image and step: the consistency query, and one per contrastive query view."""
    consistency, contrastive = TERMS[args.objective]
    return consistency + contrastive * (1 + args.symmetric)


def forwards_per_image(args, micro: int | None = None) -> int:
    """Forward-equivalents per image and step (a backward counts as 2): each pass with gradient 3, or 4 in
    micro-batches (they encode it once more), and as many passes without (its key). The paper's objective: the
    consistency query and view 1 with gradient, their keys without: 8; --symmetric: 12."""
    return (4 if micro is None else 5) * grad_passes(args)


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
    g = p.add_argument_group("ablations (paper App. F and G; the defaults are the method)")
    g.add_argument("--objective", default="rrcm", choices=TERMS, help="rrcm: consistency + contrastive (Eq. 9); "
                   "consistency-only; contrastive-only (MoCo v3 at t = sigma_min); moco-noise: MoCo v3 'additionally "
                   "equipped with Gaussian noise augmentation' (App. F), no consistency term, each view with its own "
                   "noise at a time drawn per image from the trajectory's grid (the paper gives no noise level: this "
                   "project's reading, the levels rRCM trains on without the trajectory's structure)")
    g.add_argument("--consistency-ema", type=jobs.interval(0, 1), default=0.0, help="EMA rate of the consistency "
                   "key's encoder (EMA2, Fig. 10); 0: the online model itself, as the paper")
    g.add_argument("--sigma-max", type=jobs.interval(0.01, low_open=True), default=SIGMA_MAX,
                   help="T, the trajectory's end (Fig. 11: 1 instead of 80)")
    g.add_argument("--align", default="adjacent", choices=("adjacent", "initial"), help="the consistency key: the "
                   "adjacent point x_{t_{n+1}} (Eq. 11), or the trajectory's initial point x_{sigma_min} (Fig. 11)")
    g.add_argument("--query-times", type=query_times, default=None, help="with --align initial: the query's times t_n "
                   "(model space, t = 2 sigma): one time '1' or a set '0.5,1,2' (one drawn per step), as App. G's "
                   "Fig. 11 (a model per t_n in 0.5, 1, 2 and one for the three together); an interval '0.5:2' is this "
                   "project's own reading; unset: the grid of the curriculum")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="out/pretrain", help="directory for ckpt.pt and log.txt")
    g.add_argument("--micro-batch", type=jobs.at_least(1), default=None, help="images per encoder pass with gradient, "
                   "with the same result as the whole batch (GradCache); unset: the whole batch where it fits the "
                   "device's free memory, else the largest micro-batch that does")
    add_run_flags(g, 5000, "also the last, and on SIGINT/SIGTERM")
    args = p.parse_args(argv)
    for key, value in RECIPES[recipe_name(args.dataset, args.preset)].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.batch < 2:
        p.error("--batch must be >= 2: the projector's BatchNorm normalises over the batch (one image has no variance)")
    if args.query_times is not None and args.align != "initial":
        p.error("--query-times needs --align initial: an arbitrary t_n has no adjacent grid point")
    args.data_dir = os.path.abspath(args.data_dir)  # resuming checks it, so it must not depend on the cwd
    return args


def tau(text: str) -> float:
    """--tau in TAU_RANGE: unit vectors give logits within +-1/tau; below 0.01 they pass +-100 and the loss scales
    as 1/tau, above 1 InfoNCE sits near log(batch) whatever the features."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not TAU_RANGE[0] <= value <= TAU_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}], got {value}: the logits "
                                         f"q.k / tau of unit vectors span +-{1 / value:.3g} (the paper uses 0.2)")
    return value


RUN_KEYS = ("dataset", "data_dir", "train_images", "preset", "steps", "batch", "lr", "weight_decay", "warmup",
            "grad_clip", "tau", "ema_sharpness", "symmetric", "objective", "consistency_ema", "sigma_max", "align",
            "query_times", "seed", "shards", "precision")
TERMS = {"rrcm": (True, True), "consistency-only": (True, False), "contrastive-only": (False, True),  # --objective:
         "moco-noise": (False, True)}  # (consistency term, contrastive term)


def query_times(text: str) -> tuple[float, float] | list[float]:
    """--query-times: '0.5,1,2' a set (App. G), '0.5:2' an interval (low, high); times > 0."""
    try:
        values = [float(v) for v in text.split(":" if ":" in text else ",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be times like '0.5,1,2' or '0.5:2', got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values) or (":" in text and (len(values) != 2 or values[0] >= values[1])):
        raise argparse.ArgumentTypeError(f"must be positive times, a set '0.5,1,2' or an interval low:high, got {text!r}")
    return tuple(values) if ":" in text else values


if __name__ == "__main__":
    jobs.run_script(main)
