"""certify.py as a user runs it: resume after a kill, two processes, one writer, refusing to mix results."""
import pytest
from scipy.stats import norm

import certify
from conftest import FAST
from test_faults import torchrun


def rows_without_time(path) -> list:
    return [line.split("\t")[:5] for line in open(path).read().splitlines()]


def certify_args(ckpt, cifar_dir, out, *extra):
    return ["--checkpoint", ckpt, "--data-dir", cifar_dir, "--out", str(out), "--n", "300", "--n0", "100",
            "--num", "5", "--skip", "3", "--batch", "200", *extra]


def test_two_process_certify_equals_one_process(finetuned, cifar_dir, tmp_path):
    certify.main(certify_args(finetuned, cifar_dir, tmp_path / "one.tsv", *FAST))
    result = torchrun("certify.py", *certify_args(finetuned, cifar_dir, tmp_path / "two.tsv"))
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = rows_without_time(tmp_path / "one.tsv"), rows_without_time(tmp_path / "two.tsv")
    assert len(one) == 6 and one == two  # header + 5 images, same order, predictions and radii


def test_certify_resumes_after_a_kill_without_duplicates(finetuned, cifar_dir, tmp_path):
    full = tmp_path / "full.tsv"
    certify.main(certify_args(finetuned, cifar_dir, full, *FAST))
    cut = tmp_path / "cut.tsv"
    certify.main(certify_args(finetuned, cifar_dir, cut, *FAST))
    lines = cut.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:3]) + lines[3][:7])  # killed while writing the third image's line
    certify.main(certify_args(finetuned, cifar_dir, cut, *FAST))
    assert rows_without_time(cut) == rows_without_time(full)


def test_certify_refuses_to_mix_configurations(finetuned, cifar_dir, tmp_path):
    out = tmp_path / "c.tsv"
    certify.main(certify_args(finetuned, cifar_dir, out, *FAST))
    before = out.read_text()
    with pytest.raises(Exception, match="different configuration"):
        certify.main(certify_args(finetuned, cifar_dir, out, "--alpha", "0.01", *FAST))
    assert out.read_text() == before


def test_certify_at_another_sigma_than_fine_tuned(finetuned, cifar_dir, tmp_path, capsys, monkeypatch):
    """Paper Table 9: a model fine-tuned at sigma 0.25 certified with sigma 0.5 noise, seen at t = 1.0."""
    seen_t = []
    real = certify.predict_noisy
    monkeypatch.setattr(certify, "predict_noisy", lambda model, x, eps, sigma: seen_t.append(sigma) or real(model, x, eps, sigma))
    out = tmp_path / "c.tsv"
    certify.main(certify_args(finetuned, cifar_dir, out, "--sigma", "0.5", *FAST))
    assert "sigma 0.5 (fine-tuned at 0.25)" in capsys.readouterr().out and set(seen_t) == {0.5}
    largest = 0.5 * norm.ppf(0.001 ** (1 / 300))  # every one of the n = 300 samples correct
    radii = [float(line.split("\t")[3]) for line in out.read_text().splitlines()[1:]]
    assert len(radii) == 5 and max(radii) <= largest + 1e-4
