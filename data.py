"""Data: CIFAR-10 and ImageNet as uint8 tensors, step-indexed batches, and the released code's inputs of
each stage (Images.pretrain_views, Images.finetune_batch; the augmentations themselves are in augment.py).

Everything random here is drawn from a torch.Generator seeded by `derive_seed(seed, ...)` with the step
(and shard) in the key. So the data order and the augmentations of step k are a function of (seed, k)
alone: a resumed run sees exactly the batches an uninterrupted one would, with no sampler state to save.
ImageNet's JPEGs are decoded in worker processes ahead of the step that needs them (Prefetcher), with the
same bytes as decoding them when asked: which images and crops a step gets does not depend on who decodes.
"""
import argparse
import atexit
import collections
import dataclasses
import functools
import hashlib
import itertools
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.request
from typing import Sequence

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

# What each recipe cuts from a decoded JPEG, in order: the released ShortSideResizeCenterCrop ("centre") or a
# RandomResizedCrop (scale range, PIL resample) from the full-size image. Everything after happens on the device.
VIEWS = {"centre": ("centre",),
         "pretrain": ("centre", ((0.08, 1.0), "bilinear"), ((0.08, 1.0), "bilinear")),
         "weak": ("centre",),
         "strong": (((0.4, 1.0), "bicubic"),),
         "autoaug": (((0.08, 1.0), "bicubic"),)}


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


def crop_uniforms(n: int, views: str, seed: int) -> np.ndarray:
    """The uniforms [n, crops, 10, 4] (augment.rrc_boxes) of the random resized crops of n images, from a CPU
    generator keyed by `seed`: the same whichever process decodes the images, and in whatever pieces."""
    crops = sum(view != "centre" for view in VIEWS[views])
    u = torch.rand(crops, n, 10, 4, generator=generator(torch.device("cpu"), seed, "crop"))
    return u.transpose(0, 1).numpy()


def decode_views(path: str, views: str, u: np.ndarray, size: int = 224) -> list[torch.Tensor]:
    """VIEWS[views] of one image file, uint8 [3, size, size] each; u [crops, 10, 4] are the uniforms of its random
    resized crops, whose boxes are taken in the full-size image, as the released RandomResizedCrop does."""
    from PIL import Image
    try:
        with Image.open(path) as f:
            im = f.convert("RGB")  # decodes: a truncated or corrupt file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read the image {path} ({type(e).__name__}: {e})") from None
    out, uniforms = [], iter(u)
    for view in VIEWS[views]:
        if view == "centre":
            out.append(_to_tensor(short_side_centre_crop(im, size)))
            continue
        scale, resample = view
        top, left, h, w = (int(v) for v in rrc_boxes(torch.from_numpy(next(uniforms))[None], torch.tensor([im.height]),
                                                     torch.tensor([im.width]), scale))
        out.append(_to_tensor(im.crop((left, top, left + w, top + h)).resize((size, size), getattr(Image, resample.upper()))))
    return out


class ImageFolder:
    """The image files of an ImageNet split (one folder per class, classes in sorted order) and their labels."""

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

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, idx: torch.Tensor, views: str, seed: int) -> list[torch.Tensor]:
        """VIEWS[views] of images idx decoded here and now, uint8 [b, 3, size, size] each: the synchronous path
        (--workers 0), which the Prefetcher's workers reproduce image by image."""
        u = crop_uniforms(len(idx), views, seed)
        per_image = [decode_views(self.files[i], views, u[k], self.size) for k, i in enumerate(idx.tolist())]
        return [torch.stack(v) for v in zip(*per_image)]


# ----------------------------------------------------------------------------------------------------
# Decoding ahead of the step: worker processes, shared-memory slots, pinned memory, a copy stream

UNIT = 8  # images per worker task: messages cost nothing beside decoding 8 JPEGs, and the workers stay balanced
AHEAD = 2  # steps (or chunks) being decoded at once: the workers start the next while the last one's stragglers finish


