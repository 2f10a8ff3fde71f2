"""torchrun on CPU (gloo, 2 processes), stopping on SIGINT/SIGTERM and resuming, non-finite losses, and wrong use."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import finetune
import pretrain
from conftest import FAST, ROOT, finetune_args, refusal, torchrun_runs, update_difference
from jobs import load_checkpoint, save_checkpoint


def same_weights(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol) for k in a)


# The two runs differ only in summation order, so in fp32 their updates agree to float rounding. In bf16 each rank
# rounds its half of a weight gradient to bf16 before the all-reduce where one process rounds the whole sum once,
# and Adam's first steps (update ~ lr * sign(g)) amplify that for small g: there the claim holds to about 1 % of
# the update (0.04 % after pre-training, 0.27 % after fine-tuning, measured on the tiny preset), which
# tests/test_gpu_path.py checks on the GPU's default path (bf16, compiled, the Triton kernels).
UPDATE_TOLERANCE = 1e-4


def test_two_processes_train_like_one(cifar_dir, tmp_path):
    """Gradients averaged over ranks, InfoNCE negatives gathered from both, the projector's BatchNorm over the
    global batch: a 2-process run equals a 1-process run with the same --shards (to float rounding), whole or in
    micro-batches of 3 of each rank's 10 images (3, 3, 3, 1) with the gradients averaged by hand; fine-tuning too.
    (tests/test_cluster.py checks the same equality after a rank is killed and restarted.)"""
    pre = ["--data-dir", cifar_dir, "--preset", "tiny", "--steps", "2", "--batch", "20", "--warmup", "1", "--log-every", "1", *FAST]
    ft = ["--init", str(tmp_path / "pre1" / "ckpt.pt"), "--data-dir", cifar_dir, "--epochs", "1", "--warmup-epochs", "0",
          "--batch", "20", "--train-head", *FAST]
    pretrain.main([*pre, "--out", str(tmp_path / "pre1"), "--shards", "2"])
    printed = torchrun_runs([("pretrain.py", [*pre, "--out", str(tmp_path / "pre2")]),
                             ("pretrain.py", [*pre, "--micro-batch", "3", "--out", str(tmp_path / "pre2m")]),
                             ("finetune.py", [*ft, "--out", str(tmp_path / "ft2")])], tmp_path / "logs")
    assert "".join(printed).count("step 2/2 |") == 2 and "precision fp32" in printed[0]  # only rank 0 logs
    assert "".join(printed).count("epoch 1 | clean acc") == 1
    one = load_checkpoint(str(tmp_path / "pre1" / "ckpt.pt"), "pretrain")
    torch.manual_seed(0)  # pretrain.py's initial weights: the target after step 1 at EMA rate 0.99 is not them
    start = pretrain.ViT(pretrain.vit_config("tiny", "cifar10")).state_dict()
    for run in ("pre2", "pre2m"):
        two = load_checkpoint(str(tmp_path / run / "ckpt.pt"), "pretrain")
        assert two["step"] == 2 and two["config"]["shards"] == 2
        for weights in ("model", "target"):
            gap = update_difference(two[weights], one[weights], start)
            assert gap < UPDATE_TOLERANCE, f"{run} {weights}: updates differ by {gap:.2%}"
        assert same_weights(two["model"], one["model"], 1e-5) and same_weights(two["target"], one["target"], 1e-5)

    finetune.main([*ft, "--out", str(tmp_path / "ft1"), "--shards", "2"])
    two, one = (load_checkpoint(str(tmp_path / d / "ckpt.pt"), "finetune")["model"] for d in ("ft2", "ft1"))
    gap = update_difference(two, one, load_checkpoint(str(tmp_path / "pre1" / "ckpt.pt"), "pretrain")["model"])
    assert gap < UPDATE_TOLERANCE, f"fine-tuning updates differ by {gap:.2%}"
    assert same_weights(two, one, 1e-5)


def stop_mid_run(argv, signum, after_line: str):
    """Start a script, send `signum` once it prints `after_line`, return (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if after_line in line:
            proc.send_signal(signum)
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(out) + rest, err


# Resuming is bit-identical in either precision (same processes, same kernels, same order): pre-training is
# checked in fp32, fine-tuning in bf16.
@pytest.mark.parametrize("script, signum, precision", [("pretrain.py", signal.SIGINT, "fp32"), ("finetune.py", signal.SIGTERM, "bf16")])
def test_a_signal_saves_a_checkpoint_and_resume_is_bit_identical(script, signum, precision, cifar_dir, tmp_path, capsys):
    flags = ["--no-compile", "--kernels", "torch", "--precision", precision]
    if script == "pretrain.py":
        argv = ["--data-dir", cifar_dir, "--preset", "tiny", "--steps", "4", "--batch", "8", "--warmup", "1",
                "--log-every", "1", *flags]
        kind, first_line, total, main = "pretrain", "step 1/4", 4, pretrain.main
    else:
        # 2 epochs of 2 steps of 2 images: bf16 is emulated, and slow, on CPUs without AVX512-BF16
        argv = ["--init", "scratch", "--preset", "tiny", "--data-dir", cifar_dir, "--epochs", "2", "--warmup-epochs", "0",
                "--train-images", "4", "--batch", "2", "--eval-images", "2", "--log-every", "1", *flags]
        kind, first_line, total, main = "finetune", "step 1/4", 4, finetune.main
    code, out, err = stop_mid_run([script, *argv, "--out", str(tmp_path / "cut")], signum, first_line)
    name = signal.Signals(signum).name
    lines = err.strip().splitlines()
    assert code == 128 + signum and len(lines) == 2, err
    # At the signal it says what will happen; at the end, what did.
    assert lines[0].startswith(f"{script}: {name} received: finishing the current step") and f"a second {name} exits" in lines[0]
    assert f"stopped by {name} after step" in lines[1], err
    stopped = load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"), kind)
    assert 1 <= stopped["step"] < total and f"after step {stopped['step']};" in lines[1]
    main([*argv, "--out", str(tmp_path / "cut")])  # the same command, in this process: what is tested is the checkpoint
    assert f"resuming {tmp_path / 'cut'}/ckpt.pt at step {stopped['step']}" in capsys.readouterr().out
    main([*argv, "--out", str(tmp_path / "full")])  # the uninterrupted run
    full, cut = (load_checkpoint(str(tmp_path / d / "ckpt.pt"), kind) for d in ("full", "cut"))
    assert full["step"] == cut["step"] == total and same_weights(full["model"], cut["model"])


def test_a_second_signal_exits_at_once_and_says_so():
    """A step of rRCM-B on a CPU takes hours: the first Ctrl-C says that the step will be finished first, the
    second leaves at once (the checkpoint on disk is whole: they are written atomically)."""
    loop = ("import sys, time; sys.argv[0] = 'pretrain.py'; from trainer import StopSignal\n"
            "with StopSignal() as stop:\n"
            "    print('step', flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", loop], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "step\n"
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline()
    assert first.startswith("pretrain.py: SIGINT received: finishing the current step (it started 0:00:0"), first
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT
    assert rest.strip() == "pretrain.py: second signal (SIGINT): exiting without saving; the last checkpoint on disk is intact"


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
    assert "error: consistency loss is nan at step 2" in (tmp_path / "log.txt").read_text()
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
    finetune.main(finetune_args(cifar_dir, tmp_path / "cut", "--save-every", "1"))  # the same command
    resumed = load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"), "finetune")
    assert resumed["step"] == full["step"] == 3
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])


