"""Stage 1: pre-train the rRCM encoder (paper Sec. 3.3, Algorithm 1, App. C).

Each step, for a batch of images x:
  consistency loss (Eq. 7-8, 11): one time index n for the whole batch; x_{t_n} = x + t_n eps and
      x_{t_{n+1}} = x + t_{n+1} eps share eps, so they are adjacent points of one PF-ODE trajectory.
      InfoNCE pulls h(x_{t_n}, t_n) towards stop-grad h(x_{t_{n+1}}, t_{n+1}) of the *same* online model
      (EMA rate 0), with the other images of the (global) batch as negatives.
  contrastive loss: symmetric MoCo-v3 InfoNCE between the projector outputs of two augmented views at
      t = sigma_min, keys from a target copy whose EMA rate rises 0.99 -> 0.9999 (App. C, Eq. 13-15).
The two are summed with equal weight (as in the authors' code). The discretisation N grows 20 -> 40 -> 80
(improved consistency training's doubling curriculum).

    python pretrain.py --dataset cifar10 --data-dir data --preset B          # one GPU
    torchrun --standalone --nproc_per_node=8 -- pretrain.py --preset B         # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -- pretrain.py --preset B  # two nodes (node_rank=1 on the other)
    python pretrain.py ... --resume                                          # continue out/pretrain/ckpt.pt
"""
import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels
from data import Images, batch_indices, gather_rows, generator, init_distributed, moco_views, run_log, weak_augment
from model import (SIGMA_MIN, UsageError, ViT, check_finite, edm_sigmas, model_args, resume_checkpoint, save_checkpoint,
                   to_model_space, vit_config)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}
