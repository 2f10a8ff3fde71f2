"""Linear probing of a pre-trained encoder (paper App. E, Table 6): the quickest check that pre-training
learned trajectory-consistent representations, with RFD, the Frechet distance between the representations of
x_{t_N} and x_{t_0}, the two ends of the same trajectories (t_N = 80, t_0 = 0.002 for every model, lower: more
alike), and the Frechet distance of the noisy to the clean representations at each test sigma.

The encoder is frozen. A linear head is trained on the representations of *clean* training images (read at
t = sigma_min, the end of the trajectory), then evaluated on test images with pixel-space noise sigma,
read at the smoothing time of sigma (2 sigma snapped to the 81-point grid). If the representation of
x + sigma eps matches that of x, accuracy stays high as sigma grows, although the head never saw noise.
The representation is the class token the fine-tuned classifier reads: raw on CIFAR-10, through the final
LayerNorm on ImageNet (released train.layernorm). This is a quick diagnostic, not the released code's
linear task (which trains with augmentation, layer decay and an entropy term for 100 epochs).

    python linear_probe.py --checkpoint out/pretrain/ckpt.pt --data-dir data
    python linear_probe.py --checkpoint a/ckpt.pt b/ckpt.pt --plot probe.png      # several, one figure
"""
import argparse
import math
import os
import time

import torch

import jobs
import kernels
from data import Images, add_workers_flag, generator, seeded_noise
from jobs import clock, load_checkpoint, model_from_checkpoint
from model import NORM_STD, SIGMA_MAX, SIGMA_MIN, ViT, noisy_input, to_model_space
from report import axis_top


def sigma_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if any(not (s >= 0 and math.isfinite(s)) for s in values):
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = jobs.Parser("linear_probe.py", "linear probing of a pre-trained rRCM encoder")
    p.add_argument("--checkpoint", nargs="+", default=["out/pretrain/ckpt.pt"], help="pretrain.py checkpoints, each "
                   "probed in turn (one row of the table, one line of the plot)")
    p.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/ or ImageNet train/ val/")
    add_workers_flag(p)
    p.add_argument("--sigmas", type=sigma_list, default="0,0.25,0.5,1.0", help="test noise levels in pixel space (comma-separated)")
    p.add_argument("--train-images", type=jobs.at_least(1), default=50_000, help="clean training images the head is fitted on (the first N)")
    p.add_argument("--test-images", type=jobs.at_least(1), default=10_000, help="test images (the first N)")
    p.add_argument("--epochs", type=jobs.at_least(1), default=30, help="epochs of the head's AdamW")
    p.add_argument("--batch", type=jobs.at_least(1), default=256, help="images per batch (encoding and head training)")
    p.add_argument("--lr", type=jobs.positive, default=1e-3, help="AdamW lr of the head, weight decay 0")
    p.add_argument("--seed", type=int, default=0, help="head init, order and test noise")
    p.add_argument("--plot", default=None, help="write accuracy against sigma, one line per checkpoint, to this PNG "
                   "(needs matplotlib)")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend(), help="fused Triton kernels or PyTorch")
    return p.parse_args(argv)


PROGRESS_EVERY = 10.0  # seconds between progress lines: encoding 50,000 images takes minutes on a CPU


