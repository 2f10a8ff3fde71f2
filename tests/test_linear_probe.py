"""Linear probing: the head, the inputs it is evaluated on, and the script end to end."""
from types import SimpleNamespace

import pytest
import torch

import linear_probe
import pretrain
from data import Images, seeded_noise
from model import SIGMA_MIN


def test_head_separates_separable_features():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 3
    labels = torch.arange(4).repeat(50)
    feats = centres[labels] + 0.3 * torch.randn(200, 16)
    head = linear_probe.train_head(feats, labels, 4, epochs=20, batch=32, lr=1e-2, seed=0)
    assert (head(feats).argmax(1) == labels).float().mean() == 1.0


class Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def features(self, x_t, t, norm=True):
        self.seen.append((x_t, t, norm))
        return x_t.flatten(1)[:, :4]


def test_probe_inputs_clean_at_sigma_min_and_noisy_at_the_smoothing_time(cifar_dir):
    test = Images("cifar10", cifar_dir, "test", torch.device("cpu"))
    spy = Spy()
    linear_probe.representations(spy, test, 5, 0.0, 0, 5, False)
    linear_probe.representations(spy, test, 5, 0.5, 0, 5, False)
    (clean, t0, _), (noisy, t1, _) = spy.seen
    x, _ = test.batch(torch.arange(5))
    assert t0 == SIGMA_MIN and torch.equal(clean, 2 * x - 1)
    residual = (noisy - (2 * x - 1)) / (2 * 0.5)  # must be standard normal noise
    assert abs(t1 - 0.9654) < 1e-4 and abs(residual.std().item() - 1) < 0.1  # 2 sigma snapped to the 81-point grid


def test_linear_probe_script(cifar_dir, tmp_path, capsys):
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "2", "--preset", "tiny", "--batch", "20",
                   "--no-compile", "--kernels", "torch", "--precision", "fp32"])
    capsys.readouterr()
    linear_probe.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--data-dir", cifar_dir, "--epochs", "50",
                       "--batch", "20", "--lr", "1e-2", "--kernels", "torch"])
    lines = capsys.readouterr().out.splitlines()
    # It speaks before the long encoding starts, then reports progress of every pass with an ETA.
    assert lines[0].startswith("linear probe of") and "60 clean training images" in lines[0]
    encoding = [line for line in lines if line.startswith("encoding")]
    assert encoding[0].startswith("encoding clean training images: 60 / 60 images") and "ETA" in encoding[0]
    # the training set, then the test set at sigma 0, at t_0 = 0.002 (sigma 0.001), 0.25, 0.5, 1.0, at t_N = 80 (40)
    assert [line.split(":")[0] for line in encoding[1:]] == [f"encoding test images, sigma {s}" for s in
                                                             ("0", "0.001", "0.25", "0.5", "1", "40")]
    header = next(line for line in lines if line.startswith("checkpoint"))
    assert header.split()[1:] == ["0.00", "0.25", "0.50", "1.00", "t_N,", "t_0", "0.25", "0.50", "1.00"]
    row = lines[lines.index(header) + 1].split()
    accuracies, rfd, to_clean = [float(a) for a in row[1:5]], float(row[5]), [float(d) for d in row[6:]]
    assert accuracies[0] >= 50  # solid-colour classes, 10% is chance
    assert len(to_clean) == 3 and all(d >= 0 for d in to_clean) and rfd > to_clean[0]  # pure noise is further than 0.25


