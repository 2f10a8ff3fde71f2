"""Schedules, losses and the noise convention against hand-written references."""
import math

import numpy as np
import pytest
import torch

import certify
import kernels
import finetune
import model
import pretrain
import smoothing


@pytest.mark.quick
def test_edm_sigmas_match_karras_formula():
    N = 21
    want = [(80 ** (1 / 7) + i / (N - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(N)]
    got = model.edm_sigmas(N)
    assert np.allclose(got.numpy(), want, rtol=1e-12)
    assert abs(got[0].item() - 80.0) < 1e-9 and abs(got[-1].item() - 0.002) < 1e-12
    assert (got[1:] < got[:-1]).all()


@pytest.mark.quick
def test_num_scales_curriculum():
    K = 300_000
    k_prime = math.ceil(K / np.log2(5))  # ceil(300000 / 2.3219...) = 129203
    assert k_prime == 129203
    expect = {0: 21, 1: 41, k_prime: 41, k_prime + 1: 81, K - 1: 81}
    assert {k: pretrain.num_scales(k, K) for k in expect} == expect


@pytest.mark.quick
def test_finetune_loss_is_eq_12():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10, dtype=torch.float64) * 3
    y = torch.tensor([1, 0, 9, 4])
    eta1, eta2 = 10.0, 0.5
    got, _ = finetune.finetune_loss(logits, y, eta1, eta2)
    L = logits.numpy()
    p = np.exp(L - L.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ce = np.mean([-np.log(p[i, b, y[b]]) for i in range(2) for b in range(4)])
    p_bar = p.mean(0)
    kl = np.mean([np.mean([np.sum(p_bar[b] * np.log(p_bar[b] / p[i, b])) for i in range(2)]) for b in range(4)])
    entropy = np.mean([-np.sum(p_bar[b] * np.log(p_bar[b])) for b in range(4)])
    assert abs(got.item() - (ce + eta1 * kl + eta2 * entropy)) < 1e-6 * 25  # the loss is computed in fp32


class Spy(torch.nn.Module):
    """A 'model' that records what it is fed and always answers class 0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_t, t):
        self.seen.append((x_t.clone(), t))
        return torch.zeros(x_t.shape[0], 10).index_fill_(1, torch.tensor([0]), 1.0)


@pytest.mark.quick
def test_noise_is_added_in_pixel_space_before_normalising():
    """The certified classifier must see normalise(x + sigma eps), i.e. (x + sigma eps - 0.5) / 0.5, at
    t = 2 sigma snapped to the 81-point grid (0.4927 for sigma 0.25). Adding the noise after normalising would
    give (x - 0.5) / 0.5 + sigma eps instead."""
    torch.manual_seed(0)
    x, sigma = torch.rand(3, 4, 4), 0.25
    spy = Spy()
    eps = torch.randn(7, 3, 4, 4)
    smoothing.Smooth(certify.RRCMClassifier(spy, sigma), 10, sigma).decisions(x, eps)  # what certify.py runs
    seen, t = spy.seen[0]
    want = (x[None] + sigma * eps - 0.5) / 0.5
    assert torch.allclose(seen, want) and abs(t - 0.4927) < 1e-4
    assert not torch.allclose(seen, (x[None] - 0.5) / 0.5 + sigma * eps)


@pytest.mark.quick
def test_finetune_noise_uses_the_same_convention():
    x, eps = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, t = model.noisy_input(x, 0.5, eps)
    assert torch.allclose(x_t, 2 * (x + 0.5 * eps) - 1) and abs(t - 0.9654) < 1e-4


def test_finetune_loss_terms_stay_fp32_and_kl_non_negative_under_bf16_autocast():
    """Assumes bf16 autocast on the CPU (emulated where the CPU lacks it). A near-zero head gives two noisy
    copies nearly equal logits: KL(p_bar || p_i) is then ~1e-10 and the rounding of its two sums used to push
    it below 0 in about half the batches ("kl loss is -inf" once multiplied by inf). Every term must come out
    fp32, KL >= 0 (Gibbs' inequality), and CE must match an fp32 reference, not bf16's 3 significant digits."""
    torch.manual_seed(0)
    y = torch.randint(0, 10, (20,))
    for trial in range(100):
        h = torch.randn(2, 20, 192)
        h[1] = h[0] + 1e-3 * torch.randn(20, 192)  # the two noisy copies' features, nearly equal
        head = torch.randn(10, 192) * 2e-5 * (1 + trial % 5)  # the released near-zero head
        with torch.autocast("cpu", torch.bfloat16):
            logits = torch.nn.functional.linear(h, head)
            _, parts = finetune.finetune_loss(logits, y, 10.0, 0.5)
        assert logits.dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in parts.values())
        assert parts["kl"].item() >= 0 and parts["entropy"].item() >= 0, (trial, parts)
        want = torch.nn.functional.cross_entropy(logits.float().reshape(40, 10), y.repeat(2))
        assert abs(parts["ce"].item() - want.item()) < 1e-6 * want.item(), (parts["ce"].item(), want.item())


def test_info_nce_torch_path_sums_in_fp32_under_cpu_autocast(torch_kernels):
    """Under CPU bf16 autocast the PyTorch InfoNCE must compute as the fused kernel does: products of the given
    (bf16) values summed in fp32, the log-sum-exp in fp32. Autocast would otherwise round the logits to bf16, an
    error of about 1e-2 at tau 0.2 (the logged losses were bf16 numbers such as 2.9062)."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(256, 64, generator=g), dim=1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(256, 64, generator=g), dim=1).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        got = kernels.info_nce(q, k, 0.2)
    logits = q.double() @ k.double().T / 0.2  # float64 from the same bf16 values: the exact answer
    want = torch.logsumexp(logits, 1) - logits.diagonal()
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 1e-5
