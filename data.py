"""Data: CIFAR-10 and ImageNet as uint8 tensors, step-indexed batches, and batched on-device augmentations.

Everything random here is drawn from a torch.Generator seeded by `derive_seed(seed, ...)` with the step
(and rank) in the key. So the data order and the augmentations of step k are a function of (seed, k)
alone: a resumed run sees exactly the batches an uninterrupted one would, with no sampler state to save.

Augmentations work on a whole batch on the device (airbench-style), never per image in PIL:
the MoCo-v3 pair for the contrastive loss and the weak crop+flip for the consistency loss and fine-tuning.
"""
import functools
import hashlib
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import UsageError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def derive_seed(*keys) -> int:
    """A well-mixed 63-bit seed from a tuple of ints/strings (numpy's SeedSequence does the mixing)."""
    words = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(device: torch.device, *keys) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def seeded_noise(shape: tuple, indices: torch.Tensor, device: torch.device, *keys) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape], one seed per index (image, or chunk of samples) with
    `keys`: the noise of an index does not depend on which batch or process draws it."""
    return torch.stack([torch.randn(shape, generator=generator(device, *keys, int(i)), device=device) for i in indices])


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 (no torchvision)

def _download_cifar10(data_dir: str) -> None:
    """Download, verify the MD5 of the archive, extract into a temp dir and rename: never a half dataset."""
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        archive = os.path.join(tmp, "cifar-10-python.tar.gz")
        try:
            urllib.request.urlretrieve(CIFAR10_URL, archive)
        except Exception as e:
            raise UsageError(f"no CIFAR-10 in {data_dir} and the download from {CIFAR10_URL} failed "
                             f"({type(e).__name__}); put cifar-10-batches-py/ there") from None
        with open(archive, "rb") as f:
            md5 = hashlib.md5(f.read()).hexdigest()
        if md5 != CIFAR10_MD5:
            raise UsageError(f"downloaded CIFAR-10 archive has MD5 {md5}, expected {CIFAR10_MD5}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(os.path.join(tmp, "cifar-10-batches-py"), os.path.join(data_dir, "cifar-10-batches-py"))


def load_cifar10(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] from <data_dir>/cifar-10-batches-py/.
    An extracted directory is read as is (the MD5 belongs to the archive, not to the batch files)."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        _download_cifar10(data_dir)
    images, labels = [], []
    for name in CIFAR10_FILES[split]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UsageError(f"CIFAR-10 file {path} is missing")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            label = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as e:
            raise UsageError(f"CIFAR-10 file {path} is truncated or corrupt ({type(e).__name__})") from None
        if len(data) != len(label):
            raise UsageError(f"CIFAR-10 file {path} has {len(data)} images but {len(label)} labels")
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(label))
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------------------------------------------------------
# ImageNet from train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (Pillow, imported only here)

class ImageFolder:
    """Decodes JPEGs on demand (a thread pool per batch): resize the short side to 256, centre crop 224.
    Random crops and flips then happen on the device like for CIFAR-10."""

    def __init__(self, root: str, size: int = 224):
        if not os.path.isdir(root):
            raise UsageError(f"ImageNet folder {root} does not exist")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files, labels = [], []
        for c, wnid in enumerate(classes):
            for name in sorted(os.listdir(os.path.join(root, wnid))):
                self.files.append(os.path.join(root, wnid, name))
                labels.append(c)
        if not self.files:
            raise UsageError(f"no images under {root}")
        self.labels = torch.tensor(labels)
        self.size = size
        self.pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: str) -> torch.Tensor:
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = 256 / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
            left, top = (im.width - self.size) // 2, (im.height - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(self.pool.map(self._decode, [self.files[i] for i in idx.tolist()])))


class Images:
    """A dataset as `images[idx] -> uint8 [b, 3, H, W] on device` plus `labels`. CIFAR-10 sits on the
    device as one tensor; ImageNet is decoded per batch."""

    def __init__(self, dataset: str, data_dir: str, split: str, device: torch.device):
        self.device = device
        if dataset == "cifar10":
            pixels, self.labels = load_cifar10(data_dir, split)
            self.pixels = pixels.to(device)
        elif dataset == "imagenet":
            self.pixels = ImageFolder(os.path.join(data_dir, "train" if split == "train" else "val"))
            self.labels = self.pixels.labels
        else:
            raise UsageError(f"unknown dataset {dataset!r}; choose cifar10 or imagenet")
        self.labels = self.labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float in [0, 1] and labels, both on the device."""
        x = self.pixels[idx.to(self.pixels.device) if torch.is_tensor(self.pixels) else idx]
        return x.to(self.device, non_blocking=True).float() / 255.0, self.labels[idx.to(self.device)]


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=generator(torch.device("cpu"), seed, "epoch", epoch))