@pytest.mark.quick
def test_the_plot_draws_each_checkpoint_with_its_rfd_up_to_the_next_tenth(tmp_path, stand_in_matplotlib):
    """One line a checkpoint, named by its run's folder with its RFD; the axis ends at the next ten points above
    the highest accuracy (nine arms at 10-35 % crowded into the bottom third of a 0-100 axis)."""
    rows = [("out/rrcm/ckpt.pt", [35.3, 25.3, 18.3, 13.3], 22.378, None), ("out/T1/ckpt.pt", [35.2, 26.4, 18.5, 13.0], 21.9, None)]
    linear_probe.plot(rows, [0.0, 0.25, 0.5, 1.0], str(tmp_path / "p.png"))
    assert [(x, y, label) for x, y, _, label in stand_in_matplotlib.lines] == [
        ([0.0, 0.25, 0.5, 1.0], [35.3, 25.3, 18.3, 13.3], "rrcm (RFD 22.4)"), ([0.0, 0.25, 0.5, 1.0], [35.2, 26.4, 18.5, 13.0], "T1 (RFD 21.9)")]
    assert stand_in_matplotlib.axes["ylim"] == pytest.approx((0, 40)) and stand_in_matplotlib.saved == [str(tmp_path / "p.png")]


class Toy(torch.nn.Module):
    """h(x_t, t) = one pixel of x_t scaled by 1 / (1 + t): one feature, so the Frechet distance has a closed form."""
    cfg = SimpleNamespace(num_classes=10)

    def features(self, x_t, t, norm=True):
        t = torch.as_tensor(t, dtype=torch.float32).expand(len(x_t))
        return x_t[:, 0, 3, 5:6] / (1 + t[:, None])


@pytest.mark.quick
def test_rfd_is_app_e_between_the_trajectory_ends_for_every_model(cifar_dir, monkeypatch, torch_kernels):
    """RFD = FD(h(x_{t_N}, t_N), h(x_{t_0}, t_0)) with t_N = 80, t_0 = 0.002 on the same eps, whatever T the model
    trained with (the T = 1 ablation too), against the one-dimensional closed form (mu_a - mu_b)^2 + (s_a - s_b)^2
    computed by hand from the test images and the probe's noise."""
    for sigma_max in (80.0, 1.0):
        monkeypatch.setattr(linear_probe, "load_checkpoint", lambda path, kind: {"config": {"dataset": "cifar10", "sigma_max": sigma_max}, "step": 0})
        monkeypatch.setattr(linear_probe, "model_from_checkpoint", lambda ckpt: Toy())
        args = linear_probe.parse_args(["--data-dir", cifar_dir, "--epochs", "1", "--sigmas", "0,0.5", "--kernels", "torch"])
        _, rfd, _ = linear_probe.probe("toy", args, torch.device("cpu"))
        x, _ = Images("cifar10", cifar_dir, "test", torch.device("cpu")).batch(torch.arange(20))
        eps = seeded_noise(x.shape[1:], torch.arange(20), torch.device("cpu"), 0, "probe")
        ends = [((2 * x - 1 + t * eps)[:, 0, 3, 5] / (1 + t)).double() for t in (80.0, 0.002)]
        want = (ends[0].mean() - ends[1].mean()) ** 2 + (ends[0].std() - ends[1].std()) ** 2
        assert abs(rfd - want.item()) < 1e-5 * want.item(), (rfd, want.item())


@pytest.mark.quick
def test_frechet_distance_is_the_closed_form_for_gaussians():
    """For diagonal covariances (which commute) the Frechet distance is sum (mu_a - mu_b)^2 + (s_a - s_b)^2 per
    dimension; checked on features whose sample means and covariances are exactly known."""
    torch.manual_seed(0)
    z = torch.randn(4000, 3, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)  # standardised: sample mean 0, sample variance 1 in every dimension
    z = torch.linalg.qr(z)[0] * (len(z) - 1) ** 0.5  # orthonormal columns: sample covariance exactly the identity
    scale_a, scale_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    a = z * scale_a + torch.tensor([1.0, 0.0, -1.0])
    b = z * scale_b
    want = float(((torch.tensor([1.0, 0.0, -1.0])) ** 2).sum() + ((scale_a - scale_b) ** 2).sum())
    assert abs(linear_probe.frechet_distance(a, b) - want) < 1e-9 and abs(linear_probe.frechet_distance(a, a)) < 1e-9