def test_resume_with_another_preset_is_refused(cifar_dir, tmp_path):
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "1", "--preset", "tiny", "--batch", "20", *FAST])
    before = (tmp_path / "ckpt.pt").read_bytes()
    said = refusal("pretrain.py", ["--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "1", "--preset", "S",
                                   "--batch", "20", *FAST])
    assert "made with different --preset" in said, said
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_checkpoint_of_another_dataset_is_refused(cifar_dir, tmp_path):
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path), "--steps", "1", "--preset", "tiny", "--batch", "20", *FAST])
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"), "pretrain")
    ckpt["config"]["dataset"] = "imagenet"
    save_checkpoint(str(tmp_path / "imagenet.pt"), ckpt)
    said = refusal("finetune.py", ["--init", str(tmp_path / "imagenet.pt"), "--data-dir", cifar_dir, *FAST])
    assert "\n" not in said and "pre-trained on imagenet, not --dataset cifar10" in said, said


@pytest.mark.quick
@pytest.mark.parametrize("argv, message", [
    (["pretrain.py", "--batch", "0"], "--batch must be >= 1"),
    (["pretrain.py", "--steps", "-3"], "--steps must be >= 1"),
    (["pretrain.py", "--lr", "nan"], "--lr must be > 0"),
    (["pretrain.py", "--train-images", "0"], "--train-images must be >= 1"),
    (["pretrain.py", "--shards", "0"], "--shards must be >= 1"),
    (["finetune.py", "--shards", "-2"], "--shards must be >= 1"),
    (["finetune.py", "--lr", "-1"], "--lr must be > 0"),
    (["finetune.py", "--lr", "nan"], "--lr must be > 0"),
    (["finetune.py", "--eta1", "-50"], "--eta1 must be >= 0"),
    (["finetune.py", "--warmup-epochs", "-3"], "--warmup-epochs must be >= 0"),
    (["finetune.py", "--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
    (["finetune.py", "--sigma", "inf"], "--sigma must be > 0 and finite"),
    (["finetune.py", "--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    (["certify.py", "--batch", "0"], "error:"), (["certify.py", "--batch", "150"], "error:"), (["certify.py", "--alpha", "0"], "error:"),
])
def test_more_bad_flags(argv, message):
    said = refusal(argv[0], argv[1:])
    assert said.startswith(f"{argv[0]}: error:") and "\n" not in said and message in said, said


def broken_checkpoints(tmp_path, cifar_dir) -> dict:
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path / "pre"), "--steps", "1", "--preset", "tiny", "--batch", "20", *FAST])
    ckpt = load_checkpoint(str(tmp_path / "pre" / "ckpt.pt"), "pretrain")
    ckpt["model_args"]["width"] = 256  # the weights are 192 wide
    save_checkpoint(str(tmp_path / "mismatch.pt"), ckpt)
    return dict(dir=str(tmp_path / "pre"), mismatch=str(tmp_path / "mismatch.pt"))


@pytest.mark.parametrize("argv, message", [
    (["pretrain.py", "--batch", "20", "--out", "/proc/x"], "cannot create --out /proc/x"),
    (["pretrain.py", "--batch", "20", "--out", "/etc/passwd/x"], "cannot create --out /etc/passwd/x: Not a directory"),
    (["finetune.py", "--init", "scratch", "--preset", "tiny", "--batch", "20", "--out", "/etc/passwd/x"], "cannot create --out /etc/passwd/x"),
    (["pretrain.py", "--data-dir", "/etc/passwd"], "--data-dir /etc/passwd is not a directory"),
    (["finetune.py", "--init", "scratch", "--preset", "tiny", "--data-dir", "/etc/passwd"], "--data-dir /etc/passwd is not a directory"),
    (["finetune.py", "--init", "{dir}"], "is a directory; give the ckpt.pt file inside it"),
    (["finetune.py", "--init", "{mismatch}"], "checkpoint weights do not match its model_args"),
    (["pretrain.py", "--kernels", "triton"], "--kernels triton needs a CUDA GPU"),
    (["pretrain.py", "--batch", "5000"], "--batch 5000 is larger than the training set (60 images)"),
])
def test_bad_paths_and_checkpoints_are_one_line(argv, message, cifar_dir, tmp_path):
    paths = broken_checkpoints(tmp_path, cifar_dir) if any("{" in a for a in argv) else {}
    argv = [a.format(**paths) for a in argv]
    if "--data-dir" not in argv:
        argv += ["--data-dir", cifar_dir]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    argv += ["--preset", "tiny"] if argv[0] == "pretrain.py" else []
    if "triton" in argv:  # ask as the shell of a user without a GPU: no interpreter (the tests run it), no CUDA device
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        said = result.stderr.strip()
        assert result.returncode != 0
    else:
        said = refusal(argv[0], [*argv[1:], *FAST])
    assert said.startswith(f"{argv[0]}: error:") and "\n" not in said and message in said, said
    assert not (tmp_path / "out").exists()  # nothing is created for a run that cannot start


def test_resume_with_other_data_is_refused(cifar_dir, tmp_path):
    other = tmp_path / "other"
    import shutil
    shutil.copytree(cifar_dir, other)
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path / "pre"), "--steps", "1", "--preset", "tiny", "--batch", "20", *FAST])
    before = (tmp_path / "pre" / "ckpt.pt").read_bytes()
    said = refusal("pretrain.py", ["--data-dir", str(other), "--out", str(tmp_path / "pre"), "--steps", "1", "--preset", "tiny",
                                   "--batch", "20", *FAST])
    assert "made with different --data-dir" in said, said
    assert (tmp_path / "pre" / "ckpt.pt").read_bytes() == before


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




@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py"])
def test_preset_b_on_a_cpu_says_how_long_it_will_take_within_a_minute(script, cifar_dir, tmp_path):
    """rRCM-B on a CPU: its first step takes minutes, so the first lines must already estimate the run."""
    import time
    argv = ["--data-dir", cifar_dir, "--out", str(tmp_path), "--batch", "8", *FAST]  # 8 images: the timed forward is the cost
    argv = ["--preset", "B", "--steps", "100", *argv] if script == "pretrain.py" else ["--init", "scratch", "--preset", "B", *argv]
    proc = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, lines = time.time(), []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("estimate"):
                break
    finally:
        proc.kill()
        proc.communicate()
    assert time.time() - start < 60 and lines[-1].startswith("estimate from a timed forward"), "".join(lines)
    assert "precision fp32" in lines[0] and "on cpu" in lines[0]  # device and precision first
    days, hours, minutes, seconds = re.search(r", (?:(\d+)d )?(\d+):(\d\d):(\d\d) for", lines[-1]).groups()
    assert int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds) > 0
