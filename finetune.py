"""Stage 2: fine-tune the encoder and a linear head at one noise level sigma (paper Sec. 3.4, Eq. 12).

Every image gets m = 2 noisy copies x + sigma * eps (pixel space; 2 sigma in model space, seen at time
t = 2 sigma). The loss is the consistency regulariser of Jeong & Shin (2020):
    mean_i CE(f(x_i), y) + eta1 * mean_i KL(p_bar || p_i) + eta2 * H(p_bar),   p_bar = mean_i p_i
AdamW with layer-wise lr decay, linear warm-up then cosine. Clean and noisy test accuracy every epoch.

    python finetune.py --init out/pretrain/ckpt.pt --sigma 0.25             # rRCM
    python finetune.py --init scratch --preset B --sigma 0.25 --eta1 0 --eta2 0   # Gaussian baseline (Cohen et al.)
    python finetune.py --init scratch --preset B --sigma 0.25               # Consistency baseline (Jeong & Shin)
    torchrun --standalone --nproc_per_node=8 -- finetune.py --init ... --sigma 0.5
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
from data import Images, batch_indices, generator, seeded_noise, init_distributed, run_log, weak_augment
from model import (UsageError, ViT, check_finite, load_checkpoint, model_args, model_from_checkpoint, noisy_input,
                   resume_checkpoint, save_checkpoint, vit_config)

ETA1_BY_SIGMA = {0.25: 10.0, 0.5: 20.0, 1.0: 20.0}  # the authors' released settings
COPIES = 2  # m noisy copies per image


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="rRCM fine-tuning", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"finetune.py: error: {msg}")
    g = p.add_argument_group("what to fine-tune")
    g.add_argument("--init", default="out/pretrain/ckpt.pt", help="pre-trained checkpoint, or 'scratch' for the baselines")
    g.add_argument("--preset", default=None, help="with --init scratch: tiny, S, B or B-Deep")
    g.add_argument("--dataset", default="cifar10")
    g.add_argument("--data-dir", default="data")
    g.add_argument("--sigma", type=float, default=0.25, help="noise std in pixel space [0, 1]")
    g = p.add_argument_group("loss, Eq. (12)")
    g.add_argument("--eta1", type=float, default=None, help="KL weight; default 10 at sigma 0.25, else 20")
    g.add_argument("--eta2", type=float, default=0.5, help="entropy weight")
    g = p.add_argument_group("optimisation (paper defaults for CIFAR-10)")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--warmup-epochs", type=int, default=10)
    g.add_argument("--batch", type=int, default=1024, help="global batch of images (each gets 2 noisy copies)")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay; default 0.65 at sigma 1.0, else 0.75")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="directory for ckpt.pt and log.txt (default out/finetune_sigma<sigma>)")
    g.add_argument("--eval-images", type=int, default=10_000, help="test images for the per-epoch accuracies")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (also at each epoch end)")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend())
    args = p.parse_args(argv)
    if not args.sigma > 0:  # also rejects nan
        p.error(f"--sigma must be > 0, got {args.sigma}")
    for name in ("epochs", "batch", "eval_images", "log_every", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.init == "scratch" and args.preset is None:
        p.error("--init scratch needs --preset")
    if args.init != "scratch" and args.preset is not None:
        p.error("--preset only goes with --init scratch (a checkpoint knows its own shape)")
    args.eta1 = ETA1_BY_SIGMA.get(args.sigma, 20.0) if args.eta1 is None else args.eta1
    args.layer_decay = (0.65 if args.sigma >= 1.0 else 0.75) if args.layer_decay is None else args.layer_decay
    args.out = args.out or f"out/finetune_sigma{args.sigma:g}"
    return args


def finetune_loss(logits: torch.Tensor, y: torch.Tensor, eta1: float, eta2: float) -> tuple[torch.Tensor, dict]:
    """Eq. (12). logits: [m, B, C] for the m noisy copies of a batch with labels y [B]."""
    m, B, C = logits.shape
    ce = kernels.cross_entropy(logits.reshape(m * B, C), y.repeat(m)).float().mean()
    log_p = F.log_softmax(logits.float(), dim=-1)
    p_bar = log_p.exp().mean(0)
    # KL(p_bar || p_i) = sum_c p_bar (log p_bar - log p_i); xlogy makes 0 log 0 = 0 exactly.
    kl = (torch.special.xlogy(p_bar, p_bar).sum(-1) - (p_bar * log_p).sum(-1)).mean()
    entropy = -torch.special.xlogy(p_bar, p_bar).sum(-1).mean()
    return ce + eta1 * kl + eta2 * entropy, dict(ce=ce, kl=kl, entropy=entropy)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_groups(model: ViT, lr: float, decay: float) -> list[dict]:
    """Layer-wise lr decay: embeddings get lr * decay^(depth+1), block i lr * decay^(depth-i), head lr."""
    depth = model.cfg.depth
    groups: dict[int, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(layer_id(name, depth), []).append(p)
    return [dict(params=ps, lr_scale=decay ** (depth + 1 - layer)) for layer, ps in sorted(groups.items())]


def learning_rate(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: nn.Module, test: Images, sigma: float, count: int, seed: int, rank: int, world: int, batch: int) -> tuple[float, float]:
    """(clean, noisy) top-1 accuracy on the first `count` test images. Both are read at t = 2 sigma,
    the only time the fine-tuned classifier is used at; noise is seeded per image index so every
    epoch sees the same noise."""
    model.eval()
    correct = torch.zeros(2, device=test.labels.device)
    idx = torch.arange(rank, min(count, len(test)), world)
    for chunk in idx.split(batch):
        x, y = test.batch(chunk)
        eps = seeded_noise(x.shape[1:], chunk, x.device, seed, "eval")
        for row, noise in enumerate((torch.zeros_like(x), eps)):
            correct[row] += (model(*noisy_input(x, sigma, noise)).argmax(1) == y).sum()
    if world > 1:
        dist.all_reduce(correct)
    model.train()
    n = min(count, len(test))
    return (correct[0] / n).item(), (correct[1] / n).item()


RUN_KEYS = ("init", "preset", "dataset", "sigma", "eta1", "eta2", "epochs", "warmup_epochs", "batch", "lr", "layer_decay", "seed")


def build_model(args) -> ViT:
    if args.init == "scratch":
        torch.manual_seed(args.seed)
        return ViT(vit_config(args.preset, args.dataset))
    ckpt = load_checkpoint(args.init, "pretrain")
    if ckpt["config"]["dataset"] != args.dataset:
        raise UsageError(f"{args.init} was pre-trained on {ckpt['config']['dataset']}, not --dataset {args.dataset}")
    return model_from_checkpoint(ckpt)  # the online encoder (MoCo v3 fine-tunes the online one, too)


def main(argv=None) -> None:
    args = parse_args(argv)
    kernels.use(args.kernels)
    rank, world, device = init_distributed()
    master = rank == 0
    if args.batch % world:
        raise UsageError(f"--batch {args.batch} is not divisible by the {world} processes")
    train, test = Images(args.dataset, args.data_dir, "train", device), Images(args.dataset, args.data_dir, "test", device)
    model = build_model(args).to(device)
    model.projector.requires_grad_(False)  # pre-training's; unused here
    opt = torch.optim.AdamW(layer_groups(model, args.lr, args.layer_decay), lr=args.lr, weight_decay=0.0)
    steps_per_epoch = len(train) // args.batch
    if steps_per_epoch == 0:
        raise UsageError(f"--batch {args.batch} is larger than the training set ({len(train)} images)")
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    step = 0
    ckpt = resume_checkpoint(args.out, "finetune", args.resume, vars(args), RUN_KEYS)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    say = run_log(args.out, master)
    say(f"{model.num_params() / 1e6:.2f}M parameters, {world} process(es), {total} steps, config: {vars(args)}")

    def checkpoint(next_step: int) -> None:
        if master:
            save_checkpoint(os.path.join(args.out, "ckpt.pt"), dict(
                kind="finetune", model_args=model_args(model), model=model.state_dict(), optimizer=opt.state_dict(),
                step=next_step, config=vars(args)))

    t_last, last_logged = time.time(), step
    while step < total:
        g = generator(device, args.seed, "step", step, rank)
        x, y = train.batch(batch_indices(len(train), args.batch, step, args.seed, rank, world))
        x = weak_augment(x, g)
        eps = torch.randn((COPIES, *x.shape), generator=g, device=device)
        x_t, t = noisy_input(x.expand(COPIES, *x.shape), args.sigma, eps)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, total, warmup, args.lr) * group["lr_scale"]
        with autocast:
            logits = net(x_t.reshape(-1, *x.shape[1:]), t).reshape(COPIES, x.shape[0], -1)
            loss, parts = finetune_loss(logits, y, args.eta1, args.eta2)
        check_finite(loss.detach(), {k: v.detach() for k, v in parts.items()}, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1

        if step % args.log_every == 0 or step == total:
            metrics = torch.stack([loss.detach(), parts["ce"], parts["kl"], parts["entropy"]]).float()
            if world > 1:
                dist.all_reduce(metrics)
                metrics /= world
            rate = (step - last_logged) * args.batch / (time.time() - t_last)
            say(f"step {step}/{total} | loss {metrics[0]:.4f} | ce {metrics[1]:.4f} | kl {metrics[2]:.4f} | "
                f"entropy {metrics[3]:.4f} | lr {opt.param_groups[-1]['lr']:.2e} | {rate:.1f} img/s")
            t_last, last_logged = time.time(), step
        if step % steps_per_epoch == 0:
            clean, noisy = evaluate(model, test, args.sigma, args.eval_images, args.seed, rank, world, args.batch)
            say(f"epoch {step // steps_per_epoch} | clean acc {clean:.4f} | noisy acc (sigma {args.sigma:g}) {noisy:.4f}")
        if step % args.save_every == 0 or step % steps_per_epoch == 0 or step == total:
            checkpoint(step)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"finetune.py: error: {e}")
