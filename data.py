"""Data: CIFAR-10 and ImageNet as uint8 tensors, step-indexed batches, and batched on-device augmentations.

Everything random here is drawn from a torch.Generator seeded by `derive_seed(seed, ...)` with the step
(and rank) in the key. So the data order and the augmentations of step k are a function of (seed, k)
alone: a resumed run sees exactly the batches an uninterrupted one would, with no sampler state to save.

Augmentations work on a whole batch on the device (airbench-style), never per image in PIL:
the MoCo-v3 pair for the contrastive loss and the weak crop+flip for the consistency loss and fine-tuning.
"""
import functools
import hashlib
import math
import os
import pickle
import shutil
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

def _check_data_dir(data_dir: str) -> None:
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir} is not a directory")


def _download_cifar10(data_dir: str) -> None:
    """Download into a temp dir outside data_dir, verify the MD5, extract, and only then create data_dir and
    rename the folder into it: a failed download leaves neither a half dataset nor an empty mistyped folder."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "cifar-10-python.tar.gz")
        try:
            urllib.request.urlretrieve(CIFAR10_URL, archive)
        except Exception as e:
            reason = (str(e).splitlines() or [""])[0]
            raise UsageError(f"no CIFAR-10 in {data_dir} and the download from {CIFAR10_URL} failed "
                             f"({type(e).__name__}: {reason}); put cifar-10-batches-py/ there") from None
        with open(archive, "rb") as f:
            md5 = hashlib.md5(f.read()).hexdigest()
        if md5 != CIFAR10_MD5:
            raise UsageError(f"downloaded CIFAR-10 archive has MD5 {md5}, expected {CIFAR10_MD5}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.makedirs(data_dir, exist_ok=True)
        # the temp dir may sit on another file system: copy next to the target first, then rename atomically
        staging = tempfile.mkdtemp(dir=data_dir)
        shutil.move(os.path.join(tmp, "cifar-10-batches-py"), os.path.join(staging, "cifar-10-batches-py"))
        os.replace(os.path.join(staging, "cifar-10-batches-py"), os.path.join(data_dir, "cifar-10-batches-py"))
        os.rmdir(staging)


def load_cifar10(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] from <data_dir>/cifar-10-batches-py/.
    An extracted directory is read as is (the MD5 belongs to the archive, not to the batch files)."""
    _check_data_dir(data_dir)
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
# Random resized crops with torchvision's box statistics (the released code uses RandomResizedCrop)

def rrc_boxes(u: torch.Tensor, height: torch.Tensor, width: torch.Tensor, scale: tuple[float, float],
              ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, ...]:
    """torchvision's RandomResizedCrop.get_params for a batch, from uniforms u [B, tries, 4] (10 tries as
    torchvision): area fraction ~U(scale), log-aspect ~U(log ratio), integer box sides, the first try that
    fits wins; if none fits, the centre crop at the nearest allowed aspect. Returns (top, left, h, w) [B]."""
    u = u.double()
    H, W = height.double()[:, None], width.double()[:, None]
    target = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1])
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first try that fits (0 if none)
    w, h = w.gather(1, first), h.gather(1, first)
    top = torch.floor(u[..., 2].gather(1, first) * (H - h + 1))
    left = torch.floor(u[..., 3].gather(1, first) * (W - w + 1))
    # fallback as torchvision: the whole image, trimmed to the nearest allowed aspect ratio
    fw = torch.where(W / H > ratio[1], torch.round(H * ratio[1]), W)
    fh = torch.where(W / H < ratio[0], torch.round(W / ratio[0]), H)
    ok = fits.any(1, keepdim=True)
    h, w = torch.where(ok, h, fh), torch.where(ok, w, fw)
    top = torch.where(ok, top, torch.div(H - fh, 2, rounding_mode="floor"))
    left = torch.where(ok, left, torch.div(W - fw, 2, rounding_mode="floor"))
    return tuple(v[:, 0].long() for v in (top, left, h, w))


