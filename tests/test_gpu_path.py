"""What a GPU runs by default, run on this CPU in every CI run.

On a CUDA machine every script defaults to torch.compile (Inductor), the fused Triton kernels and bf16 autocast,
and the scale-out command adds processes. Here that path runs with the kernels under Triton's interpreter, in
one process and in two (torchrun, gloo): a pre-training step and a fine-tuning step here, certification in
tests/test_gpu_path_certify.py (a file of its own so that a second pytest-xdist worker runs it meanwhile), tiny
preset, each compared with the reference path (eager, PyTorch's kernels, fp32) on the same data and noise.

Sizes are the smallest that still exercise every piece: the interpreter runs each Triton program in Python
(~15 ms a program; a tiny-preset image is one attention program per head, layer and kernel). Inductor's C++ is built without
vector intrinsics (conftest sets TORCHINDUCTOR_VEC_ISA_OK=0: half the compile time); the C++ Inductor writes for
a CPU is not what it writes for a GPU anyway. What these tests guard is the path up to it, which is the same:
Dynamo's trace, AOTAutograd, the custom ops' fake tensors and the stride checks Inductor puts around them,
bf16 through every op, and the collectives of several processes.
Under RRCM_TEST_GPU=1 the one-process runs use the GPU; the two-process runs use two GPUs where there are two,
else the CPU with the interpreter (one GPU cannot hold two NCCL ranks).
"""
import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

import finetune
import pretrain
from conftest import torchrun_runs, update_difference
from jobs import load_checkpoint
from model import ViT, vit_config

GPU_DEFAULTS = ["--compile", "--kernels", "triton", "--precision", "bf16"]
REFERENCE = ["--no-compile", "--kernels", "torch", "--precision", "fp32"]

# How far the bf16 path may be from the fp32 reference: bf16 (8 bits of mantissa) rounds every matmul input.
LOSS_TOLERANCE = 0.02      # absolute and relative, on each logged loss term of the first step (same weights, same
                           # inputs): InfoNCE's logits reach 1 / tau = 5, which bf16 rounds by up to 5 * 2^-8 = 0.02
                           # (measured 2026-11-23: contrastive 0.1070 against 0.0988, consistency 0.2525 / 0.2538)
UPDATE_TOLERANCE = 0.15    # || update_bf16 - update_fp32 || / || update_fp32 || after one AdamW step, whose first
                           # update is lr * sign(g): gradient entries near 0 may flip sign under bf16 (measured:
                           # 5.4 % / 2.3 % for pre-training in 1 / 2 processes, 5.4 % / 4.7 % for fine-tuning)


def two_process_env() -> dict:
    """Two processes run the GPU defaults on two GPUs where there are two, else on the CPU with gloo and the
    interpreter (one GPU cannot hold two NCCL ranks)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        return {}
    return {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}


def logged(out: str, step: str, names: tuple[str, ...]) -> dict[str, float]:
    """The loss terms a script's log line of `step` reports, e.g. 'step 1/1 | consistency 0.25 | ...'."""
    lines = [line.split("]:", 1)[1] if line.startswith("[default") else line for line in out.splitlines()]  # torchrun's tee
    line = next(line for line in lines if line.startswith(step + " |"))
    fields = dict(part.strip().split(" ", 1) for part in line.split("|")[1:] if part.strip().split(" ", 1)[0] in names)
    return {k: float(v) for k, v in fields.items()}


def close(a: dict[str, float], b: dict[str, float], tol: float) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol * (1 + abs(b[k])) for k in a)


