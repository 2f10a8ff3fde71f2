"""Data loading and augmentations against independent references."""
import colorsys
import math
import os
import pickle

import numpy as np
import pytest
import torch

import augment
import data
from jobs import UsageError


@pytest.mark.quick
def test_cifar_reader_matches_raw_pickles(cifar_dir):
    x, y = data.load_cifar10(cifar_dir, "test")
    with open(os.path.join(cifar_dir, "cifar-10-batches-py", "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == raw[b"labels"]
    assert x[3, 1, 2, 5].item() == raw[b"data"][3][1024 + 2 * 32 + 5]  # green plane, row 2, col 5


@pytest.mark.quick
def test_hsv_matches_colorsys():
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    h, s, v = augment._rgb_to_hsv(x)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (3, 4, 4)]:
        want = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        assert np.allclose([h[b, i, j], s[b, i, j], v[b, i, j]], want)
    assert torch.allclose(augment._hsv_to_rgb(h, s, v), x)


@pytest.mark.quick
def test_moco_views_are_images_and_differ():
    x = torch.rand(8, 3, 32, 32)
    v1, v2 = augment.moco_views(x, data.generator(torch.device("cpu"), 1))
    assert v1.shape == x.shape and v2.shape == x.shape
    assert v1.min() >= -1e-6 and v1.max() <= 1 + 1e-6 and not torch.allclose(v1, v2)


def test_full_crop_is_identity():
    x = torch.rand(2, 3, 8, 8)
    g = data.generator(torch.device("cpu"), 0)
    assert torch.allclose(augment.random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x, atol=1e-5)


@pytest.mark.quick
def test_batches_cover_an_epoch_and_split_across_ranks():
    idx = torch.cat([data.batch_indices(100, 20, s, 3) for s in range(5)])
    assert sorted(idx.tolist()) == list(range(100))
    both = torch.cat([data.batch_indices(100, 20, 7, 3, rank=r, world=2) for r in range(2)])
    assert torch.equal(both, data.batch_indices(100, 20, 7, 3))


@pytest.mark.quick
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


# ----------------------------------------------------------------------------------------------------
# The released recipe's augmentations against PIL and hand-written references

def _pil(x: torch.Tensor):
    from PIL import Image
    return Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _from_pil(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).astype(np.float32)).permute(2, 0, 1)  # 0..255


def _uint8_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed)).float() / 255


