"""The classical comparators of the paper's Tables 1 and 2 as fine-tuning objectives of finetune.py, on the same
ViT, data, noise streams and run machinery as rRCM (`finetune.py --objective smoothadv | macer | smoothmix`).

- SmoothAdv (Salman et al. 2019): train on adversarial examples of the soft smoothed classifier.
- MACER (Zhai et al. 2020): the soft smoothed classifier's cross-entropy plus a hinge on its certified radius.
- SmoothMix (Jeong et al. 2021): mixup between adversarial examples of the soft smoothed classifier and their
  clean points, towards a target that grows less confident along the way.
Gaussian (Cohen et al. 2019) and Consistency (Jeong & Shin 2020) are Eq. (12) with eta1 = eta2 = 0 and with the
recipe's etas (finetune.py); Boosting (Horvath et al. 2021) is an ensemble certified as one base classifier
(certify.py --checkpoint A B C).

All three start from the soft smoothed classifier G(x) = E_eps softmax f(x + sigma eps), estimated with m noise
draws eps_1..m. Images are in pixel space [0, 1], where the noise, the attacks' norms and certified radii are
measured (model.noisy_input); the network is told the time t of sigma, as in rRCM's fine-tuning and certification.
An attack runs on the bare `model` (it needs gradients with respect to its input only, and no gradient sync between
processes); the training forward goes through `net` (DistributedDataParallel under torchrun). Every loss is a mean
over the images, so finetune.py's micro-batches and processes take these objectives as they take Eq. (12).

Defaults are each paper's settings for the dataset and the nearest sigma of 0.25 / 0.5 / 1.0 (DEFAULTS; where each
value comes from is said there and in docs/comparators.md); each one has a flag.
"""
import math

import torch
import torch.nn.functional as F

from jobs import at_least, non_negative, positive
from model import to_model_space

OBJECTIVES = ("rrcm", "smoothadv", "macer", "smoothmix")
COMPARATORS = OBJECTIVES[1:]


# ----------------------------------------------------------------------------------------------------
# The soft smoothed classifier, estimated from m noise draws

def smoothed_log_prob(model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, sigma: float, t: float) -> torch.Tensor:
    """log G(x) [B, C] from the m noise draws eps [m, B, ...]: log (1/m) sum_i softmax f(x + sigma eps_i), as a
    logsumexp of the log-softmaxes, in fp32 (the released codes clamp the mean at 1e-20 or add 1e-10 before the log:
    the same to those amounts)."""
    m = len(eps)
    logits = model(to_model_space((x[None] + sigma * eps).flatten(0, 1)), t).float().view(m, len(x), -1)
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(m)


def normalised(grad: torch.Tensor) -> torch.Tensor:
    """Each image's gradient scaled to L2 norm 1 (a zero gradient stays zero; SmoothMix's code adds 1e-8 likewise,
    SmoothAdv's takes a random direction there: neither happens with real images)."""
    return grad / (grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1)))