def cores_per_process() -> int:
    """The cores this process may run on, shared with the other processes torchrun started on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _worker_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (0 or more)")
    return int(text)


def add_workers_flag(parser) -> None:
    """--workers, for every script that reads ImageNet."""
    parser.add_argument("--workers", type=_worker_count, default=cores_per_process(),
                        help="ImageNet: processes decoding JPEGs ahead of the batches that need them, per process "
                             "(default: the cores available to each process on this node; 0: decode in this process, "
                             "each batch when it is asked for). More than the cores helps only when reading the files "
                             "waits on a network file system")


def _context():
    """forkserver (spawn where there is none), never fork: a forked child of a process that has initialised CUDA
    cannot use it and can deadlock on locks copied mid-use. The server imports this module once; each worker is
    then a fork of the server, ready in milliseconds."""
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])
    return ctx


def _decode_worker(slots: list[torch.Tensor], views: str, size: int, tasks, results) -> None:
    """A worker: decode each task's images into its rows of a shared slot, then report the slot (or the error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the main process decides
    torch.set_num_threads(1)  # one core per worker: --workers counts cores
    results.cancel_join_thread()  # a worker ends by terminate(): nothing it has queued needs flushing
    parent = mp.parent_process()
    while True:
        try:
            slot, row, paths, u = tasks.get(timeout=1.0)
        except queue.Empty:
            if not parent.is_alive():  # the main process died without closing us (SIGKILL, os._exit): no orphans
                return
            continue
        try:
            for k, path in enumerate(paths):
                for v, view in enumerate(decode_views(path, views, u[k], size)):
                    slots[slot][v, row + k] = view
            results.put((slot, None))
        except UsageError as e:
            results.put((slot, UsageError(str(e))))
        except Exception:
            results.put((slot, RuntimeError(f"a JPEG decoding worker failed:\n{traceback.format_exc()}")))


@dataclasses.dataclass
class _Request:
    idx: torch.Tensor
    seed: int
    slot: int
    tasks: int  # not yet reported
    error: Exception | None = None


class _Closed(Exception):
    pass


