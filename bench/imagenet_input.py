"""ImageNet input pipeline: how fast one core decodes each recipe's views, and whether decoding ahead of the step
(data.Prefetcher) hides it behind the step, on a synthetic ImageNet-shaped JPEG folder this script makes.

    python bench/imagenet_input.py            # a few minutes: 1,000 JPEGs, batch 512, --workers = the cores here
    python bench/imagenet_input.py --quick    # seconds (the test suite runs it)

1. Images/s on one core (this process, one thread) for the CPU part of each recipe: pre-training's centre crop and
   two RandomResizedCrops (Images.pretrain_views), fine-tuning's 'weak' (centre crop), 'strong' and 'autoaug'
   (one RandomResizedCrop each; their flips and RandAugment run on the device).
2. The loader (--workers processes) alone: seconds per step of pre-training views, "decode".
3. A step of a given duration (time.sleep, as a host waiting on its GPU) in place of the model: the achieved step
   time with prefetching against max(step, decode), perfect overlap, and step + decode, decoding when the step
   asks (the synchronous path with the same cores, at best).
Files are served from the page cache (written just before), as ImageNet (~140 GB) is on a node with the RAM.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from model import vit_config  # noqa: E402

# (width, height, weight): ImageNet's most common shapes, and a spread of others (random sizes, "free")
SHAPES = [(500, 375, 40), (375, 500, 15), (500, 333, 15), (333, 500, 5), (500, 500, 5), ("free", "free", 20)]
DETAIL = 3.0  # grain and texture strength: ~110 KB at 500 x 375, quality 90, as ImageNet's files average
FORWARDS = 8  # pretrain.forwards_per_image(symmetric=False): forward-equivalents per image of a pre-training step
H100_BF16, MFU = 989e12, 0.4


def photo(rng: np.random.Generator, w: int, h: int):
    """Smooth shapes, texture and grain: a JPEG of it is about as large (and as slow to decode) as a photo's."""
    from PIL import Image

    def field(cell: int, amplitude: float) -> np.ndarray:
        small = rng.normal(0, amplitude, (max(2, h // cell), max(2, w // cell), 3)).astype(np.float32)
        return np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)], -1)

    x = 128 + field(60, 60) + field(12, 25) + field(3, 12 * DETAIL) + rng.normal(0, 4 * DETAIL, (h, w, 3))
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def make_folder(root: str, n: int, classes: int = 10, seed: int = 0) -> None:
    """<root>/train/<wnid>/*.JPEG, n images at quality 90; kept for the next run if it is already there."""
    if os.path.isdir(os.path.join(root, "train")) and sum(len(f) for _, _, f in os.walk(root)) >= n:
        return
    rng = np.random.default_rng(seed)
    weights = np.array([s[2] for s in SHAPES], dtype=float)
    for k in range(n):
        w, h, _ = SHAPES[rng.choice(len(SHAPES), p=weights / weights.sum())]
        if w == "free":
            w = int(rng.integers(200, 1000))
            h = int(w * rng.uniform(0.6, 1.6))
        folder = os.path.join(root, "train", f"n{k % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        photo(rng, w, h).save(os.path.join(folder, f"{k}.JPEG"), quality=90)


def describe(folder: data.ImageFolder) -> str:
    from PIL import Image
    sizes = []
    for path in folder.files:
        with Image.open(path) as im:
            sizes.append(im.size)
    w, h = np.array(sizes).T
    kb = np.mean([os.path.getsize(p) for p in folder.files]) / 1e3
    return (f"{len(sizes)} JPEGs, {w.mean():.0f} x {h.mean():.0f} on average (widths {w.min()}-{w.max()}, heights "
            f"{h.min()}-{h.max()}), {kb:.0f} KB on average, quality 90")


def per_core(folder: data.ImageFolder, views: str, images: int) -> float:
    """Images/s decoding VIEWS[views] here, one thread, as the synchronous path does (8 images a call)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    for chunk in torch.arange(images).remainder(len(folder)).split(8):
        folder.decode(chunk, views, seed=0)
    return images / (time.perf_counter() - start)


def loader(images: data.Images, batch: int, steps: int, warm: int, step_seconds: float) -> tuple[float, float]:
    """(seconds per step, seconds waited for data per step) over `steps` steps of pre-training views after `warm`,
    the step itself being `step_seconds` of sleep; the workers start afresh."""
    images.prefetch_steps(0, batch, 0, 0, 1, 1, "pretrain")
    for step in range(warm + steps):
        if step == warm:
            start, waited = time.perf_counter(), images.wait_seconds
        idx = data.batch_indices(len(images), batch, step, 0)
        images.views(idx, "pretrain", data.generator(images.device, 0, "step", step, 0))
        time.sleep(step_seconds)
        if images.device.type == "cuda":
            torch.cuda.synchronize()  # the copies to the GPU count
    elapsed = time.perf_counter() - start
    images.close()
    return elapsed / steps, (images.wait_seconds - waited) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny run in seconds (the test suite's)")
    p.add_argument("--folder", default=None, help="where the synthetic JPEGs go (default: a temporary folder)")
    p.add_argument("--images", type=int, default=1000, help="JPEGs in the synthetic folder")
    p.add_argument("--batch", type=int, default=512, help="images per step and process (the ImageNet recipe's 4096 on 8 GPUs)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per loader run, after 3 more")
    p.add_argument("--step-ms", type=float, nargs="*", default=None,
                   help="emulated step times (default: 0.5, 1 and 2 times the loader's decode time per step)")
    data.add_workers_flag(p)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.steps, args.workers = 24, 8, 3, min(args.workers, 2)
    if args.workers < 1:
        p.error("--workers must be 1 or more: the loader runs in worker processes")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or tmp
        start = time.time()
        make_folder(root, args.images)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        images = data.Images("imagenet", root, "train", device, workers=args.workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"synthetic ImageNet in {root}: {describe(images.pixels)} (made in {time.time() - start:.0f} s); "
              f"{cores} cores here, device {device}, torch {torch.__version__}")

        print("decoding on one core (one process, one thread), images/s:")
        rates, threads = {}, torch.get_num_threads()
        for views in ("pretrain", "weak", "strong", "autoaug"):
            rates[views] = per_core(images.pixels, views, 16 if args.quick else 200)
            print(f"  {views:<9} {rates[views]:7.1f}   {data.VIEWS[views]}")
        torch.set_num_threads(threads)

        warm = 1 if args.quick else 3
        decode, _ = loader(images, args.batch, args.steps, warm, 0.0)
        print(f"loader, {args.workers} workers, batch {args.batch}, pre-training views: decode {decode:.3f} s/step = "
              f"{args.batch / decode:.0f} images/s = {args.batch / decode / args.workers:.0f} per worker "
              f"({args.batch / decode / args.workers / rates['pretrain']:.0%} of one core's rate)")
        print(f"  {'step (s)':>9} {'achieved':>9} {'max(step, decode)':>18} {'step + decode':>14} {'data wait':>10}")
        steps = [ms / 1e3 for ms in args.step_ms] if args.step_ms else [decode * f for f in ((1.0,) if args.quick else (0.5, 1.0, 2.0))]
        for step in steps:
            achieved, wait = loader(images, args.batch, args.steps, warm, step)
            print(f"  {step:9.3f} {achieved:9.3f} {max(step, decode):18.3f} {step + decode:14.3f} {wait:10.3f}")

        print(f"pre-training demand at {MFU:.0%} MFU of an H100 ({H100_BF16 / 1e12:.0f} TFLOP/s dense bf16), "
              f"{FORWARDS} forward-equivalents per image:")
        for preset in ("B", "S"):
            flops = vit_config(preset, "imagenet").flops_per_image()
            per_gpu = MFU * H100_BF16 / (FORWARDS * flops)
            print(f"  rRCM-{preset}: {flops / 1e9:.1f} GFLOP per forward, {per_gpu:,.0f} images/s per GPU, "
                  f"{8 * per_gpu:,.0f} per 8-GPU node: {per_gpu / rates['pretrain']:.0f} cores per GPU at one core's "
                  f"rate, {per_gpu / (args.batch / decode / args.workers):.0f} at the loader's rate per worker")


if __name__ == "__main__":
    main()
