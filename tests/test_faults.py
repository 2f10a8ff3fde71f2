"""torchrun on CPU (gloo, 2 processes), resuming after a kill, non-finite losses, and wrong use."""
import subprocess
import sys

import pytest
import torch
from scipy.stats import norm

import certify
import finetune
import pretrain
from conftest import FAST, ROOT, finetune_args
from model import load_checkpoint, save_checkpoint

def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--", *argv, *FAST]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_two_process_pretrain_and_finetune(cifar_dir, tmp_path):
    result = torchrun("pretrain.py", "--data-dir", cifar_dir, "--out", str(tmp_path / "pre"), "--preset", "tiny",
                      "--steps", "2", "--batch", "20", "--warmup", "1", "--log-every", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("step 2 |") == 1  # only rank 0 logs
    assert load_checkpoint(str(tmp_path / "pre" / "ckpt.pt"), "pretrain")["step"] == 2
    result = torchrun("finetune.py", "--init", str(tmp_path / "pre" / "ckpt.pt"), "--data-dir", cifar_dir,
                      "--out", str(tmp_path / "ft"), "--epochs", "1", "--warmup-epochs", "0", "--batch", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("epoch 1 | clean acc") == 1


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(cifar_dir, tmp_path, monkeypatch):
    real, calls = pretrain.consistency_loss, []

    def nan_at_step_2(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(pretrain, "consistency_loss", nan_at_step_2)
    argv = ["--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "5", "--preset", "tiny", "--batch", "20",
            "--warmup", "1", "--save-every", "1", *FAST]
    with pytest.raises(SystemExit, match="consistency loss is nan at step 2"):
        pretrain.main(argv)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"), "pretrain")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resumed_finetuning_matches_an_uninterrupted_run(cifar_dir, tmp_path, monkeypatch):
    finetune.main(finetune_args(cifar_dir, tmp_path / "full", "--save-every", "1"))
    full = load_checkpoint(str(tmp_path / "full" / "ckpt.pt"), "finetune")
    real_step, calls = torch.optim.AdamW.step, []

    def crash_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune_args(cifar_dir, tmp_path / "cut", "--save-every", "1"))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    finetune.main(finetune_args(cifar_dir, tmp_path / "cut", "--save-every", "1", "--resume"))
    resumed = load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"), "finetune")
    assert resumed["step"] == full["step"] == 3
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


def run_script(*argv):
    return subprocess.run([sys.executable, *argv, *FAST], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_resume_with_another_preset_is_refused(cifar_dir, tmp_path):
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "1", "--preset", "tiny", "--batch", "20", *FAST])
    before = (tmp_path / "ckpt.pt").read_bytes()
    result = run_script("pretrain.py", "--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "1", "--preset", "S",
                        "--batch", "20", "--resume")
    assert result.returncode != 0 and "made with different --preset" in result.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_checkpoint_of_another_dataset_is_refused(cifar_dir, tmp_path):
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "1", "--preset", "tiny", "--batch", "20", *FAST])
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"), "pretrain")
    ckpt["config"]["dataset"] = "imagenet"
    save_checkpoint(str(tmp_path / "imagenet.pt"), ckpt)
    result = run_script("finetune.py", "--init", str(tmp_path / "imagenet.pt"), "--data-dir", cifar_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "pre-trained on imagenet, not --dataset cifar10" in lines[0]


@pytest.mark.parametrize("argv", [["pretrain.py", "--batch", "0"], ["certify.py", "--batch", "0"], ["certify.py", "--batch", "150"],
                                  ["pretrain.py", "--steps", "-3"], ["certify.py", "--alpha", "0"]])
def test_more_bad_flags(argv):
    result = run_script(*argv)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and "error:" in result.stderr


def test_nonfinite_finetune_loss_names_the_term(cifar_dir, tmp_path, monkeypatch):
    real = finetune.finetune_loss

    def nan_kl(*args):
        loss, parts = real(*args)
        parts["kl"] = parts["kl"] * float("inf")
        return loss + parts["kl"], parts

    monkeypatch.setattr(finetune, "finetune_loss", nan_kl)
    with pytest.raises(SystemExit, match="kl loss is inf at step 0"):
        finetune.main(finetune_args(cifar_dir, tmp_path))
    assert not (tmp_path / "ckpt.pt").exists()