def crop_resize(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                size: int, mode: str = "bilinear") -> torch.Tensor:
    """Crop box (top, left, h, w) of each image and resize it to size x size, like PIL's crop().resize():
    pixel centres map linearly and samples are clamped to the box, so no pixel outside it leaks in
    (exact for bilinear upscaling; bicubic uses PyTorch's a = -0.75 where PIL uses -0.5)."""
    B, C, H, W = x.shape
    o = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size  # output centres in [0, 1]
    top, left, h, w = (v.to(x.device, torch.float32)[:, None] for v in (top, left, h, w))
    ys = torch.minimum(torch.maximum(top + o * h - 0.5, top), top + h - 1)  # [B, size], pixel-index units
    xs = torch.minimum(torch.maximum(left + o * w - 0.5, left), left + w - 1)
    gy = (2 * ys + 1) / H - 1  # grid_sample's align_corners=False normalisation
    gx = (2 * xs + 1) / W - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # [B, size, size, 2]
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        mode: str = "bilinear") -> torch.Tensor:
    """RandomResizedCrop on the device for images already in memory (CIFAR-10), output the input size."""
    B, _, H, W = x.shape
    u = torch.rand(B, 10, 4, generator=g, device=g.device)
    full = lambda n: torch.full((B,), n, device=u.device)
    return crop_resize(x, *rrc_boxes(u, full(H), full(W), scale, ratio), H, mode)


# ----------------------------------------------------------------------------------------------------
# ImageNet from train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (Pillow, imported only here)