class Prefetcher:
    """Decodes VIEWS[views] of the coming requests while the caller's step runs. `requests` yields (idx, seed) in
    the order the caller will `take` them (at most `rows` images each; `count` of them, or endless if None). Each
    is decoded into a shared-memory slot by `workers` processes, UNIT images a task, `slots` requests at a time;
    a thread of this process moves each whole request, in order, to the device (on a GPU from pinned memory, on a
    stream of its own, so the copy overlaps the step) and keeps one there ahead of the caller."""

    def __init__(self, folder: ImageFolder, views: str, requests, rows: int, slots: int, workers: int,
                 device: torch.device, count: int | None = None):
        ctx = _context()
        self.folder, self.views, self.requests, self.device, self.left = folder, views, requests, device, count
        shape = (len(VIEWS[views]), rows, 3, folder.size, folder.size)
        self.slots = [torch.empty(shape, dtype=torch.uint8).share_memory_() for _ in range(slots)]
        self.unit = max(1, min(UNIT, rows // workers))
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.tasks.cancel_join_thread()  # tasks still queued at exit are dropped, not flushed to stopped workers
        self.workers = [ctx.Process(target=_decode_worker, args=(self.slots, views, folder.size, self.tasks, self.results),
                                    daemon=True) for _ in range(workers)]
        for p in self.workers:
            p.start()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready, self.closing = queue.Queue(maxsize=1), False
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()
        atexit.register(self.close)  # runs before multiprocessing's exit handler, which would only SIGTERM the workers

    def take(self, idx: torch.Tensor, views: str, seed: int) -> list[torch.Tensor]:
        """The next request's views on the device, once they are there; (idx, views, seed) must be the request's."""
        item = self._get()
        if isinstance(item, Exception):
            raise item
        want_idx, want_seed, (out, copied) = item
        if views != self.views or seed != want_seed or not torch.equal(idx.cpu(), want_idx):
            raise RuntimeError("the batch asked for is not the one prefetched: the loop and its prefetch plan disagree")
        if copied is not None:  # the caller's stream waits for the copy; the allocator for the caller's use
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            for v in out:
                v.record_stream(stream)
        if self.left is not None:
            self.left -= 1
        return out

    def close(self) -> None:
        """Stop the workers and the thread (also run at exit); the shared slots go with this object."""
        atexit.unregister(self.close)
        self.closing = True
        for p in self.workers:
            p.terminate()  # workers hold nothing that needs a graceful end
        for p in self.workers:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        if threading.current_thread() is not self.thread:
            self.thread.join()
        self.tasks.close()
        self.results.close()

    def _feed(self) -> None:
        """The thread: keep every slot decoding a request; ship the oldest to the device once all its tasks are in."""
        pending, free, shipped = collections.deque(), list(range(len(self.slots))), None
        try:
            while True:
                while free and (request := next(self.requests, None)) is not None:
                    pending.append(self._submit(*request, free.pop()))
                if shipped is not None:
                    self._put(shipped)  # after refilling the slots: the workers decode while the caller is busy
                if not pending:
                    return self._put(RuntimeError("asked for more batches than the prefetch plan holds"))
                while pending[0].tasks:  # tasks report in any order, from any request in flight
                    slot, error = self._result()
                    request = next(r for r in pending if r.slot == slot)
                    request.tasks -= 1
                    request.error = request.error or error
                head = pending.popleft()
                if head.error is not None:  # raised when the caller reaches the request, as the synchronous path would
                    return self._put(head.error)
                shipped = (head.idx, head.seed, self._ship(head.slot, len(head.idx)))
                free.append(head.slot)
        except _Closed:
            pass
        except Exception as e:
            self._put(e)

    def _submit(self, idx: torch.Tensor, seed: int, slot: int) -> _Request:
        u = crop_uniforms(len(idx), self.views, seed)
        paths = [self.folder.files[i] for i in idx.tolist()]
        for row in range(0, len(paths), self.unit):
            self.tasks.put((slot, row, paths[row:row + self.unit], u[row:row + self.unit]))
        return _Request(idx, seed, slot, tasks=-(-len(paths) // self.unit))

    def _ship(self, slot: int, n: int) -> tuple[list[torch.Tensor], "torch.cuda.Event | None"]:
        views = [self.slots[slot][v, :n] for v in range(len(self.slots[slot]))]
        if self.stream is None:
            return [v.to(self.device, copy=True) for v in views], None  # out of the slot, which is refilled next
        with torch.cuda.stream(self.stream):
            return [v.pin_memory().to(self.device, non_blocking=True) for v in views], self.stream.record_event()

    def _result(self) -> tuple:
        while True:
            try:
                return self.results.get(timeout=0.1)
            except queue.Empty:
                if self.closing:
                    raise _Closed from None
                for p in self.workers:
                    if p.exitcode is not None:
                        raise UsageError(f"a JPEG decoding worker died (exit code {p.exitcode}): out of memory? "
                                         f"fewer --workers use less") from None

    def _put(self, item) -> None:
        while not self.closing:
            try:
                return self.ready.put(item, timeout=0.1)
            except queue.Full:
                pass

    def _get(self):
        while True:
            try:
                return self.ready.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    return RuntimeError("the prefetch thread has stopped")


# ----------------------------------------------------------------------------------------------------
# Datasets as the stages see them

class Images:
    """A dataset as uint8 pixels plus `labels`, served as float batches in [0, 1] on the device with the
    released code's augmentations. CIFAR-10 sits on the device as one tensor. ImageNet is decoded per batch:
    here when the batch is asked for, or, with `workers` > 0 once the loop has said what it will ask for
    (prefetch_steps, prefetch), ahead of it in that many processes. `wait_seconds` is the time the caller has
    spent waiting for decoded images, in total (a trainer shows it per step beside images/s).
    `limit` keeps a fixed subset of `limit` images (drawn once with a fixed seed, so classes stay mixed even
    in the class-sorted ImageNet folder; the same subset in every run and process) for quick trials."""

    def __init__(self, dataset: str, data_dir: str, split: str, device: torch.device, limit: int | None = None,
                 workers: int = 0):
        _check_data_dir(data_dir)
        self.dataset, self.device, self.workers = dataset, device, workers
        self.prefetcher, self.wait_seconds = None, 0.0
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

    def prefetch_steps(self, first_step: int, batch: int, seed: int, rank: int, world: int, shards: int, views: str) -> None:
        """ImageNet: from now on decode this rank's shards of steps first_step, first_step + 1, ... AHEAD steps ahead
        of the loop, which must ask for them in that order (local_shards), each with its step's generator
        generator(device, seed, "step", step, shard) and VIEWS[views] ("pretrain" or a fine-tuning augmentation).
        Nothing on CIFAR-10 or with 0 workers."""
        def requests():
            for step in itertools.count(first_step):
                for shard, idx in local_shards(batch_indices(len(self), batch, step, seed, rank, world), rank, world, shards):
                    yield idx, derive_seed(seed, "step", step, shard)  # the seed of the step's generator (see views)
        self._prefetch(views, requests(), batch // shards, AHEAD * (shards // world), None)

    def prefetch(self, chunks: Sequence[torch.Tensor]) -> None:
        """ImageNet: from now on decode the centre crops of `chunks` ahead of the `batch(chunk)` calls, which must
        follow in this order. Nothing on CIFAR-10 or with 0 workers."""
        self._prefetch("centre", ((chunk, 0) for chunk in chunks), max(map(len, chunks), default=0), AHEAD, len(chunks))

    def _prefetch(self, views: str, requests, rows: int, slots: int, count: int | None) -> None:
        self.close()
        if self.dataset == "imagenet" and self.workers > 0 and count != 0:
            self.prefetcher = Prefetcher(self.pixels, views, requests, rows, slots, self.workers, self.device, count)

    def close(self) -> None:
        """Stop decoding ahead; later batches are decoded when they are asked for."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def views(self, idx: torch.Tensor, views: str, g: torch.Generator | None = None) -> list[torch.Tensor]:
        """ImageNet: VIEWS[views] of images idx, uint8 [b, 3, 224, 224] each, on the device: prefetched if a plan
        covers them, else decoded now. The random resized crops come from a CPU generator keyed by g's seed, so by
        (seed, step, shard) alone, not from g itself: they are cut where the JPEG is decoded, before the step."""
        seed = g.initial_seed() if g is not None else 0
        start = time.perf_counter()
        if self.prefetcher is None:
            out = [v.to(self.device) for v in self.pixels.decode(idx.cpu(), views, seed)]
        else:
            try:
                out = self.prefetcher.take(idx, views, seed)
            except BaseException:  # an unreadable image, a plan mismatch, Ctrl-C while waiting: stop the workers
                self.close()
                raise
            if self.prefetcher.left == 0:
                self.close()
        self.wait_seconds += time.perf_counter() - start
        return out

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).float() / 255.0

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float in [0, 1] and labels, both on the device; ImageNet images are the released
        ShortSideResizeCenterCrop(224) (also its validation transform)."""
        x = self.pixels[idx.to(self.pixels.device)] if self.dataset == "cifar10" else self.views(idx, "centre")[0]
        return self._float(x), self.labels[idx.to(self.device)]

    def pretrain_views(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(x0, v1, v2) as the released dataset.py: x0, the consistency branch's input, is the centre crop
        (the whole 32x32 image on CIFAR-10) with a random horizontal flip; v1, v2 the MoCo-v3 views."""
        if self.dataset == "cifar10":
            x, _ = self.batch(idx)
            return (consistency_augment(x, g),) + moco_views(x, g)
        x, c1, c2 = (self._float(v) for v in self.views(idx, "pretrain", g))
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
        if self.dataset == "cifar10":
            x, _ = self.batch(idx)
            if augment == "weak":
                return x, y
            scale = (0.4, 1.0) if augment == "strong" else (0.08, 1.0)
            x = random_resized_crop(x, g, scale, mode="bilinear" if augment == "strong" else "bicubic").clamp(0, 1)
        else:
            x = self._float(self.views(idx, augment, g)[0])
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