@torch.no_grad()
def representations(model: ViT, images: Images, count: int, sigma: float, seed: int, batch: int, norm: bool,
                    what: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """h(x_t, t) of the first `count` images; sigma = 0 means clean at t = sigma_min. Noise is seeded per
    image index, so every checkpoint is probed with the same noise. Prints progress with an ETA."""
    feats, labels = [], []
    total = min(count, len(images))
    start = last = time.time()
    images.prefetch(torch.arange(total).split(batch))  # ImageNet: decode ahead of the loop
    for chunk in torch.arange(total).split(batch):
        x, y = images.batch(chunk)
        if sigma == 0:
            x_t, t = to_model_space(x), SIGMA_MIN
        else:
            eps = seeded_noise(x.shape[1:], chunk, x.device, seed, "probe")
            x_t, t = noisy_input(x, sigma, eps)
        feats.append(model.features(x_t, t, norm).float())
        labels.append(y)
        done, now = int(chunk[-1]) + 1, time.time()
        if now - last >= PROGRESS_EVERY or done == total:
            last, rate = now, done / max(now - start, 1e-9)
            print(f"encoding {what}: {done:,} / {total:,} images | {rate:,.0f} img/s | elapsed {clock(now - start)} | "
                  f"ETA {clock((total - done) / rate)}", flush=True)
    return torch.cat(feats), torch.cat(labels)


def train_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, batch: int, lr: float, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], num_classes).to(feats.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    g = generator(torch.device("cpu"), seed, "probe-order")
    for _ in range(epochs):
        for idx in torch.randperm(len(feats), generator=g).split(batch):
            loss = kernels.cross_entropy(head(feats[idx]), labels[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RFD (App. E, Table 6): the Frechet distance ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between
    Gaussians fitted to two sets of representations [n, d], in float64."""
    import numpy as np
    from scipy.linalg import sqrtm
    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # [d, d], d = 1 too
    root = sqrtm(s_a @ s_b).real  # the imaginary part is rounding
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


RFD_TIMES = (SIGMA_MAX, SIGMA_MIN)  # App. E: x_{t_N} against x_{t_0}, the final grid's ends, the same for every model


def probe(path: str, args, device: torch.device) -> tuple[list[float], float, list[float]]:
    """(accuracy % at each --sigmas, RFD, the Frechet distance of the noisy to the clean representations at each
    positive sigma) of one checkpoint. The noisy test images of every sigma share their noise, so they are points
    of the same trajectories x + t eps; RFD is App. E's, between x_{t_N} and x_{t_0} (RFD_TIMES) of those
    trajectories, whatever T the checkpoint trained with."""
    ckpt = load_checkpoint(path, "pretrain")
    model = model_from_checkpoint(ckpt).to(device).eval()
    dataset = ckpt["config"]["dataset"]
    train, test = (Images(dataset, args.data_dir, split, device, workers=args.workers) for split in ("train", "test"))
    norm = dataset == "imagenet"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"linear probe of {path} (step {ckpt['step']}) on {where}: head fitted on "
          f"{min(args.train_images, len(train)):,} clean training images, tested on {min(args.test_images, len(test)):,} "
          f"test images at sigma {', '.join(f'{s:g}' for s in args.sigmas)}", flush=True)
    feats, labels = representations(model, train, args.train_images, 0.0, args.seed, args.batch, norm, "clean training images")
    start = time.time()
    head = train_head(feats, labels, model.cfg.num_classes, args.epochs, args.batch, args.lr, args.seed)
    print(f"head trained: {args.epochs} epochs in {clock(time.time() - start)}", flush=True)
    t_N, t_0 = (t * NORM_STD for t in RFD_TIMES)  # as pixel-space sigmas: t = 2 sigma
    encoded = {}
    with torch.no_grad():
        for sigma in sorted({0.0, *args.sigmas, t_0, t_N}):
            encoded[sigma] = representations(model, test, args.test_images, sigma, args.seed, args.batch, norm,
                                             f"test images, sigma {sigma:g}")
    accuracies = [(head(encoded[s][0]).argmax(1) == encoded[s][1]).float().mean().item() * 100 for s in args.sigmas]
    rfd = frechet_distance(encoded[t_N][0], encoded[t_0][0])
    to_clean = [frechet_distance(encoded[s][0], encoded[0.0][0]) for s in sorted(s for s in args.sigmas if s > 0)]
    return accuracies, rfd, to_clean


def main(argv=None) -> None:
    args = parse_args(argv)
    _, _, device = jobs.start_processes(args.kernels)
    rows = [(path, *probe(path, args, device)) for path in args.checkpoint]
    noisy = sorted(s for s in args.sigmas if s > 0)
    width = max(len(p) for p in args.checkpoint)
    print(f"{'':{width}}  accuracy (%) at sigma{' ' * max(0, 7 * len(args.sigmas) - 21)}  RFD       "
          "noisy to clean at sigma")
    print(f"{'checkpoint':{width}}  " + " ".join(f"{s:6.2f}" for s in args.sigmas) + "  t_N, t_0  "
          + " ".join(f"{s:8.2f}" for s in noisy))
    for path, accuracies, rfd, to_clean in rows:
        print(f"{path:{width}}  " + " ".join(f"{a:6.1f}" for a in accuracies) + f"  {rfd:8.3f}  "
              + " ".join(f"{d:8.3f}" for d in to_clean))
    print(f"RFD: App. E's Frechet distance between the representations of x_{{t_N}} and x_{{t_0}} of the same test "
          f"trajectories, t_N = {RFD_TIMES[0]:g}, t_0 = {RFD_TIMES[1]:g} (model space) for every checkpoint")
    if args.plot:
        plot(rows, args.sigmas, args.plot)
        print(f"wrote {args.plot}")


def plot(rows: list, sigmas: list[float], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise jobs.UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, accuracies, rfd, _ in rows:
        label = os.path.basename(os.path.dirname(os.path.abspath(name)))  # the run's folder: out/<arm>/ckpt.pt
        ax.plot(sigmas, accuracies, marker="o", label=f"{label} (RFD {rfd:.1f})")
    highest = max((a for _, accuracies, _, _ in rows for a in accuracies), default=0.0)
    ax.set(xlabel="test noise sigma (pixel space)", ylabel="linear-probe accuracy (%)", ylim=(0, axis_top(highest, 100.0)))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


if __name__ == "__main__":
    jobs.run_script(main)