@pytest.mark.parametrize("size", [32, 224])
def test_blur_matches_pil_gaussian_blur(size):
    from PIL import ImageFilter
    radii = [0.1, 0.7, 1.0, 1.6, 2.0]
    x = _uint8_images(len(radii), size, size + 5)
    exact = augment.pil_gaussian_blur(x, torch.tensor(radii), uint8_passes=True)
    fast = augment.pil_gaussian_blur(x, torch.tensor(radii))
    for b, r in enumerate(radii):
        want = _from_pil(_pil(x[b]).filter(ImageFilter.GaussianBlur(r)))
        assert torch.equal((exact[b] * 255).round(), want), r  # same boxes, weights and rounding as Pillow
        diff = ((fast[b] * 255).round() - want).abs()
        assert diff.max() <= 3 and diff.mean() < 1.1, (r, diff.max(), diff.mean())  # floats: no per-pass rounding
    # strength: the impulse response of radius r has std r along each axis (3 passes of variance r^2 / 3),
    # so the released blur reaches 2 px on 32 x 32 CIFAR-10 (a 3-tap kernel stays below 1 px)
    delta = torch.zeros(len(radii), 1, size, size)
    delta[:, :, size // 2, size // 2] = 1.0
    response = augment.pil_gaussian_blur(delta, torch.tensor(radii))[:, 0]
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    for b, r in enumerate(radii):
        assert abs(response[b].sum() - 1) < 1e-5
        var_x = (response[b].sum(0) * offsets ** 2).sum()
        var_y = (response[b].sum(1) * offsets ** 2).sum()
        assert abs(var_x - r ** 2) < 1e-4 and abs(var_y - r ** 2) < 1e-4, (r, var_x, var_y)


def test_gaussian_blur_draws_a_radius_per_image_over_its_range():
    """Read each image's radius back from its impulse response (PIL's blur of radius r has std exactly r,
    tested above) instead of replaying the draw: one radius per image, spread as U(0.1, 2), and p the share
    of images blurred."""
    n, size = 400, 17
    delta = torch.zeros(n, 1, size, size)
    delta[:, :, size // 2, size // 2] = 1.0
    out = augment.gaussian_blur(delta, data.generator(torch.device("cpu"), 5), p=1.0)[:, 0]
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    radius = (out.sum(1) * offsets ** 2).sum(1).sqrt()  # the std of the response along x
    assert radius.min() > 0.1 - 1e-3 and radius.max() < 2.0 + 1e-3
    uniform_cdf = (radius.sort().values - 0.1) / 1.9
    ks = (uniform_cdf - torch.arange(1, n + 1) / n).abs().max()
    assert ks < 1.63 / math.sqrt(n), ks  # Kolmogorov-Smirnov against U(0.1, 2) at p = 0.01
    half = augment.gaussian_blur(delta, data.generator(torch.device("cpu"), 6), p=0.5)
    blurred = (half[:, 0, size // 2, size // 2] < 1).float().mean()
    assert abs(blurred - 0.5) < 4 * math.sqrt(0.25 / n)


def _pil_hue(im, factor: float):
    """torchvision's adjust_hue on a PIL image (what the released per-image ColorJitter runs): shift the
    uint8 hue channel of PIL's HSV by int8(factor * 255), wrapping around."""
    from PIL import Image
    h, s, v = im.convert("HSV").split()
    shifted = np.array(h, dtype=np.uint8) + np.int8(factor * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")


@pytest.mark.quick
def test_color_jitter_follows_each_images_order_as_pil():
    """ColorJitter(0.4, 0.4, 0.2, 0.1) as the released PIL pipeline runs it: torchvision's adjust_brightness,
    adjust_contrast, adjust_saturation (ImageEnhance.Brightness, Contrast, Color) and adjust_hue on PIL images,
    in each image's own order. All 24 orders, one per image, with strong factors; floats against PIL's uint8
    steps agree within 2.5/255 per image on average, while the reversed order is off by more than that."""
    import itertools

    from PIL import ImageEnhance
    smooth = torch.nn.functional.interpolate(_uint8_images(24, 6, 6, seed=7), size=(24, 24), mode="bilinear")
    x = (smooth * 255).round() / 255
    order = torch.tensor(list(itertools.permutations(range(4))))
    factors = torch.tensor([[1.35, 0.65, 1.2, 0.08]]).expand(24, 4)
    pil_ops = [lambda im, f: ImageEnhance.Brightness(im).enhance(f), lambda im, f: ImageEnhance.Contrast(im).enhance(f),
               lambda im, f: ImageEnhance.Color(im).enhance(f), _pil_hue]
    out = augment.apply_color_jitter(x, order, factors)

    def pil_jitter(b, ops):
        im = _pil(x[b])
        for j in ops:
            im = pil_ops[j](im, float(factors[b, j]))
        return _from_pil(im)

    for b in range(24):
        error = ((out[b] * 255) - pil_jitter(b, order[b].tolist())).abs().mean()
        reversed_error = ((out[b] * 255) - pil_jitter(b, order[b].flip(0).tolist())).abs().mean()
        assert error < 2.5 < reversed_error, (order[b].tolist(), error, reversed_error)


def test_color_jitter_draws_an_order_per_image():
    """torchvision draws randperm(4) on every call, i.e. per image: all 24 orders, equally often."""
    n = 4800
    order, factors = augment.color_jitter_plan(data.generator(torch.device("cpu"), 3), n)
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))  # each row a permutation
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1].float()
    assert len(counts) == 24 and ((counts - n / 24) ** 2 / (n / 24)).sum() < 49.7  # chi-square, 23 dof, p = 0.001
    lo, hi = factors.min(0).values, factors.max(0).values
    assert torch.allclose(lo, torch.tensor([0.6, 0.6, 0.8, -0.1]), atol=0.01)
    assert torch.allclose(hi, torch.tensor([1.4, 1.4, 1.2, 0.1]), atol=0.01)


def _torchvision_box(u, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, written as its loop, fed the same uniforms."""
    area = height * width
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[t][0])
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[t][1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[t][2] * (height - h + 1)), int(u[t][3] * (width - w + 1)), h, w
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_boxes_follow_torchvision():
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[32, 32], [375, 500], [500, 333], [40, 400], [300, 20]] * 40)
    u = torch.rand(len(sizes), 10, 4, generator=g, dtype=torch.float64)
    u[:5, :, 0] = 1.0  # area 1 with a non-square aspect never fits: the fallback path
    for scale in [(0.08, 1.0), (0.4, 1.0)]:
        got = torch.stack(augment.rrc_boxes(u, sizes[:, 0], sizes[:, 1], scale), 1)
        for i in range(len(sizes)):
            want = _torchvision_box(u[i].tolist(), int(sizes[i, 0]), int(sizes[i, 1]), scale, (3 / 4, 4 / 3))
            assert got[i].tolist() == list(want), (i, scale)


@pytest.mark.quick
def test_crop_resize_matches_pil_crop_then_bilinear_resize():
    from PIL import Image
    x = _uint8_images(3, 32, 32)
    boxes = [(3, 5, 20, 11), (0, 0, 32, 32), (10, 2, 7, 29)]  # top, left, h, w
    top, left, h, w = (torch.tensor(v) for v in zip(*boxes))
    out = augment.crop_resize(x, top, left, h, w, 32)
    for b, (t, l_, hh, ww) in enumerate(boxes):
        want = _from_pil(_pil(x[b]).crop((l_, t, l_ + ww, t + hh)).resize((32, 32), Image.BILINEAR))
        diff = ((out[b] * 255) - want).abs()
        assert diff.max() <= 1.0 and diff.mean() < 0.4, (b, diff.max(), diff.mean())  # PIL rounds twice


def test_consistency_augment_is_a_flip_only():
    x = torch.rand(400, 3, 4, 4)
    out = augment.consistency_augment(x, data.generator(torch.device("cpu"), 2))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert abs(flipped.float().mean() - 0.5) < 4 * 0.025  # 4 standard errors of a fair coin over 400


@pytest.mark.parametrize("name,level,sign", [
    ("AutoContrast", 9.0, 1), ("Equalize", 9.0, 1), ("Invert", 9.0, 1), ("PosterizeIncreasing", 3.0, 1),
    ("PosterizeIncreasing", 10.0, 1), ("SolarizeIncreasing", 9.0, 1), ("SolarizeAdd", 9.3, 1),
    ("ColorIncreasing", 9.0, 1), ("ColorIncreasing", 8.4, -1), ("ContrastIncreasing", 9.0, 1),
    ("ContrastIncreasing", 9.6, -1), ("BrightnessIncreasing", 9.0, 1), ("BrightnessIncreasing", 7.7, -1),
    ("SharpnessIncreasing", 9.0, 1), ("SharpnessIncreasing", 9.0, -1)])
def test_rand_augment_pixel_ops_match_pil(name, level, sign):
    from PIL import ImageEnhance, ImageOps
    x = _uint8_images(1, 20, 27, seed=3)
    x[:, 0] = x[:, 0] * 0.5 + 0.2  # a channel that does not span 0..255, so autocontrast has work to do
    x = (x * 255).round() / 255
    factor = max(0.1, 1 + sign * level / 10 * 0.9)
    im = _pil(x[0])
    want = {  # timm's level -> argument, then the PIL op, written out from timm's auto_augment.py
        "AutoContrast": lambda: ImageOps.autocontrast(im), "Equalize": lambda: ImageOps.equalize(im),
        "Invert": lambda: ImageOps.invert(im),
        # timm's posterize(img, 0) under the Pillow of the released code kept no bits (mask ~255): black;
        # Pillow 10+ refuses 0 bits, so that case is checked by hand
        "PosterizeIncreasing": lambda: (ImageOps.posterize(im, 4 - int(level / 10 * 4)) if level < 10
                                        else im.point(lambda i: 0)),
        "SolarizeIncreasing": lambda: ImageOps.solarize(im, 256 - min(256, int(level / 10 * 256))),
        "SolarizeAdd": lambda: im.point([min(255, i + int(level / 10 * 110)) if i < 128 else i for i in range(256)] * 3),
        "ColorIncreasing": lambda: ImageEnhance.Color(im).enhance(factor),
        "ContrastIncreasing": lambda: ImageEnhance.Contrast(im).enhance(factor),
        "BrightnessIncreasing": lambda: ImageEnhance.Brightness(im).enhance(factor),
        "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(im).enhance(factor),
    }[name]()
    got = augment.RAND_OPS[name](x * 255, torch.tensor([level]), torch.tensor([float(sign)]))
    assert torch.equal(got[0], _from_pil(want))


def test_rand_augment_geometry_matches_pil():
    from PIL import Image
    smooth = torch.nn.functional.interpolate(_uint8_images(1, 10, 12, seed=4), size=(40, 48), mode="bilinear")
    x = (smooth * 255).round()
    im, fill = _pil(x[0] / 255), (128, 128, 128)
    # translate by exactly 9 pixels (level chosen so that 0.45 level / 10 * 48 = 9): no interpolation at all
    got = augment.RAND_OPS["TranslateXRel"](x, torch.tensor([9 / 0.45 / 48 * 10]), torch.tensor([-1.0]))
    want = im.transform((48, 40), Image.AFFINE, (1, 0, -9, 0, 1, 0), resample=Image.BICUBIC, fillcolor=fill)
    assert torch.equal(got[0], _from_pil(want))
    for name, want in [("Rotate", im.rotate(27, resample=Image.BICUBIC, fillcolor=fill)),
                       ("ShearX", im.transform((48, 40), Image.AFFINE, (1, 0.27, 0, 0, 1, 0), resample=Image.BICUBIC, fillcolor=fill)),
                       ("ShearY", im.transform((48, 40), Image.AFFINE, (1, 0, 0, 0.27, 1, 0), resample=Image.BICUBIC, fillcolor=fill))]:
        diff = (augment.RAND_OPS[name](x, torch.tensor([9.0]), torch.tensor([1.0]))[0] - _from_pil(want)).abs()
        # bicubic a = -0.75 (PyTorch) vs -0.5 (PIL), and a pixel or two on the fill border
        assert diff.mean() < 1.0 and (diff > 4).float().mean() < 0.01, (name, diff.mean())


def test_rand_augment_at_magnitude_zero_leaves_magnitude_ops_unchanged():
    x = (_uint8_images(2, 16, 16) * 255).round()
    for name in ["Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                 "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]:
        assert torch.equal(augment.RAND_OPS[name](x, torch.zeros(2), torch.ones(2)), x), name
    assert torch.equal(augment.RAND_OPS["PosterizeIncreasing"](x, torch.zeros(2), torch.ones(2)), torch.floor(x / 16) * 16)


def test_rand_augment_plan_statistics():
    n = 20000
    op, applied, level, sign = augment.rand_augment_plan(data.generator(torch.device("cpu"), 7), n)
    assert op.shape == applied.shape == level.shape == (n, 2)
    se = math.sqrt(0.25 / (2 * n))
    assert abs(applied.float().mean() - 0.5) < 4 * se  # each op applied with probability 1/2
    per_image = applied.sum(1).float()
    assert abs((per_image == 0).float().mean() - 0.25) < 0.02 and abs((per_image == 2).float().mean() - 0.25) < 0.02
    counts = torch.bincount(op.flatten(), minlength=15).float()
    expected = 2 * n / 15
    assert ((counts - expected) ** 2 / expected).sum() < 45  # chi-square, 14 dof: 45 is far beyond p = 1e-4
    assert bool((op[:, 0] == op[:, 1]).any())  # drawn with replacement, as timm's np.random.choice
    assert abs(level.mean() - 9) < 0.02 and abs(level.std() - 0.5) < 0.02 and level.max() <= 10 and level.min() >= 0
    assert abs((level == 10).float().mean() - 0.0228) < 0.005  # P(N(9, 0.5) >= 10) = 1 - Phi(2), clipped to 10
    assert abs((sign < 0).float().mean() - 0.5) < 4 * math.sqrt(0.25 / (2 * n))


def test_rand_augment_applies_a_plan_in_order_as_pil():
    """apply_rand_ops against timm's PIL ops composed by hand, for a hand-written plan: each image's two slots
    in order, a slot skipped where it is not applied, each image at its own level and sign (pixel ops, where
    the batched ops are exact). Images 2 and 3 hold the same two ops in opposite orders."""
    from PIL import ImageEnhance, ImageOps
    x = _uint8_images(4, 20, 27, seed=5)
    plan = [[("Invert", True, 9.0, 1.0), ("Equalize", True, 9.0, 1.0)],
            [("SolarizeIncreasing", False, 9.0, 1.0), ("AutoContrast", True, 9.0, 1.0)],
            [("ColorIncreasing", True, 8.0, -1.0), ("PosterizeIncreasing", True, 3.0, 1.0)],
            [("PosterizeIncreasing", True, 3.0, 1.0), ("ColorIncreasing", True, 8.0, -1.0)]]
    names = list(augment.RAND_OPS)
    op = torch.tensor([[names.index(slot[0]) for slot in row] for row in plan])
    applied, level, sign = (torch.tensor([[slot[k] for slot in row] for row in plan]) for k in (1, 2, 3))
    pil = {"Invert": lambda im, lv, sg: ImageOps.invert(im), "Equalize": lambda im, lv, sg: ImageOps.equalize(im),
           "AutoContrast": lambda im, lv, sg: ImageOps.autocontrast(im),
           "SolarizeIncreasing": lambda im, lv, sg: ImageOps.solarize(im, 256 - int(lv / 10 * 256)),
           "ColorIncreasing": lambda im, lv, sg: ImageEnhance.Color(im).enhance(max(0.1, 1 + sg * lv / 10 * 0.9)),
           "PosterizeIncreasing": lambda im, lv, sg: ImageOps.posterize(im, 4 - int(lv / 10 * 4))}
    out = augment.apply_rand_ops(x, op, applied, level, sign)
    for b, row in enumerate(plan):
        im = _pil(x[b])
        for name, on, lv, sg in row:
            im = pil[name](im, lv, sg) if on else im
        assert torch.equal(out[b] * 255, _from_pil(im)), b
    assert not torch.equal(out[2], out[3])


@pytest.mark.quick
def test_mixup_and_cutmix_statistics():
    B, H, W = 8, 20, 30
    x = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 3, H, W).contiguous()  # image b == b
    y = torch.arange(B)
    cut, mix_lams = 0, []
    for step in range(2000):
        out, y_a, y_b, lam = augment.mixup_cutmix(x, y, data.generator(torch.device("cpu"), "mix", step))
        assert torch.equal(y_a, y) and torch.equal(y_b, y.flip(0)) and 0 <= lam <= 1
        from_other = (out == x.flip(0)).all(1)[0]  # pixels of image 0 taken from image B-1
        if bool(((out == x) | (out == x.flip(0))).all()):  # cutmix: every pixel from one image or the other
            cut += 1
            area = from_other.float().mean().item()
            assert abs(area - (1 - lam)) < 1e-6  # lam corrected to the pasted box's area
            rows, cols = from_other.any(1).nonzero(), from_other.any(0).nonzero()
            if len(rows):  # the pasted region is one box
                assert from_other.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        else:
            assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
            mix_lams.append(lam)
    assert abs(cut / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000)  # switch probability 1/2
    lams = torch.tensor(mix_lams)
    # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.0962
    assert abs(lams.mean() - 0.5) < 4 * math.sqrt(0.0962 / len(lams))
    assert abs(lams.var() - 0.0962) < 0.015


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixup_or_cutmix_alone(mixup, cutmix):
    """With one alpha 0, timm uses the other every time (it used to draw Beta(0, 0) and crash)."""
    B, H, W = 8, 20, 30
    x = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 3, H, W).contiguous()
    lams = []
    for step in range(300):
        out, _, _, lam = augment.mixup_cutmix(x, torch.arange(B), data.generator(torch.device("cpu"), "alone", step), mixup, cutmix)
        pasted = bool(((out == x) | (out == x.flip(0))).all())
        if mixup:
            assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-5) and (not pasted or lam in (0.0, 1.0))
        else:
            assert pasted and abs((out == x.flip(0)).all(1)[0].float().mean().item() - (1 - lam)) < 1e-6
        lams.append(lam)
    if mixup:  # Beta(0.8, 0.8): variance 1 / (4 (2 alpha + 1)) = 0.0962
        assert abs(torch.tensor(lams).var() - 0.0962) < 0.025


# ----------------------------------------------------------------------------------------------------
# Datasets: subsets, pre-training and fine-tuning batches, bad --data-dir

@pytest.mark.quick
def test_train_images_is_a_fixed_subset(cifar_dir):
    full = data.Images("cifar10", cifar_dir, "test", torch.device("cpu"))
    a = data.Images("cifar10", cifar_dir, "test", torch.device("cpu"), limit=7)
    b = data.Images("cifar10", cifar_dir, "test", torch.device("cpu"), limit=7)
    assert len(a) == 7 and torch.equal(a.pixels, b.pixels)
    rows = [int(((full.pixels == a.pixels[i]).flatten(1).all(1)).nonzero()[0]) for i in range(7)]
    assert rows == sorted(rows) and len(set(rows)) == 7 and rows != list(range(7))
    assert torch.equal(a.labels, full.labels[rows])
    for bad in (0, len(full) + 1):
        with pytest.raises(UsageError, match="--train-images"):
            data.Images("cifar10", cifar_dir, "test", torch.device("cpu"), limit=bad)


def test_cifar_batches_for_each_recipe(cifar_dir):
    images = data.Images("cifar10", cifar_dir, "test", torch.device("cpu"))
    idx = torch.arange(6)
    g = lambda: data.generator(torch.device("cpu"), 4)
    x, y = images.batch(idx)
    x_w, y_w = images.finetune_batch(idx, g(), "weak")
    assert torch.equal(x_w, x) and torch.equal(y_w, y)  # the released CIFAR-10 fine-tuning: no augmentation
    for kind in ("strong", "autoaug"):
        xa, ya = images.finetune_batch(idx, g(), kind)
        assert xa.shape == x.shape and torch.equal(ya, y) and xa.min() >= 0 and xa.max() <= 1
    x0, v1, v2 = images.pretrain_views(idx, g())
    assert all(v.shape == x.shape for v in (x0, v1, v2)) and v1.min() >= -1e-6 and v2.max() <= 1 + 1e-6
    assert all(torch.equal(x0[b], x[b]) or torch.equal(x0[b], x[b].flip(2)) for b in range(6))
    with pytest.raises(UsageError, match="unknown fine-tuning augmentation"):
        images.finetune_batch(idx, g(), "autoaugment")


def test_imagenet_crops_come_from_the_full_image(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(2)
    (tmp_path / "train" / "n01").mkdir(parents=True)
    for k, (w, h) in enumerate([(500, 375), (300, 460)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "train" / "n01" / f"{k}.png")
    images = data.Images("imagenet", str(tmp_path), "train", torch.device("cpu"))
    idx = torch.tensor([1, 0])
    g = data.generator(torch.device("cpu"), 8)
    x, _ = images.finetune_batch(idx, g, "strong")
    # by hand: the boxes' uniforms come from a CPU generator keyed by the step generator's seed and "crop" (not
    # from the step generator, which the device draws use); the box is in the full 300 x 460 image, cropped then
    # bicubic-resized
    u = torch.rand(1, 2, 10, 4, generator=data.generator(torch.device("cpu"), g.initial_seed(), "crop"))[0]
    top, left, h, w = (int(v) for v in augment.rrc_boxes(u[:1], torch.tensor([460]), torch.tensor([300]), (0.4, 1.0)))
    with Image.open(tmp_path / "train" / "n01" / "1.png") as im:
        crop = _from_pil(im.crop((left, top, left + w, top + h)).resize((224, 224), Image.BICUBIC))
    assert torch.equal(x[0] * 255, crop) or torch.equal(x[0] * 255, crop.flip(2))
    for kind in ("weak", "autoaug"):
        assert images.finetune_batch(idx, g, kind)[0].shape == (2, 3, 224, 224)
    x0, v1, v2 = images.pretrain_views(idx, g)
    assert x0.shape == v1.shape == v2.shape == (2, 3, 224, 224)


def test_data_dir_that_is_a_file_is_one_clear_error(tmp_path):
    afile = tmp_path / "passwd"
    afile.write_text("root:x:0:0\n")
    for dataset in ("cifar10", "imagenet"):
        with pytest.raises(UsageError, match="is not a directory"):
            data.Images(dataset, str(afile), "train", torch.device("cpu"))


def test_failed_download_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_URL", (tmp_path / "no-such-archive.tar.gz").as_uri())  # fails at once
    typo = tmp_path / "cifra10"
    with pytest.raises(UsageError) as err:
        data.Images("cifar10", str(typo), "train", torch.device("cpu"))
    message = str(err.value)
    assert "download" in message and "cifra10" in message and "\n" not in message
    assert not typo.exists()
