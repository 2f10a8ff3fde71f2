"""Data: CIFAR-10 and ImageNet as uint8 tensors, step-indexed batches, and the released code's inputs of
each stage (Images.pretrain_views, Images.finetune_batch; the augmentations themselves are in augment.py).

Everything random here is drawn from a torch.Generator seeded by `derive_seed(seed, ...)` with the step
(and shard) in the key. So the data order and the augmentations of step k are a function of (seed, k)
alone: a resumed run sees exactly the batches an uninterrupted one would, with no sampler state to save.
"""
import functools
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from augment import consistency_augment, moco_view, moco_views, rand_augment, random_hflip, random_resized_crop, rrc_boxes
from jobs import UsageError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def derive_seed(*keys) -> int:
    """A well-mixed 63-bit seed from a tuple of ints/strings (numpy's SeedSequence does the mixing). A CPU
    torch.Generator keeps only its low 32 bits (CUDA's keeps all 64), so two keys share a CPU stream with
    probability 2^-32: harmless for augmentations and data order; the certification noise, where one sample
    counted twice would matter, uses smoothing.stream_seed, which cannot collide within an image."""
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