def within(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """delta with each image's part scaled into the L2 ball of `radius` (torch.renorm, as both released attacks)."""
    return delta.renorm(p=2, dim=0, maxnorm=radius)


# ----------------------------------------------------------------------------------------------------
# SmoothAdv (Salman et al. 2019, Sec. 3)

def smoothadv_attack(model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, sigma: float, t: float,
                     epsilon: float, steps: int) -> torch.Tensor:
    """SmoothAdv_PGD: x_hat = argmax_{||x' - x||_2 <= epsilon} -log G(x')_y, the m draws eps fixed during the attack,
    by `steps` steps of 2 epsilon / steps along the normalised gradient from x, each kept in [0, 1] and in the
    epsilon-ball (released code/attacks.py, PGD_L2._attack_mutlinoise: delta from zero, SGD lr 2 eps / T, clamp,
    renorm). Returns x_hat, detached."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = -smoothed_log_prob(model, x + delta, eps, sigma, t).gather(1, y[:, None]).sum()  # per-image grads
        grad, = torch.autograd.grad(loss, [delta])
        with torch.no_grad():
            moved = (x + delta + 2 * epsilon / steps * normalised(grad)).clamp(0, 1) - x
            delta = within(moved, epsilon).requires_grad_()
    return (x + delta).detach()


def smoothadv_loss(net: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor,
                   sigma: float, t: float, epsilon: float, steps: int) -> tuple[torch.Tensor, dict]:
    """SmoothAdv's training loss: mean_i CE(f(x_hat + sigma eps_i), y) over the same m draws the attack used
    (released train_pgd.py --train-multi-noise). epsilon: this epoch's, after its warm-up."""
    x_hat = smoothadv_attack(model, x, eps, y, sigma, t, epsilon, steps)
    m = len(eps)
    logits = net(to_model_space((x_hat[None] + sigma * eps).flatten(0, 1)), t).float()
    ce = F.cross_entropy(logits, y.repeat(m))
    return ce, dict(ce=ce.detach(), perturbation=(x_hat - x).flatten(1).norm(dim=1).mean())


# ----------------------------------------------------------------------------------------------------
# MACER (Zhai et al. 2020, Sec. 4)

def macer_radius_term(logits: torch.Tensor, y: torch.Tensor, sigma: float, beta: float, gamma: float) -> torch.Tensor:
    """Per image [B]: sigma / 2 * max(0, gamma - (Phi^-1(pA) - Phi^-1(pB))) where the soft smoothed classifier at
    inverse temperature beta, pbar = mean_i softmax(beta f(x + sigma eps_i)), ranks y first (pA, pB its top two),
    else 0; images whose margin is not finite or above gamma give 0 too (released macer.py). logits: [m, B, C]."""
    p = F.softmax(beta * logits.float(), dim=-1).mean(0)
    top2, classes = p.topk(2, dim=-1)
    with torch.no_grad():
        margin = torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1])
        hinged = (classes[:, 0] == y) & margin.isfinite() & (margin <= gamma)
    # Phi^-1 is evaluated only where it is finite: its infinite gradient at p = 1 would make 0 * inf = NaN
    p_a, p_b = torch.where(hinged, top2[:, 0], 0.75), torch.where(hinged, top2[:, 1], 0.25)
    margin = torch.special.ndtri(p_a) - torch.special.ndtri(p_b)
    return torch.where(hinged, sigma / 2 * (gamma - margin), 0.0)


def macer_loss(logits: torch.Tensor, y: torch.Tensor, sigma: float, lbd: float, beta: float,
               gamma: float) -> tuple[torch.Tensor, dict]:
    """MACER's loss l_C + lambda l_R, both per image then averaged: l_C = -log pbar_y of the soft smoothed
    classifier (temperature 1), l_R the hinge on its certified radius (`macer_radius_term`). logits: [m, B, C]."""
    m = len(logits)
    ce = -(torch.logsumexp(F.log_softmax(logits.float(), dim=-1), dim=0) - math.log(m)).gather(1, y[:, None]).squeeze(1)
    radius = macer_radius_term(logits, y, sigma, beta, gamma)
    return (ce + lbd * radius).mean(), dict(ce=ce.mean().detach(), radius=radius.mean().detach())


# ----------------------------------------------------------------------------------------------------
# SmoothMix (Jeong et al. 2021, Sec. 3)

