"""The rRCM network: a compact pre-norm Vision Transformer that reads a noisy image and its noise level.

Conventions shared by every script (read these first):
- Images live in [0, 1] ("pixel space"). The network normalises with mean = std = 0.5, so it works in
  [-1, 1] ("model space"). A Gaussian of std sigma added in pixel space is std sigma / 0.5 = 2 sigma in
  model space, and that is the diffusion time t of the noisy image: `diffusion_time` is the one place
  the factor 2 lives. Every user-facing --sigma is in pixel space, where certified radii are measured.
- Noise is added in pixel space *before* normalising (`noisy_input`): randomized smoothing certifies
  the classifier on pixel-space inputs, so the noise must be exactly N(0, sigma^2 I) there.
- Diffusion follows EDM (Karras et al. 2022): x_t = x_0 + t * eps, and the network sees c_in(t) * x_t
  with c_in(t) = 1 / sqrt(t^2 + sigma_data^2) plus a time token that embeds 250 * log(t).

Token sequence: [class token, time token, patch tokens]. The normalised class token is the
representation h(x_t, t); pre-training puts a projector MLP on it (Eq. 7-10), fine-tuning a linear head.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

import kernels


# ----------------------------------------------------------------------------------------------------
# Noise conventions

NORM_MEAN = NORM_STD = 0.5  # pixel [0, 1] -> model [-1, 1]

# EDM (Karras et al. 2022) constants, in model space.
SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
FINAL_SCALES = 81  # N at the end of pre-training's curriculum (20 -> 40 -> 80 intervals)


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    return (x - NORM_MEAN) / NORM_STD


def diffusion_time(sigma: float) -> float:
    """Pixel-space noise std sigma -> model-space std, i.e. the diffusion time t = 2 sigma."""
    return sigma / NORM_STD


def smoothing_time(sigma: float) -> float:
    """The time t the classifier is told for pixel noise sigma: 2 sigma snapped to the nearest point of the
    final 81-point EDM grid of pre-training (0.4927 / 0.9654 / 2.0036 for sigma 0.25 / 0.5 / 1.0), whose
    time tokens and c_in the encoder saw; the released code does the same (rrcm_tune.py, find_nearest).
    Only the time input is snapped: the noise itself stays exactly sigma in pixel space."""
    grid = edm_sigmas(FINAL_SCALES)
    return float(grid[(grid - diffusion_time(sigma)).abs().argmin()])


def noisy_input(x: torch.Tensor, sigma: float, eps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The smoothing input: x + sigma * eps in pixel space, then normalised; returns (x_t, t)."""
    return to_model_space(x + sigma * eps), smoothing_time(sigma)


