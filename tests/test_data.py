"""Data loading and augmentations against independent references."""
import colorsys
import os
import pickle

import numpy as np
import pytest
import torch

import data
from model import UsageError


def test_cifar_reader_matches_raw_pickles(cifar_dir):
    x, y = data.load_cifar10(cifar_dir, "test")
    with open(os.path.join(cifar_dir, "cifar-10-batches-py", "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == raw[b"labels"]
    assert x[3, 1, 2, 5].item() == raw[b"data"][3][1024 + 2 * 32 + 5]  # green plane, row 2, col 5


def test_hsv_matches_colorsys():
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    h, s, v = data._rgb_to_hsv(x)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (3, 4, 4)]:
        want = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        assert np.allclose([h[b, i, j], s[b, i, j], v[b, i, j]], want)
    assert torch.allclose(data._hsv_to_rgb(h, s, v), x)


def test_weak_augment_is_a_padded_crop_and_flip():
    x = torch.rand(6, 3, 8, 8)
    out = data.weak_augment(x, data.generator(torch.device("cpu"), 0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(6):
        candidates = [padded[b, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[b], c) for c in candidates)


def test_moco_views_are_images_and_differ():
    x = torch.rand(8, 3, 32, 32)
    v1, v2 = data.moco_views(x, data.generator(torch.device("cpu"), 1))
    assert v1.shape == x.shape and v2.shape == x.shape
    assert v1.min() >= -1e-6 and v1.max() <= 1 + 1e-6 and not torch.allclose(v1, v2)


def test_full_crop_is_identity():
    x = torch.rand(2, 3, 8, 8)
    g = data.generator(torch.device("cpu"), 0)
    assert torch.allclose(data.random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x, atol=1e-5)


def test_batches_cover_an_epoch_and_split_across_ranks():
    idx = torch.cat([data.batch_indices(100, 20, s, 3) for s in range(5)])
    assert sorted(idx.tolist()) == list(range(100))
    both = torch.cat([data.batch_indices(100, 20, 7, 3, rank=r, world=2) for r in range(2)])
    assert torch.equal(both, data.batch_indices(100, 20, 7, 3))


def test_missing_and_truncated_files_are_clear_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with pytest.raises(UsageError, match="data_batch_1 is missing"):
        data.load_cifar10(str(tmp_path), "train")
    (folder / "test_batch").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(UsageError, match="truncated or corrupt"):
        data.load_cifar10(str(tmp_path), "test")


def test_imagenet_folder_resizes_crops_and_labels(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    sizes = {"n02": [(300, 260), (500, 224)], "n01": [(240, 400)]}
    for wnid, shapes in sizes.items():
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for k, (w, h) in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "val" / wnid / f"{k}.JPEG")
    images = data.Images("imagenet", str(tmp_path), "test", torch.device("cpu"))
    assert len(images) == 3 and images.labels.tolist() == [0, 1, 1]  # wnids sorted: n01 -> 0, n02 -> 1
    x, y = images.batch(torch.tensor([2, 0]))
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [1, 0]
    # by hand, the released ShortSideResizeCenterCrop: bicubic short side to 224, then the centre 224 x 224
    with Image.open(tmp_path / "val" / "n02" / "1.JPEG") as im:
        im = im.convert("RGB")  # 500 x 224: short side already 224, so the resize keeps the size
        left = (500 - 224) // 2
        want = torch.from_numpy(np.asarray(im.crop((left, 0, left + 224, 224))).copy()).permute(2, 0, 1)
    assert torch.equal((x[0] * 255).round().to(torch.uint8), want)
    with Image.open(tmp_path / "val" / "n01" / "0.JPEG") as im:  # 240 x 400 -> 224 x 373, rows 74..298
        im = im.convert("RGB").resize((224, 373), Image.BICUBIC).crop((0, 74, 224, 298))
        want = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    assert torch.equal((images.batch(torch.tensor([0]))[0][0] * 255).round().to(torch.uint8), want)


def test_short_side_centre_crop_halves_large_images_with_a_box_filter():
    from PIL import Image
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8))  # short side 700 >= 448
    want = im.resize((500, 350), Image.BOX).resize((320, 224), Image.BICUBIC).crop((48, 0, 272, 224))
    assert np.array_equal(np.asarray(data.short_side_centre_crop(im, 224)), np.asarray(want))


def test_imagenet_folder_missing_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        data.Images("imagenet", str(tmp_path), "train", torch.device("cpu"))