def batch_indices(n: int, global_batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of the global batch of `step`: epochs are fresh permutations (last partial
    batch dropped) and rank r takes the r-th slice, so the global batch does not depend on world size."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise UsageError(f"batch size {global_batch} is larger than the data set ({n} images)")
    epoch, i = divmod(step, per_epoch)
    local = global_batch // world
    start = i * global_batch + rank * local
    return _epoch_permutation(n, seed, epoch)[start:start + local]


# ----------------------------------------------------------------------------------------------------
# Batched augmentations on [B, 3, H, W] floats in [0, 1]

def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)


def _coin(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) < p


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop a box of area fraction ~U(scale) and log-aspect ~U(log ratio), resize back (bilinear).
    Boxes that would not fit are clamped to the image instead of torchvision's 10 rejection tries."""
    B = x.shape[0]
    area = _uniform(g, B, *scale)
    aspect = torch.exp(_uniform(g, B, np.log(ratio[0]), np.log(ratio[1])))
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(B, generator=g, device=g.device) - 1)  # box centre in [-1+w, 1-w]
    cy = (1 - h) * (2 * torch.rand(B, generator=g, device=g.device) - 1)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, rgb in enumerate(choices):
        for c in range(3):
            out[c] = torch.where(i == k, rgb[c], out[c])
    return torch.stack(out, 1)


def color_jitter(x: torch.Tensor, g: torch.Generator, p: float = 0.8, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) applied with probability p, in the fixed order brightness,
    contrast, saturation, hue (torchvision shuffles the order per call; the factors are the same)."""
    B = x.shape[0]
    per_image = lambda v: v[:, None, None, None]
    y = (x * per_image(_uniform(g, B, 1 - brightness, 1 + brightness))).clamp(0, 1)
    mean = _gray(y).mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * per_image(_uniform(g, B, 1 - contrast, 1 + contrast)) + mean).clamp(0, 1)
    gray = _gray(y)
    y = ((y - gray) * per_image(_uniform(g, B, 1 - saturation, 1 + saturation)) + gray).clamp(0, 1)
    h, s, v = _rgb_to_hsv(y)
    y = _hsv_to_rgb((h + _uniform(g, B, -hue, hue)[:, None, None]) % 1.0, s, v)
    return torch.where(per_image(_coin(g, B, p)), y, x)


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float = 0.2) -> torch.Tensor:
    return torch.where(_coin(g, x.shape[0], p)[:, None, None, None], _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float, sigma=(0.1, 2.0)) -> torch.Tensor:
    """Blur with sigma ~U(0.1, 2) per image and probability p; kernel ~10% of the image side, odd
    (3 on CIFAR-10, 23 on ImageNet as in MoCo v3)."""
    B, C, H, W = x.shape
    size = max(3, int(0.1 * H) // 2 * 2 + 1)
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    s = _uniform(g, B, *sigma)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * s[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, size]
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (size // 2, size // 2, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, size // 2, size // 2), mode="reflect"), kernel[:, None, :, None], groups=B * C)
    return torch.where(_coin(g, B, p)[:, None, None, None], y.reshape(B, C, H, W), x)


def random_solarize(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    return torch.where(_coin(g, x.shape[0], p)[:, None, None, None], torch.where(x >= 0.5, 1 - x, x), x)


def random_hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    return torch.where(_coin(g, x.shape[0], p)[:, None, None, None], x.flip(3), x)


def moco_views(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The two MoCo-v3 views of the contrastive loss (blur always on view 1, rarely on view 2;
    solarize only on view 2)."""
    views = []
    for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)):
        v = random_resized_crop(x, g)
        v = random_grayscale(color_jitter(v, g), g)
        v = random_solarize(gaussian_blur(v, g, blur_p), g, solarize_p)
        views.append(random_hflip(v, g))
    return views[0], views[1]


def weak_augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with `pad` pixels of zero padding, then a horizontal flip with probability 1/2."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=g, device=g.device)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=g, device=g.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # [B, 1, W]
    crop = xp[torch.arange(B, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
    return random_hflip(crop.permute(0, 3, 1, 2), g)


# ----------------------------------------------------------------------------------------------------
# Processes: which rank sees which share of the data, and which one speaks

def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK is set) join the process group: NCCL on GPUs,
    gloo on CPU; otherwise a single process on the GPU if there is one."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def run_log(out_dir: str, master: bool) -> Callable[[str], None]:
    """A print to stdout and <out_dir>/log.txt on rank 0; a no-op on the other ranks."""
    if not master:
        return lambda line: None
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "log.txt"), "a")

    def say(line: str) -> None:
        for stream in (sys.stdout, log):
            print(line, file=stream, flush=True)
    return say


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of x concatenated in rank order (no gradient), and this rank's row offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]

