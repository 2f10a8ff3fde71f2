"""Linear probing: the head, the inputs it is evaluated on, and the script end to end."""
import torch

import linear_probe
import pretrain
from data import Images
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
    assert len(encoding) == 6  # the training set, then the test set at sigma 0, 0.25, 0.5, 1.0 and at T (40)
    header = next(line for line in lines if line.startswith("checkpoint"))
    assert header.split()[1:5] == ["0.00", "0.25", "0.50", "1.00"] and header.split()[5:8] == ["0.25", "0.50", "1.00"]
    row = lines[lines.index(header) + 1].split()
    accuracies, rfd = [float(a) for a in row[1:5]], [float(d) for d in row[5:]]
    assert len(accuracies) == 4 and accuracies[0] >= 50  # solid-colour classes, 10% is chance
    assert len(rfd) == 4 and all(d >= 0 for d in rfd) and rfd[-1] > rfd[0]  # pure noise is further than sigma 0.25


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