def smoothmix_attack(model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, sigma: float, t: float,
                     alpha: float, steps: int, mix_step: int, mix_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_start, x_adv): `steps` unprojected steps of size alpha along the normalised gradient of -log G(x')_y from
    x, each clamped to [0, 1] (released code/train.py SmoothMix_PGD: maxnorm None); x_start, the clean end of the
    mix, is x (mix_step 0) or the one-step adversary (mix_step 1) projected into the ball of mix_norm. Detached."""
    adv, start = x.detach(), x.detach()
    for k in range(steps):
        if k == mix_step:
            start = adv
        adv = adv.clone().requires_grad_()
        loss = -smoothed_log_prob(model, adv, eps, sigma, t).gather(1, y[:, None]).sum()
        grad, = torch.autograd.grad(loss, [adv])
        adv = (adv + alpha * normalised(grad)).clamp(0, 1).detach()
    start = (x + within(start - x, mix_norm)).clamp(0, 1)
    return start.detach(), adv


def smoothmix_loss(net: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor,
                   u: torch.Tensor, sigma: float, t: float, alpha: float, steps: int, eta: float, mix_step: int,
                   warm: float) -> tuple[torch.Tensor, dict]:
    """SmoothMix: mean_i CE(f(x_start + sigma eps_i), y) + eta * w * mean_i 1[argmax pbar = y] KL(target || softmax
    f(x_mix + sigma eps_i)), with x_mix = (1 - lam) x_start + lam x_adv, lam = u / 2 ~ U(0, 1/2) per image,
    target = (1 - lam) pbar + lam / C, pbar = mean_i softmax f(x_start + sigma eps_i) (not detached, as released),
    and w = warm, the warm-up factor (which also scales the one-step adversary's ball, alpha * mix_step * w).
    x_start is x itself with mix_step 0; with 1 the released code trains the "clean" branch on it too."""
    x_start, x_adv = smoothmix_attack(model, x, eps, y, sigma, t, alpha, steps, mix_step, alpha * mix_step * warm)
    lam = (u / 2).view(-1, *[1] * (x.dim() - 1))
    x_mix = (1 - lam) * x_start + lam * x_adv
    m, B = len(eps), len(x)
    both = torch.stack([x_start, x_mix])[:, None] + sigma * eps[None]  # [2, m, B, ...]: one forward for both
    logits = net(to_model_space(both.flatten(0, 2)), t).float().view(2, m, B, -1)
    ce = F.cross_entropy(logits[0].flatten(0, 1), y.repeat(m))
    p_bar = F.softmax(logits[0], dim=-1).mean(0)
    lam = lam.view(B, 1)
    target = (1 - lam) * p_bar + lam / logits.shape[-1]
    kl = (torch.special.xlogy(target, target) - target * F.log_softmax(logits[1], dim=-1)).sum(-1)  # [m, B]
    correct = (p_bar.argmax(-1) == y).float()
    mix = (correct * kl).mean()
    return ce + eta * warm * mix, dict(ce=ce.detach(), mix=mix.detach())


# ----------------------------------------------------------------------------------------------------
# Settings: each paper's, per dataset and sigma, and the step of finetune.py's loop

# Where each value comes from (docs/comparators.md has the table):
# SmoothAdv, CIFAR-10: PGD, T = 10, the same m noise draws in attack and training (--train-multi-noise), epsilon
#   warmed up over 10 epochs (the README's and jobs.yaml's train_pgd.py commands: --num-steps 10 --warmup 10).
#   sigma 0.25: epsilon 1.0 (255/256 in the released code's units), m = 4, the SmoothAdv setting of
#   jh-jeong/smoothmix's SmoothAdv + Consistency run there (data/certify/cifar10/consistency/salman_255.0_10_10/num_4).
#   sigma 0.5 and 1.0: epsilon 2.0 (512/256), m = 2, as the same repository's runs at those sigmas
#   (salman_512.0_10_10/num_2/.../noise_0.50, noise_1.00) and the released best models at the radii those sigmas
#   win (analysis/radii_to_best_models/cifar10_ours: PGD_10steps, 2-multitrain, eps_512 at sigma 0.5 and 1.0).
#   The paper's tables take the best of a grid (epsilon 0.25-2, T 2-10, m 1-8); these are points of it.
# SmoothAdv, ImageNet: PGD, T = 1, m = 1, no warm-up, epsilon 1.0 at sigma 0.25 and 0.5, 2.0 at 1.0 (the released
#   best ImageNet models: imagenet_ours lists PGD_1step/eps_255 at sigma 0.25 and 0.5, eps_512 at 1.0).
# MACER, CIFAR-10: k = m = 16, beta 16, gamma 8 (released main.py defaults), lambda 12 at sigma 0.25 and 0.5, 4 at
#   1.0 (the paper's Sec. 4 text as recalled; no copy of it found, main.py's default is 12; docs/comparators.md
#   lists what was searched).
# MACER, ImageNet: m = 2, beta 16, gamma 8, lambda 6 at sigma 0.25 (as the MACER README of mingyangyi/Lip trains
#   it: --lbd 6 --gauss_num 2, lr 0.1, 120 epochs), 6 / 3 at 0.5 / 1.0 (the paper's text as recalled, unchecked).
# SmoothMix, CIFAR-10: m = 2, T = 4, alpha 0.5 / 1.0 / 2.0 at sigma 0.25 / 0.5 / 1.0, eta 5, mix_step 0, warm-up 10
#   epochs (EXPERIMENTS.MD "Ours: SmoothMix (CIFAR-10)", train.py --warmup default).
# SmoothMix, ImageNet: m = 1, T = 1, alpha 8 sigma, eta 1 (paper's App. as recalled, unchecked), mix_step 0, warm-up 10.
DEFAULTS = {
    "smoothadv": {"cifar10": {s: dict(noise_samples=m, attack_steps=10, epsilon=eps, adv_warmup_epochs=10)
                              for s, eps, m in ((0.25, 1.0, 4), (0.5, 2.0, 2), (1.0, 2.0, 2))},
                  "imagenet": {s: dict(noise_samples=1, attack_steps=1, epsilon=eps, adv_warmup_epochs=1)
                               for s, eps in ((0.25, 1.0), (0.5, 1.0), (1.0, 2.0))}},
    "macer": {"cifar10": {s: dict(noise_samples=16, macer_lambda=lbd, macer_beta=16.0, macer_gamma=8.0)
                          for s, lbd in ((0.25, 12.0), (0.5, 12.0), (1.0, 4.0))},
              "imagenet": {s: dict(noise_samples=2, macer_lambda=lbd, macer_beta=16.0, macer_gamma=8.0)
                           for s, lbd in ((0.25, 6.0), (0.5, 6.0), (1.0, 3.0))}},
    "smoothmix": {"cifar10": {s: dict(noise_samples=2, attack_steps=4, attack_step_size=a, smoothmix_eta=5.0, mix_step=0,
                                      adv_warmup_epochs=10) for s, a in ((0.25, 0.5), (0.5, 1.0), (1.0, 2.0))},
                  "imagenet": {s: dict(noise_samples=1, attack_steps=1, attack_step_size=8 * s, smoothmix_eta=1.0, mix_step=0,
                                       adv_warmup_epochs=10) for s in (0.25, 0.5, 1.0)}},
}
SETTINGS = ("noise_samples", "attack_steps", "epsilon", "attack_step_size", "adv_warmup_epochs", "macer_lambda",
            "macer_beta", "macer_gamma", "smoothmix_eta", "mix_step")


def add_flags(p) -> None:
    """--objective and the comparators' settings (unset: DEFAULTS for the dataset and the nearest sigma)."""
    g = p.add_argument_group("objective: rRCM's Eq. (12), or a classical comparator (comparators.py; unset: its paper's "
                             "settings for --dataset at the nearest of sigma 0.25 / 0.5 / 1.0)")
    g.add_argument("--objective", default="rrcm", choices=OBJECTIVES, help="rrcm: Eq. (12) (Gaussian and Consistency "
                   "through --eta1/--eta2); smoothadv (Salman et al. 2019), macer (Zhai et al. 2020), smoothmix (Jeong et al. 2021)")
    g.add_argument("--noise-samples", type=at_least(1), default=None, help="m noise draws per image: smoothadv 4 (imagenet 1), "
                   "macer 16 (2), smoothmix 2 (1)")
    g.add_argument("--attack-steps", type=at_least(1), default=None, help="attack steps T: smoothadv 10 (imagenet 1), smoothmix 4 (1)")
    g.add_argument("--epsilon", type=positive, default=None, help="smoothadv: L2 radius of the attack, pixel space: 1.0 (step 2 epsilon / T)")
    g.add_argument("--attack-step-size", type=positive, default=None, help="smoothmix: alpha, L2 per step, pixel space: 0.5 / 1.0 / 2.0 "
                   "at sigma 0.25 / 0.5 / 1.0 (imagenet 8 sigma)")
    g.add_argument("--adv-warmup-epochs", type=at_least(1), default=None, help="smoothadv: epsilon grows linearly to its value over "
                   "these epochs (10; imagenet 1: none); smoothmix: eta likewise (10)")
    g.add_argument("--macer-lambda", type=non_negative, default=None, help="macer: weight of the radius term: 12 / 12 / 4 (imagenet 6 / 6 / 3)")
    g.add_argument("--macer-beta", type=positive, default=None, help="macer: inverse temperature of the radius term's softmax: 16")
    g.add_argument("--macer-gamma", type=positive, default=None, help="macer: hinge margin gamma: 8")
    g.add_argument("--smoothmix-eta", type=non_negative, default=None, help="smoothmix: weight of the mixup term: 5 (imagenet 1)")
    g.add_argument("--mix-step", type=int, choices=(0, 1), default=None, help="smoothmix: the clean end of the mix: 0 the clean "
                   "image, 1 the one-step adversary")


def resolve(args, error) -> None:
    """Fill the objective's unset settings from DEFAULTS; refuse, through `error` (one line), a setting of another
    objective and what a comparator does not do (Eq. 12's etas, mixup / cutmix / label smoothing)."""
    given = [k for k in SETTINGS if getattr(args, k) is not None]
    if args.objective == "rrcm":
        if given:
            error(f"--{given[0].replace('_', '-')} goes with a comparator's --objective, not rrcm")
        return
    if args.eta1 is not None or args.eta2 is not None:
        error(f"--eta1 / --eta2 weight Eq. (12)'s terms; --objective {args.objective} has its own loss")
    if args.mixup or args.cutmix or args.label_smoothing:
        error(f"--objective {args.objective} trains on its paper's inputs: no --mixup, --cutmix or --label-smoothing")
    listed = DEFAULTS[args.objective][args.dataset]
    own = listed[min(listed, key=lambda s: abs(math.log(s / args.sigma)))]
    foreign = [k for k in given if k not in own]
    if foreign:
        error(f"--{foreign[0].replace('_', '-')} is not a setting of --objective {args.objective}")
    for key, value in own.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.objective == "smoothmix" and args.mix_step >= args.attack_steps:
        error(f"--mix-step {args.mix_step} needs more than {args.mix_step} --attack-steps (the one-step adversary is step 1)")


def run_keys(args) -> tuple:
    """The settings a resumed run must share (none beyond finetune.py's for rrcm, so its older checkpoints resume)."""
    return () if args.objective == "rrcm" else ("objective",) + tuple(k for k in SETTINGS if getattr(args, k) is not None)


def passes(args) -> tuple[float, int]:
    """(forward-equivalents per image and step, encoder passes with gradient whose activations coexist). A backward
    costs 2 forwards, an attack step's backward to the input alone about 1."""
    m = args.noise_samples
    if args.objective == "smoothadv":
        return 2 * args.attack_steps * m + 3 * m, m
    if args.objective == "macer":
        return 3 * m, m
    return 2 * args.attack_steps * m + 3 * 2 * m, 2 * m  # smoothmix: clean and mixed copies in one forward


def batch_loss(args, net: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, y: torch.Tensor,
               u: torch.Tensor, t: float, epoch: int) -> tuple[torch.Tensor, dict]:
    """The comparator's loss on images x [B, ...] (pixel space) with their m noise draws eps [m, B, ...] and one
    uniform u [B] each, at epoch `epoch` (0-based) of the warm-ups."""
    warm = min(1.0, (epoch + 1) / args.adv_warmup_epochs) if args.adv_warmup_epochs else 1.0
    if args.objective == "smoothadv":  # released train_pgd.py: max_norm = min(eps, (epoch + 1) eps / warmup)
        return smoothadv_loss(net, model, x, eps, y, args.sigma, t, args.epsilon * warm, args.attack_steps)
    if args.objective == "macer":
        m = len(eps)
        logits = net(to_model_space((x[None] + args.sigma * eps).flatten(0, 1)), t).view(m, len(x), -1)
        return macer_loss(logits, y, args.sigma, args.macer_lambda, args.macer_beta, args.macer_gamma)
    return smoothmix_loss(net, model, x, eps, y, u, args.sigma, t, args.attack_step_size, args.attack_steps,
                          args.smoothmix_eta, args.mix_step, warm)