def short_side_centre_crop(im, size: int = 224):
    """The released ShortSideResizeCenterCrop (rrcm_tune.py; center_crop_arr in dataset.py), used for
    validation, the consistency branch of pre-training and 'weak' fine-tuning: halve with a box filter while
    the short side is at least 2 size, bicubic-resize the short side to `size`, take the centre square."""
    from PIL import Image
    while min(im.size) >= 2 * size:
        im = im.resize((im.width // 2, im.height // 2), Image.BOX)
    scale = size / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return im.crop((left, top, left + size, top + size))


def _to_tensor(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


class ImageFolder:
    """Decodes JPEGs per batch in a thread pool. Crops that the released code takes from the full-size image
    (RandomResizedCrop) are cut here, while decoding, with boxes drawn beforehand from the step's generator;
    everything after the crop (colour, blur, RandAugment, mixing) happens batched on the device."""

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

    def _decode(self, path: str, centre: bool, crops: list) -> list[torch.Tensor]:
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert("RGB")
            out = [_to_tensor(short_side_centre_crop(im, self.size))] if centre else []
            for u, scale, resample in crops:
                top, left, h, w = (int(v) for v in rrc_boxes(u[None], torch.tensor([im.height]),
                                                             torch.tensor([im.width]), scale))
                box = im.crop((left, top, left + w, top + h))
                out.append(_to_tensor(box.resize((self.size, self.size), resample)))
            return out

    def views(self, idx: torch.Tensor, centre: bool = True, crops: tuple = ()) -> list[torch.Tensor]:
        """uint8 [b, 3, size, size] tensors: the centre crop if `centre`, then one random resized crop per
        (u [b, 10, 4], scale, PIL resample) in `crops`."""
        jobs = [(self.files[i], centre, [(u[k], s, r) for u, s, r in crops]) for k, i in enumerate(idx.tolist())]
        decoded = list(self.pool.map(lambda job: self._decode(*job), jobs))
        return [torch.stack(parts) for parts in zip(*decoded)]

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.views(idx)[0]


class Images:
    """A dataset as uint8 pixels plus `labels`, served as float batches in [0, 1] on the device with the
    released code's augmentations. CIFAR-10 sits on the device as one tensor; ImageNet is decoded per batch.
    `limit` keeps a fixed subset of `limit` images (drawn once with a fixed seed, so classes stay mixed even
    in the class-sorted ImageNet folder; the same subset in every run and process) for quick trials."""

    def __init__(self, dataset: str, data_dir: str, split: str, device: torch.device, limit: int | None = None):
        _check_data_dir(data_dir)
        self.dataset, self.device = dataset, device
        if dataset == "cifar10":
            pixels, labels = load_cifar10(data_dir, split)
        elif dataset == "imagenet":
            pixels = ImageFolder(os.path.join(data_dir, "train" if split == "train" else "val"))
            labels = pixels.labels
        else:
            raise UsageError(f"unknown dataset {dataset!r}; choose cifar10 or imagenet")
        if limit is not None:
            if not 0 < limit <= len(labels):
                raise UsageError(f"--train-images {limit} must be between 1 and {len(labels)} for {dataset} {split}")
            keep = torch.randperm(len(labels), generator=generator(torch.device("cpu"), "subset", dataset, split))
            keep = keep[:limit].sort().values
            if dataset == "cifar10":
                pixels = pixels[keep]
            else:
                pixels.files = [pixels.files[i] for i in keep.tolist()]
            labels = labels[keep]
        self.pixels = pixels.to(device) if dataset == "cifar10" else pixels
        self.labels = labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).float() / 255.0

    def _decode(self, idx: torch.Tensor, g: torch.Generator, centre: bool, crops: tuple) -> list[torch.Tensor]:
        """ImageNet: the centre crop and the random resized crops [(scale, PIL resample), ...] as floats."""
        boxes = [(torch.rand(len(idx), 10, 4, generator=g, device=g.device).cpu(), s, r) for s, r in crops]
        return [self._float(v) for v in self.pixels.views(idx.cpu(), centre, boxes)]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float in [0, 1] and labels, both on the device; ImageNet images are the released
        ShortSideResizeCenterCrop(224) (also its validation transform)."""
        x = self.pixels[idx.to(self.pixels.device) if torch.is_tensor(self.pixels) else idx]
        return self._float(x), self.labels[idx.to(self.device)]

    def pretrain_views(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(x0, v1, v2) as the released dataset.py: x0, the consistency branch's input, is the centre crop
        (the whole 32x32 image on CIFAR-10) with a random horizontal flip; v1, v2 the MoCo-v3 views."""
        if self.dataset == "cifar10":
            x, _ = self.batch(idx)
            return (consistency_augment(x, g),) + moco_views(x, g)
        from PIL import Image
        x, c1, c2 = self._decode(idx, g, True, [((0.08, 1.0), Image.BILINEAR)] * 2)
        return consistency_augment(x, g), moco_view(c1, g, 1), moco_view(c2, g, 2)

    def finetune_batch(self, idx: torch.Tensor, g: torch.Generator, augment: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A fine-tuning batch with the released rrcm_tune.py augmentation named by its config's
        augmentation_type (mixup/cutmix come after, see `mixup_cutmix`):
          'weak'    CIFAR-10: none; ImageNet: ShortSideResizeCenterCrop(224) and a horizontal flip
          'strong'  RandomResizedCrop(scale 0.4-1; bilinear on CIFAR-10, bicubic on ImageNet) and a flip
          'autoaug' timm's create_transform: RandomResizedCrop(scale 0.08-1, bicubic), a flip, and
                    RandAugment rand-m9-mstd0.5-inc1 (no colour jitter, no random erasing: reprob 0)"""
        if augment not in FINETUNE_AUGMENTS:
            raise UsageError(f"unknown fine-tuning augmentation {augment!r}; choose one of {', '.join(FINETUNE_AUGMENTS)}")
        y = self.labels[idx.to(self.device)]
        scale = (0.4, 1.0) if augment == "strong" else (0.08, 1.0)
        if self.dataset == "cifar10":
            x, _ = self.batch(idx)
            if augment == "weak":
                return x, y
            x = random_resized_crop(x, g, scale, mode="bilinear" if augment == "strong" else "bicubic").clamp(0, 1)
        elif augment == "weak":
            x = self._decode(idx, g, True, ())[0]
        else:
            from PIL import Image
            x = self._decode(idx, g, False, [(scale, Image.BICUBIC)])[0]
        x = random_hflip(x, g)
        return (rand_augment(x, g) if augment == "autoaug" else x), y


FINETUNE_AUGMENTS = ("weak", "strong", "autoaug")
# the released README's choice per dataset and sigma (0.25, 0.5, 1.0)
FINETUNE_AUGMENT = {"cifar10": {0.25: "weak", 0.5: "weak", 1.0: "weak"},
                    "imagenet": {0.25: "autoaug", 0.5: "strong", 1.0: "weak"}}


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=generator(torch.device("cpu"), seed, "epoch", epoch))


def local_shards(idx: torch.Tensor, rank: int, world: int, shards: int) -> list[tuple[int, torch.Tensor]]:
    """This rank's part of the global batch as (global shard number, indices) pairs. All randomness of a step
    (augmentations, noise) is drawn per shard from generator(seed, "step", step, shard): a run gives the
    same result with any number of processes that divides its --shards (to float rounding), e.g. when an
    8-GPU run is resumed on 4."""
    per_rank = shards // world
    return [(rank * per_rank + s, part) for s, part in enumerate(idx.chunk(per_rank))]


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


def pil_box_radius(radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's GaussianBlur(radius) is not a sampled Gaussian: it runs 3 passes of an 'extended' box blur
    (Pillow's BoxBlur.c, after Gwosdek et al. 2011), each of variance radius^2 / 3, so the result has std
    exactly `radius`. Each pass averages 2l+1 whole pixels plus the next pixel on either side at weight a.
    Returns (l, a) per radius."""
    var = radius ** 2 / 3
    length = torch.sqrt(12 * var + 1)
    l = torch.floor((length - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    return l, a


def pil_gaussian_blur(x: torch.Tensor, radius: torch.Tensor, uint8_passes: bool = False) -> torch.Tensor:
    """PIL.ImageFilter.GaussianBlur(radius[b]) of each image, batched: 3 horizontal then 3 vertical extended box
    passes with edge pixels repeated, as Pillow does. Pillow's 24-bit fixed-point weights and rounding to uint8
    after every pass are followed only with `uint8_passes` (exact on uint8-valued input, for tests); training
    keeps floats, within 3/255 of Pillow (mostly its rounding, which accumulates over the 6 passes)."""
    B, C, H, W = x.shape
    l, a = pil_box_radius(radius.to(x.device, torch.float32))
    K = int(l.max()) + 1
    dist = (torch.arange(-K, K + 1, device=x.device, dtype=torch.float32)).abs()[None]  # [1, 2K+1]
    if uint8_passes:
        whole = torch.floor(2 ** 24 / (2 * (l + a) + 1)).double()
        edge = torch.floor((2 ** 24 - (2 * l + 1).double() * whole) / 2)
        taps = torch.where(dist <= l[:, None], whole[:, None], torch.where(dist == l[:, None] + 1, edge[:, None], 0.0))
        y, kernel = (x.double() * 255).round(), taps.repeat_interleave(C, 0)
    else:
        taps = torch.where(dist <= l[:, None], 1.0, torch.where(dist == l[:, None] + 1, a[:, None], 0.0))
        y, kernel = x, (taps / (2 * (l + a) + 1)[:, None]).repeat_interleave(C, 0).to(x.dtype)  # [B*C, 2K+1]
    y = y.reshape(1, B * C, H, W)
    for pad, shape in [((K, K, 0, 0), (1, -1))] * 3 + [((0, 0, K, K), (-1, 1))] * 3:
        y = F.conv2d(F.pad(y, pad, mode="replicate"), kernel.reshape(B * C, 1, *shape), groups=B * C)
        if uint8_passes:
            y = torch.floor((y + 2 ** 23) / 2 ** 24)
    y = y.reshape(B, C, H, W)
    return (y / 255).to(x.dtype) if uint8_passes else y


def gaussian_blur(x: torch.Tensor, g: torch.Generator, p: float, radius=(0.1, 2.0)) -> torch.Tensor:
    """The released GaussianBlur([.1, 2.]): with probability p, PIL's GaussianBlur with radius ~U(0.1, 2)
    drawn per image (std up to 2 px on CIFAR-10's 32 px as on ImageNet's 224 px)."""
    B = x.shape[0]
    y = pil_gaussian_blur(x, _uniform(g, B, *radius))
    return torch.where(_coin(g, B, p)[:, None, None, None], y, x)


def random_solarize(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """ImageOps.solarize(threshold=128) with probability p: uint8 values >= 128 are inverted."""
    return torch.where(_coin(g, x.shape[0], p)[:, None, None, None], torch.where(x >= 0.5, 1 - x, x), x)


def random_hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    return torch.where(_coin(g, x.shape[0], p)[:, None, None, None], x.flip(3), x)


def moco_view(crop: torch.Tensor, g: torch.Generator, view: int) -> torch.Tensor:
    """Everything the released dataset.py does to a MoCo-v3 view after its RandomResizedCrop: colour
    jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, blur (p 1 on view 1, 0.1 on view 2),
    solarize (view 2 only, p 0.2), horizontal flip."""
    blur_p, solarize_p = {1: (1.0, 0.0), 2: (0.1, 0.2)}[view]
    v = random_grayscale(color_jitter(crop, g), g)
    v = random_solarize(gaussian_blur(v, g, blur_p), g, solarize_p)
    return random_hflip(v, g)


def moco_views(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The two MoCo-v3 views of images in memory (CIFAR-10): RandomResizedCrop(scale 0.08-1) on the device,
    then `moco_view`. ImageNet crops the full-size JPEG instead: Images.pretrain_views."""
    return tuple(moco_view(random_resized_crop(x, g), g, view) for view in (1, 2))


def consistency_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The consistency branch's input in the released dataset.py: the centre crop (Images.batch) with a
    random horizontal flip, nothing else, on CIFAR-10 and ImageNet alike."""
    return random_hflip(x, g)


# ----------------------------------------------------------------------------------------------------
# RandAugment "rand-m9-mstd0.5-inc1" (timm's auto_augment.py), batched. Each op acts on uint8-valued floats
# v in [0, 255], as timm's PIL ops act on uint8 images, and returns uint8 values again. `level` is the
# per-image magnitude in [0, 10], `sign` the per-image +-1 of timm's _randomly_negate.

FILL = 128.0  # timm's img_mean for mean (0.5, 0.5, 0.5): the colour of pixels that geometry uncovers


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None, None]


def _pil_luma(v: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    return torch.floor((19595 * v[:, 0] + 38470 * v[:, 1] + 7471 * v[:, 2] + 32768) / 65536).unsqueeze(1)


def _blend(degenerate: torch.Tensor, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance: Image.blend(degenerate, image, factor), which truncates to uint8."""
    return torch.floor(degenerate + _per_image(factor) * (v - degenerate)).clamp(0, 255)


def _enhance_factor(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return (1 + sign * level / 10 * 0.9).clamp_min(0.1)  # [0.1, 1.9]; 1 is no change


def _affine(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, m): output pixel centre (x, y) reads the input at (m00 x + m01 y + m02,
    m10 x + m11 y + m12) (pixel centres at i + 0.5); points outside the image get FILL. Bicubic as timm asks,
    with PyTorch's a = -0.75 where PIL uses -0.5."""
    n, _, H, W = v.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=v.device) + 0.5, torch.arange(W, device=v.device) + 0.5, indexing="ij")
    m = m.to(v.device, v.dtype)[:, :, :, None, None]
    xin = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]  # [n, H, W]
    yin = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    grid = torch.stack((2 * xin / W - 1, 2 * yin / H - 1), -1)
    out = F.grid_sample(v, grid, mode="bicubic", padding_mode="border", align_corners=False)
    inside = ((xin >= 0) & (xin < W) & (yin >= 0) & (yin < H))[:, None]
    return torch.where(inside, out.round().clamp(0, 255), FILL)


def _matrix(n: int, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> torch.Tensor:
    parts = [torch.as_tensor(t, dtype=torch.float32).expand(n) for t in (a, b, c, d, e, f)]
    return torch.stack(parts, 1).reshape(n, 2, 3)


def _rotate(v, level, sign):
    """Image.rotate(30 level / 10 degrees, counter-clockwise, about the image centre)."""
    theta = torch.deg2rad(sign * level / 10 * 30).cpu()
    cx, cy = v.shape[3] / 2, v.shape[2] / 2
    cos, sin = torch.cos(theta), torch.sin(theta)
    return _affine(v, _matrix(len(v), cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy))


def _shear_x(v, level, sign):
    return _affine(v, _matrix(len(v), b=(sign * level / 10 * 0.3).cpu()))


def _shear_y(v, level, sign):
    return _affine(v, _matrix(len(v), d=(sign * level / 10 * 0.3).cpu()))


def _translate_x(v, level, sign):
    return _affine(v, _matrix(len(v), c=(sign * level / 10 * 0.45 * v.shape[3]).cpu()))


def _translate_y(v, level, sign):
    return _affine(v, _matrix(len(v), f=(sign * level / 10 * 0.45 * v.shape[2]).cpu()))


def _auto_contrast(v, level, sign):
    """ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255] (int() of the scaled value)."""
    lo, hi = v.amin((2, 3), keepdim=True), v.amax((2, 3), keepdim=True)
    scaled = torch.floor((v - lo) * 255 / (hi - lo).clamp_min(1)).clamp(0, 255)
    return torch.where(hi > lo, scaled, v)


def _equalize(v, level, sign):
    """ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step, with step the pixel
    count without the last occupied bin, // 255; identity where step is 0."""
    n, C, H, W = v.shape
    flat = v.reshape(n * C, H * W).long()
    hist = torch.zeros(n * C, 256, device=v.device, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    last = 255 - hist.flip(1).ne(0).to(torch.uint8).argmax(1, keepdim=True)  # highest occupied bin
    step = torch.div(H * W - hist.gather(1, last), 255, rounding_mode="floor")
    below = hist.cumsum(1) - hist
    lut = torch.div(torch.div(step, 2, rounding_mode="floor") + below, step.clamp_min(1), rounding_mode="floor")
    lut = torch.where(step > 0, lut.clamp(max=255), torch.arange(256, device=v.device))
    return lut.gather(1, flat).reshape(n, C, H, W).to(v.dtype)


def _invert(v, level, sign):
    return 255 - v


def _posterize(v, level, sign):
    """Keep the top 4 - int(4 level / 10) bits (PosterizeIncreasing); 0 bits is a black image."""
    drop = 2 ** (8 - (4 - torch.floor(level / 10 * 4)))
    return torch.floor(v / _per_image(drop)) * _per_image(drop)


def _solarize(v, level, sign):
    """Invert values >= 256 - int(256 level / 10) (SolarizeIncreasing)."""
    threshold = _per_image(256 - torch.floor(level / 10 * 256).clamp(max=256))
    return torch.where(v < threshold, v, 255 - v)


def _solarize_add(v, level, sign):
    """Add int(110 level / 10) to values below 128, saturating at 255."""
    add = _per_image(torch.floor(level / 10 * 110).clamp(max=128))
    return torch.where(v < 128, (v + add).clamp(max=255), v)


def _color(v, level, sign):
    return _blend(_pil_luma(v).expand_as(v), v, _enhance_factor(level, sign))


def _contrast(v, level, sign):
    """ImageEnhance.Contrast: blend with the image's mean grey level, rounded to an integer."""
    mean = torch.floor(_pil_luma(v).mean((1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(v), v, _enhance_factor(level, sign))


def _brightness(v, level, sign):
    return _blend(torch.zeros_like(v), v, _enhance_factor(level, sign))


def _sharpness(v, level, sign):
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, others 1, / 13), whose border
    pixels PIL leaves as they are."""
    n, C, H, W = v.shape
    kernel = torch.ones(3, 3, device=v.device, dtype=v.dtype)
    kernel[1, 1] = 5
    smooth = F.conv2d(v.reshape(n * C, 1, H, W), (kernel / 13)[None, None]).reshape(n, C, H - 2, W - 2)
    degenerate = v.clone()
    degenerate[:, :, 1:-1, 1:-1] = torch.floor(smooth + 0.5).clamp(0, 255)
    return _blend(degenerate, v, _enhance_factor(level, sign))


RAND_OPS = {  # timm's _RAND_INCREASING_TRANSFORMS, in its order
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert, "Rotate": _rotate,
    "PosterizeIncreasing": _posterize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color, "ContrastIncreasing": _contrast, "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness, "ShearX": _shear_x, "ShearY": _shear_y,
    "TranslateXRel": _translate_x, "TranslateYRel": _translate_y,
}


def rand_augment_plan(g: torch.Generator, n: int, num_ops: int = 2, magnitude: float = 9.0,
                      magnitude_std: float = 0.5, prob: float = 0.5) -> tuple[torch.Tensor, ...]:
    """timm's RandAugment draws per image: `num_ops` ops chosen uniformly *with* replacement (timm's
    np.random.choice has replace=True without choice weights), each applied with probability `prob`, at a
    magnitude ~N(magnitude, magnitude_std) clipped to [0, 10], with a random sign. Each [n, num_ops]."""
    op = torch.randint(0, len(RAND_OPS), (n, num_ops), generator=g, device=g.device)
    applied = torch.rand(n, num_ops, generator=g, device=g.device) < prob
    noise = torch.randn(n, num_ops, generator=g, device=g.device)
    level = (magnitude + magnitude_std * noise).clamp(0, 10)
    sign = torch.where(torch.rand(n, num_ops, generator=g, device=g.device) > 0.5, -1.0, 1.0)
    return op, applied, level, sign


def apply_rand_ops(x: torch.Tensor, op: torch.Tensor, applied: torch.Tensor, level: torch.Tensor,
                   sign: torch.Tensor) -> torch.Tensor:
    """Apply a plan from `rand_augment_plan` to x in [0, 1]; the result is uint8-valued, like timm's."""
    v = (x * 255).round().clamp(0, 255)
    fns = list(RAND_OPS.values())
    for k in range(op.shape[1]):
        for i, fn in enumerate(fns):
            rows = (applied[:, k] & (op[:, k] == i)).nonzero()[:, 0]
            if len(rows):
                v[rows] = fn(v[rows], level[rows, k], sign[rows, k])
    return v / 255


def rand_augment(x: torch.Tensor, g: torch.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5) -> torch.Tensor:
    """timm's RandAugment 'rand-m9-mstd0.5-inc1' (2 ops, magnitude 9 +- 0.5, increasing op set) on a batch."""
    return apply_rand_ops(x, *rand_augment_plan(g, x.shape[0], num_ops, magnitude, magnitude_std, prob))


def mixup_cutmix(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """timm's Mixup in 'batch' mode with prob 1 (the released fine-tuning config): with probability
    `switch_prob` CutMix, else Mixup, one lam ~ Beta(alpha, alpha) for the whole batch, each image mixed with
    the batch reversed. CutMix pastes a box of side sqrt(1 - lam) times the image's, centred uniformly and
    clipped at the border, and lam becomes 1 - (box area / image area). Returns (x, y_a, y_b, lam): the loss
    is lam CE(y_a) + (1 - lam) CE(y_b), as timm's mixed one-hot targets (also with label smoothing)."""
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device)))
    other = x.flip(0)
    if rng.random() < switch_prob:
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        H, W = x.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (H * W)
    else:
        lam = rng.beta(mixup_alpha, mixup_alpha)
        x = lam * x + (1 - lam) * other
    return x, y, y.flip(0), float(lam)


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