FORWARDS_PER_IMAGE = 12  # online: 3 passes x (fwd + 2 bwd) = 9; no-grad: consistency key + 2 target views = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="rRCM pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"pretrain.py: error: {msg}")  # one line, exit code 1
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="cifar10", help="cifar10 or imagenet")
    g.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/ or ImageNet train/ val/")
    g.add_argument("--preset", default="B", help="tiny, S, B or B-Deep (paper Table 3)")
    g = p.add_argument_group("optimisation (paper defaults for CIFAR-10)")
    g.add_argument("--steps", type=int, default=300_000)
    g.add_argument("--batch", type=int, default=2048, help="global batch, split across ranks")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW, weight decay 0")
    g.add_argument("--warmup", type=int, default=10_000, help="linear warm-up steps, then constant lr")
    g.add_argument("--grad-clip", type=float, default=2.0, help="max grad norm, applied after warm-up")
    g = p.add_argument_group("rRCM")
    g.add_argument("--tau", type=float, default=0.2, help="InfoNCE temperature of both losses")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="out/pretrain", help="directory for ckpt.pt and log.txt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--save-every", type=int, default=5000)
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend())
    args = p.parse_args(argv)
    for name in ("steps", "batch", "log_every", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (args.lr > 0 and args.tau > 0 and args.grad_clip > 0 and args.warmup >= 0):
        p.error("--lr, --tau and --grad-clip must be > 0 and --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------------
# Schedules

def num_scales(step: int, total_steps: int, start: int = 20, end: int = 80) -> int:
    """N(k) = min(s0 * 2^ceil(k / K'), s1) + 1 with K' = ceil(K / log2(ceil(s1 / s0) + 1)): the iCT
    doubling curriculum exactly as the authors implement it (with ceil, N = 21 only at step 0)."""
    k_prime = math.ceil(total_steps / math.log2(math.ceil(end / start) + 1))
    return min(start * 2 ** math.ceil(step / k_prime), end) + 1


def ema_rate(step: int, total_steps: int, start: float = 0.99, end: float = 0.9999, A: float = 15.0) -> float:
    """Target EMA rate, App. C Eq. (13)-(15): a square-root ramp pushed through a sigmoid of sharpness A."""
    ramp = math.sqrt(step / total_steps * (end**2 - start**2) + start**2) if step < total_steps else end
    c = 2 / (1 + math.exp(-A * (ramp - start) / (end - start))) - 1
    return c * end + (1 - c) * start


def learning_rate(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


# ----------------------------------------------------------------------------------------------------
# Losses

def consistency_loss(model: ViT, x0, eps, t_n: torch.Tensor, t_next: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. (7)-(8), (11): InfoNCE between h(x_{t_n}) and stop-grad h(x_{t_{n+1}}) on one trajectory."""
    q = F.normalize(model.features(x0 + t_n * eps, t_n), dim=1)
    with torch.no_grad():  # EMA rate 0: the key is the online model itself, without gradient
        k = F.normalize(model.features(x0 + t_next * eps, t_next), dim=1)
    keys, offset = gather_rows(k)
    return kernels.info_nce(q, keys, tau, offset).mean()


def project(model: ViT, v1, v2, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised projector outputs of both views at t = sigma_min. One encoder pass for both views;
    the projector (BatchNorm) sees each view on its own, as in MoCo v3."""
    h1, h2 = model.features(torch.cat([v1, v2]) + SIGMA_MIN * torch.cat([eps, eps]), SIGMA_MIN).chunk(2)
    return F.normalize(model.projector(h1), dim=1), F.normalize(model.projector(h2), dim=1)


def contrastive_loss(q1, q2, k1, k2, tau: float) -> torch.Tensor:
    """Symmetric MoCo-v3 InfoNCE: view 1's query against view 2's target key and vice versa."""
    keys2, offset = gather_rows(k2)
    keys1, _ = gather_rows(k1)
    return 0.5 * (kernels.info_nce(q1, keys2, tau, offset).mean() + kernels.info_nce(q2, keys1, tau, offset).mean())


class Objective(nn.Module):
    """Every online pass of a step in one forward, so DDP sees them all (and syncs gradients once)."""

    def __init__(self, model: ViT, tau: float):
        super().__init__()
        self.model, self.tau = model, tau

    def forward(self, x0, v1, v2, eps, t_n: torch.Tensor, t_next: torch.Tensor, k1, k2):
        q1, q2 = project(self.model, v1, v2, eps)
        return (consistency_loss(self.model, x0, eps, t_n, t_next, self.tau),
                contrastive_loss(q1, q2, k1, k2, self.tau))


@torch.no_grad()
def update_target(target: ViT, model: ViT, rate: float) -> None:
    for p_t, p in zip(target.parameters(), model.parameters()):
        p_t.lerp_(p, 1 - rate)
    for b_t, b in zip(target.buffers(), model.buffers()):
        b_t.copy_(b)


# ----------------------------------------------------------------------------------------------------

RUN_KEYS = ("dataset", "preset", "steps", "batch", "lr", "warmup", "grad_clip", "tau", "seed")


def main(argv=None) -> None:
    args = parse_args(argv)
    kernels.use(args.kernels)
    rank, world, device = init_distributed()
    master = rank == 0
    if args.batch % world:
        raise UsageError(f"--batch {args.batch} is not divisible by the {world} processes")
    data = Images(args.dataset, args.data_dir, "train", device)

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = ViT(vit_config(args.preset, args.dataset)).to(device)
    model.head.requires_grad_(False)  # the classification head is fine-tuning's
    target = ViT(model.cfg).to(device).requires_grad_(False)
    target.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    step = 0
    ckpt = resume_checkpoint(args.out, "pretrain", args.resume, vars(args), RUN_KEYS)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        target.load_state_dict(ckpt["target"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]

    if world > 1 and device.type == "cuda":
        # The projector's BatchNorm should see the global batch, as in the authors' runs. (SyncBatchNorm is
        # GPU-only; CPU/gloo runs, which exist for testing, keep per-rank statistics.)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        target = nn.SyncBatchNorm.convert_sync_batchnorm(target)
    objective = Objective(model, args.tau)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        objective, target_fwd = torch.compile(objective), torch.compile(project)
    else:
        target_fwd = project
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    say = run_log(args.out, master)
    say(f"{model.num_params() / 1e6:.2f}M parameters, {world} process(es), config: {vars(args)}")
    if step:
        say(f"resuming {args.out}/ckpt.pt at step {step}")

    def checkpoint(next_step: int) -> None:
        if master:
            save_checkpoint(os.path.join(args.out, "ckpt.pt"), dict(
                kind="pretrain", model_args=model_args(model), model=model.state_dict(), target=target.state_dict(),
                optimizer=opt.state_dict(), step=next_step, config=vars(args)))

    t_last, last_logged = time.time(), step
    while step < args.steps:
        N = num_scales(step, args.steps)
        sigmas = edm_sigmas(N).tolist()
        n = int(torch.randint(0, N - 1, (1,), generator=generator(torch.device("cpu"), args.seed, "n", step)))
        g = generator(device, args.seed, "step", step, rank)  # this rank's augmentations and noise
        x, _ = data.batch(batch_indices(len(data), args.batch, step, args.seed, rank, world))
        x0 = to_model_space(weak_augment(x, g))
        v1, v2 = (to_model_space(v) for v in moco_views(x, g))
        eps = torch.randn(x0.shape, generator=g, device=device)  # shared by both trajectory points (Eq. 11)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup)
        with autocast:
            with torch.no_grad():
                k1, k2 = target_fwd(target, v1, v2, eps)
            # t as a tensor, not a Python float: a compiled graph would otherwise specialise on each value
            t_n, t_next = torch.tensor(sigmas[n:n + 2], device=device)
            loss_cons, loss_ctr = objective(x0, v1, v2, eps, t_n, t_next, k1, k2)
            loss = loss_cons + loss_ctr
        check_finite(loss.detach(), dict(consistency=loss_cons.detach(), contrastive=loss_ctr.detach()), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = args.grad_clip if step >= args.warmup else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        rate = ema_rate(step, args.steps)
        update_target(target, model, rate)
        step += 1

        if master and (step % args.log_every == 0 or step == args.steps):
            dt = time.time() - t_last
            images_per_s = (step - last_logged) * args.batch / dt
            line = (f"step {step} | consistency {loss_cons.item():.4f} | contrastive {loss_ctr.item():.4f} | "
                    f"lr {opt.param_groups[0]['lr']:.2e} | ema {rate:.5f} | N {N} | grad {grad_norm.item():.3f} | "
                    f"{images_per_s:.1f} img/s")
            if peak:
                line += f" | mfu {images_per_s * FORWARDS_PER_IMAGE * model.flops_per_image() / (world * peak):.1%}"
            say(line)
            t_last, last_logged = time.time(), step
        if step % args.save_every == 0 or step == args.steps:
            checkpoint(step)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"pretrain.py: error: {e}")