def edm_sigmas(N: int, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1.
    Decreasing: t_0 = sigma_max, t_{N-1} = sigma_min (float64 so the ends are exact)."""
    i = torch.arange(N, dtype=torch.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), sigma_max ** (1 / RHO)
    return (hi + i / (N - 1) * (lo - hi)) ** RHO


def c_in(t: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.sqrt(t**2 + SIGMA_DATA**2)


def time_input(t: torch.Tensor) -> torch.Tensor:
    """The scalar the time token embeds: 250 log t (EDM's 1000 * 0.25 * log t)."""
    return 250.0 * torch.log(t)


def timestep_embedding(s: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of the scalars s [B] (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
    args = s.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------------------------------
# The network

@dataclass
class ViTConfig:
    img_size: int = 32
    patch_size: int = 4
    width: int = 192
    depth: int = 4
    heads: int = 3
    num_classes: int = 10
    proj_hidden: int = 512
    proj_dim: int = 256
    # The classifier reads the class token through the final LayerNorm on ImageNet but raw on CIFAR-10
    # (released code: train.layernorm). Pre-training always uses the normalised token.
    classifier_norm: bool = True
    # ImageNet: MoCo-v3 initialisation of the blocks and patch embedding; CIFAR-10: PyTorch's defaults
    # (released configs: moco_initialization).
    moco_init: bool = False

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs of the encoder for one image (qkv, proj, MLP: 24 L W^2; attention 4 L^2 W)."""
        L, W, P = 2 + (self.img_size // self.patch_size) ** 2, self.width, self.patch_size
        return self.depth * (24 * L * W * W + 4 * L * L * W) + 2 * (L - 2) * 3 * P * P * W


# Paper Table 3 (projector hidden / output dims in the last two values). `tiny` is ours, for CPU and tests.
PRESETS = {
    "tiny": dict(width=192, depth=4, heads=3, proj_hidden=512, proj_dim=256),
    "S": dict(width=512, depth=6, heads=8, proj_hidden=2048, proj_dim=256),
    "B": dict(width=768, depth=12, heads=12, proj_hidden=2048, proj_dim=256),
    "B-Deep": dict(width=768, depth=24, heads=24, proj_hidden=4096, proj_dim=256),
}
DATASETS = {"cifar10": dict(img_size=32, patch_size=4, num_classes=10, moco_init=False),
            "imagenet": dict(img_size=224, patch_size=16, num_classes=1000, moco_init=True)}


def vit_config(preset: str, dataset: str) -> ViTConfig:
    if preset not in PRESETS or dataset not in DATASETS:
        raise ValueError(f"unknown preset {preset!r} or dataset {dataset!r}: choose from {list(PRESETS)}, {list(DATASETS)}")
    cfg = ViTConfig(**PRESETS[preset], **DATASETS[dataset])
    if (preset, dataset) == ("B", "imagenet"):
        cfg.proj_hidden = 4096  # configs/imagenet_pretrain_rcmb.py widens the projector of ImageNet rRCM-B
    return cfg


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.proj(rearrange(kernels.attention(q, k, v), "b h l d -> b l (h d)"))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def projector_mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    """The 3-layer MoCo-v3 projector: (Linear no bias -> BatchNorm -> ReLU) x 2, then Linear."""
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out, bias=False))


class AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is again the sum over processes: every rank's loss depends on every
    rank's rows through the shared statistics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the global batch of all processes (what SyncBatchNorm gives the authors' GPU runs),
    written with one differentiable all-reduce so it also runs on CPU/gloo: a K-process step then computes
    the same projector output as a one-process step on the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # Statistics in fp32 whatever autocast made x (bf16 on GPUs): the running buffers are fp32, and
        # E[x^2] - E[x]^2 in bf16 would cancel to noise. The output keeps x's dtype, as BatchNorm1d's does.
        x32 = x.float()
        local = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_full((1,), x.shape[0])])
        total = AllReduceSum.apply(local)
        C = x.shape[1]
        count = total[-1]
        mean = total[:C] / count
        var = total[C:2 * C] / count - mean * mean  # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        return ((x32 - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d in `module` for a GlobalBatchNorm1d holding the same parameters and statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            bn = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            bn.requires_grad_(child.weight.requires_grad)
            setattr(module, name, bn)
        else:
            global_batchnorm(child)
    return module


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        num_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.projector = projector_mlp(cfg.width, cfg.proj_hidden, cfg.proj_dim)  # pre-training only
        self.head = nn.Linear(cfg.width, cfg.num_classes)                          # fine-tuning only
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if cfg.moco_init:
            self.moco_v3_init()
        # A near-zero head (released code, MAE-style): with the head frozen it is a fixed random projection
        # that the encoder learns to serve.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def moco_v3_init(self) -> None:
        """MoCo v3's ViT initialisation: xavier-uniform Linears in the blocks with q, k and v each treated
        as its own matrix, zero biases, and a xavier-uniform patch embedding (the projector keeps PyTorch's)."""
        for name, m in self.blocks.named_modules():
            if isinstance(m, nn.Linear):
                fan_out = m.weight.shape[0] // 3 if name.endswith("qkv") else m.weight.shape[0]
                bound = math.sqrt(6.0 / (fan_out + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        conv = self.patch_embed
        bound = math.sqrt(6.0 / (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + conv.out_channels))
        nn.init.uniform_(conv.weight, -bound, bound)
        nn.init.zeros_(conv.bias)

    def features(self, x_t: torch.Tensor, t, norm: bool = True) -> torch.Tensor:
        """h(x_t, t): the class token [B, width] of a model-space input x_t at time t, through the final
        LayerNorm unless norm=False."""
        # A number becomes a filled tensor: a host-to-device copy of it would make the host wait for the GPU.
        t = (t.to(x_t.device, torch.float32).expand(x_t.shape[0]) if torch.is_tensor(t)
             else torch.full((x_t.shape[0],), t, dtype=torch.float32, device=x_t.device))
        x = self.patch_embed(c_in(t)[:, None, None, None] * x_t).flatten(2).transpose(1, 2)
        time_token = timestep_embedding(time_input(t), self.cfg.width)[:, None]
        # The residual stream stays fp32 under autocast, time token included (bf16 would round the embedding of
        # adjacent times t_n, t_{n+1}); each Linear still multiplies in bf16. The released code's torch.cat of
        # the fp16 patches with the fp32 time token gives the same fp32 stream.
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), time_token, x.float()], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0]) if norm else x[:, 0]

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Class logits of a model-space input x_t at time t."""
        return self.head(self.features(x_t, t, self.cfg.classifier_norm))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_counts(self) -> dict[str, int]:
        """Parameters of the encoder (what is fine-tuned and certified), the pre-training projector and the head."""
        parts = {"projector": self.projector, "head": self.head}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        return {"encoder": self.num_params() - sum(counts.values()), **counts}

    def describe(self) -> str:
        c = self.param_counts()
        return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in c.items()) + " parameters"

    def compile_blocks(self) -> None:
        """torch.compile each transformer block in place ("regional compilation"). The blocks share one class and
        their weights are graph inputs, so one compiled block serves every layer of every model in the process:
        compile time does not grow with depth, and DDP's gradient hooks stay outside the graphs. One graph per
        batch shape, grad mode, autocast state and whether the weights require grad (pre-training needs 3, 4 with
        --symmetric; fine-tuning 3), within Dynamo's limit of 8 (bench/README.md, regional compilation)."""
        for block in self.blocks:
            block.compile(dynamic=False)
