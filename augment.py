"""Batched augmentations on [B, 3, H, W] floats in [0, 1], on the device (airbench-style), never per image
in PIL: the released code's MoCo-v3 views (with PIL's Gaussian blur reproduced), the consistency branch's
flip, RandomResizedCrop with torchvision's box statistics, timm's RandAugment and mixup/cutmix.

Every function draws its randomness from the torch.Generator it is given (data.generator keyed by seed,
step and shard), so a step's augmentations are a function of those keys alone.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


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


def _jitter_brightness(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (y * f[:, None, None, None]).clamp(0, 1)


def _jitter_contrast(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(y).mean((1, 2, 3), keepdim=True)
    return ((y - mean) * f[:, None, None, None] + mean).clamp(0, 1)


def _jitter_saturation(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    gray = _gray(y)
    return ((y - gray) * f[:, None, None, None] + gray).clamp(0, 1)


def _jitter_hue(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(y)
    return _hsv_to_rgb((h + f[:, None, None]) % 1.0, s, v)


JITTER_OPS = (_jitter_brightness, _jitter_contrast, _jitter_saturation, _jitter_hue)  # torchvision's fn_idx 0..3


def color_jitter_plan(g: torch.Generator, n: int, brightness: float = 0.4, contrast: float = 0.4,
                      saturation: float = 0.2, hue: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ColorJitter.get_params per image: a random order of its four ops (torch.randperm(4) on
    every call, and the released dataset.py calls it once per image) and factors brightness, contrast,
    saturation ~U(1 - s, 1 + s), hue ~U(-h, h). Returns (order [n, 4]: op indices in the order applied,
    factors [n, 4]: one per op)."""
    order = torch.rand(n, 4, generator=g, device=g.device).argsort(1)
    factors = torch.stack([_uniform(g, n, 1 - brightness, 1 + brightness), _uniform(g, n, 1 - contrast, 1 + contrast),
                           _uniform(g, n, 1 - saturation, 1 + saturation), _uniform(g, n, -hue, hue)], 1)
    return order, factors


def apply_color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Apply a plan from `color_jitter_plan`: at stage k each image gets its k-th op, so every op runs on
    B images in all (gathered per op, not computed for all and discarded)."""
    y = x.clone()
    for k in range(4):
        for j, op in enumerate(JITTER_OPS):
            rows = (order[:, k] == j).nonzero()[:, 0]
            if len(rows):
                y[rows] = op(y[rows], factors[rows, j])
    return y


def color_jitter(x: torch.Tensor, g: torch.Generator, p: float = 0.8) -> torch.Tensor:
    """RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p): the released MoCo views' jitter, in a random order
    of its four ops drawn per image, as torchvision does on the released per-image pipeline."""
    y = apply_color_jitter(x, *color_jitter_plan(g, x.shape[0]))
    return torch.where(_coin(g, x.shape[0], p)[:, None, None, None], y, x)


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
    """timm's Mixup in 'batch' mode with prob 1 (the released fine-tuning config): one lam for the whole
    batch, each image mixed with the batch reversed. With both alphas > 0, CutMix with probability
    `switch_prob`, else Mixup; with one of them 0, only the other (timm's _params_per_batch). Mixup: lam ~
    Beta(mixup_alpha, mixup_alpha), x = lam x + (1 - lam) x_reversed. CutMix: lam ~ Beta(cutmix_alpha,
    cutmix_alpha), a box of side sqrt(1 - lam) times the image's, centred uniformly and clipped at the border,
    is pasted, and lam becomes 1 - (box area / image area). Returns (x, y_a, y_b, lam): the loss is
    lam CE(y_a) + (1 - lam) CE(y_b), as timm's mixed one-hot targets (also with label smoothing)."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device)))
    other = x.flip(0)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    if use_cutmix:
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