@contextlib.contextmanager
def one_thread():
    """torch's thread count as torchrun sets it for each rank: Inductor's C++ names its thread count, so the
    ranks then reuse this process's compiled graphs from Inductor's cache instead of compiling them again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(runs: list[tuple[str, list]], processes: int, log_dir) -> list[str]:
    """What each (script, argv) printed, run in this process or under one torchrun."""
    if processes == 2:
        return torchrun_runs(runs, log_dir, two_process_env())
    with one_thread():
        for script, argv in runs:
            {"pretrain.py": pretrain.main, "finetune.py": finetune.main}[script](argv)
    return ["" for _ in runs]


@pytest.mark.parametrize("processes", [1, 2])
def test_training_on_the_gpu_path_matches_the_reference(processes, cifar_dir, tmp_path, capsys):
    """One pre-training step (2 images per process) and one fine-tuning step (1 image per process), against the
    reference path in one process on the same global batch and shards (so the same images, augmentations and
    noise). Two processes compile the graphs one process compiled: Inductor's cache serves them."""
    per_process = lambda images: ["--batch", str(images * processes), "--shards", str(processes), "--log-every", "1"]
    pre = ["--data-dir", cifar_dir, "--preset", "tiny", "--steps", "1", "--warmup", "0", *per_process(2)]
    # fine-tuning: 1 image in 2 noisy copies, the shape of pre-training's passes with gradient: no backward to compile
    ft = ["--init", str(tmp_path / "pre_ref" / "ckpt.pt"), "--data-dir", cifar_dir, "--epochs", "1", "--warmup-epochs", "0",
          "--train-images", str(processes), "--eval-images", str(2 * processes), "--train-head", *per_process(1)]
    pre_terms, ft_terms = ("consistency", "contrastive"), ("loss", "ce", "kl", "entropy")
    # the reference path in this process; fine-tuning starts from the reference's pre-trained weights, so that
    # it compares one step of 2 noisy copies per image from the same weights
    pretrain.main([*pre, "--out", str(tmp_path / "pre_ref"), *REFERENCE])
    pre_ref = logged(capsys.readouterr().out, "step 1/1", pre_terms)
    finetune.main([*ft, "--out", str(tmp_path / "ft_ref"), *REFERENCE])
    ft_ref = logged(capsys.readouterr().out, "step 1/1", ft_terms)
    counters.clear()
    printed = run([("pretrain.py", [*pre, "--out", str(tmp_path / "pre_gpu"), *GPU_DEFAULTS]),
                   ("finetune.py", [*ft, "--out", str(tmp_path / "ft_gpu"), *GPU_DEFAULTS])], processes, tmp_path / "logs")
    if processes == 1:
        out = capsys.readouterr().out
        printed = [out[:out.index("finetune.py |")], out[out.index("finetune.py |"):]]
    assert f"{processes} process(es) on cpu | precision bf16 | kernels triton" in printed[0]
    pre_gpu, ft_gpu = logged(printed[0], "step 1/1", pre_terms), logged(printed[1], "step 1/1", ft_terms)
    assert close(pre_gpu, pre_ref, LOSS_TOLERANCE), (pre_ref, pre_gpu)
    assert close(ft_gpu, ft_ref, LOSS_TOLERANCE), (ft_ref, ft_gpu)
    if processes == 1:  # one block graph per grad mode, weights' requires_grad and shape, whatever the depth:
        # pre-training's 3 (its keys through the online and the target weights without gradient, its queries with),
        # fine-tuning's evaluation (--batch images at a time, without gradient) 1 more: its training step reuses
        # pre-training's graph with gradient. A graph per block would be 4x as many, and past Dynamo's recompile
        # limit (8) the blocks would run eagerly after one warning; none: nothing compiled.
        assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])

    torch.manual_seed(0)  # pretrain.py's initial weights (seed 0)
    start = ViT(vit_config("tiny", "cifar10")).state_dict()
    runs = {name: load_checkpoint(str(tmp_path / name / "ckpt.pt"), "pretrain") for name in ("pre_ref", "pre_gpu")}
    gap = update_difference(runs["pre_gpu"]["model"], runs["pre_ref"]["model"], start)
    assert gap < UPDATE_TOLERANCE, f"pre-training updates differ by {gap:.1%}"
    start = runs["pre_ref"]["model"]
    runs = {name: load_checkpoint(str(tmp_path / name / "ckpt.pt"), "finetune")["model"] for name in ("ft_ref", "ft_gpu")}
    gap = update_difference(runs["ft_gpu"], runs["ft_ref"], start)
    assert gap < UPDATE_TOLERANCE, f"fine-tuning updates differ by {gap:.1%}"
