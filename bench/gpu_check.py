"""Validate a GPU in one command and write one markdown report:

  1. the whole test suite with the real Triton kernels (RRCM_TEST_GPU=1 turns the interpreter off),
  2. the kernel benchmarks (bench/kernels.py: attention against SDPA at L = 66 and 198, InfoNCE against
     the unfused reference at B = M = 4096 .. 32768 with peak memory, cross-entropy),
  3. certify.py's seconds per image for rRCM-B at N = 100,000 in bf16,
  4. pretrain.py's images/s and MFU for rRCM-B.

    python bench/gpu_check.py                      # on an NVIDIA GPU; report in out/gpu_check.md
    python bench/gpu_check.py --cpu-tiny           # CPU, interpreter, toy shapes, tiny preset: seconds

The scripts run as the user runs them, as subprocesses through their command lines, on a synthetic
CIFAR-10 (random pixels, official pickle layout) and a randomly initialised fine-tuned checkpoint:
speed does not depend on what the weights have learned. `--cpu-tiny` runs every step at toy size so
that tests/test_gpu_check.py notices when a change to a script breaks this one.
"""
import argparse
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import ViT, save_checkpoint, vit_config  # noqa: E402

# What each mode runs. GPU: the paper's model at sizes that keep one H100 busy for a few minutes;
# --batch 10000 also launches attention over 120,000 heads, past the old 65,535 grid limit.
GPU_PLAN = dict(tests=["tests"], kernels=[], preset="B", precision="bf16", certify_n=100_000, certify_num=4, certify_batch=10_000,
                pretrain_steps=60, pretrain_batch=512, log_every=20, script_flags=[], timeout=3600)
# Tiny: fp32, since bf16 without native CPU support is emulated and about 20x slower here.
TINY_PLAN = dict(tests=["tests/test_kernels.py", "-k", "cross_entropy_matches"], kernels=["--tiny"],
                 preset="tiny", precision="fp32", certify_n=100, certify_num=1, certify_batch=100, pretrain_steps=1, pretrain_batch=8,
                 log_every=1, script_flags=["--no-compile", "--kernels", "torch"], timeout=300)


def run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[bool, str, float]:
    """(exit status 0, stdout + stderr, seconds) of a command run from the repository root. The scripts
    decide about the interpreter themselves (the tests' conftest, bench/kernels.py without a GPU), so an
    inherited TRITON_INTERPRET is dropped: certify.py and pretrain.py must run the real thing."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return False, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}", time.perf_counter() - start
    return proc.returncode == 0, proc.stdout + proc.stderr, time.perf_counter() - start


def tail(text: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(text.strip().splitlines()[-lines:]) + "\n```"


def write_cifar(folder: str, n_train: int, n_test: int) -> None:
    """Random images in the official CIFAR-10 pickle layout (5 training files and a test file)."""
    rng = np.random.default_rng(0)
    root = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(root, exist_ok=True)
    files = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in files.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f, protocol=4)


def write_finetune_checkpoint(path: str, preset: str) -> None:
    """A randomly initialised classifier in finetune.py's checkpoint format, fine-tuned at sigma 0.25."""
    cfg = vit_config(preset, "cifar10")
    save_checkpoint(path, dict(kind="finetune", model_args=asdict(cfg), model=ViT(cfg).state_dict(), optimizer={},
                               step=0, config=dict(sigma=0.25, dataset="cifar10")))


def certify_seconds(tsv: str) -> list[float]:
    """Seconds per image: the `time` column (6th) of certify.py's TSV, header line first."""
    with open(tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [float(r[5]) for r in rows if r and r[0]]


def pretrain_rates(log: str) -> tuple[float, float | None]:
    """(images/s, MFU %) of pretrain.py's last log line that reports them; MFU is None where the GPU's
    peak FLOP/s is unknown to pretrain.py (or on a CPU)."""
    lines = [line for line in log.splitlines() if re.search(r"[\d.]+ img/s", line)]
    if not lines:
        raise ValueError("no 'img/s' in pretrain.py's output")
    mfu = re.search(r"mfu ([\d.]+)%", lines[-1])
    return float(re.search(r"([\d.]+) img/s", lines[-1])[1]), float(mfu[1]) if mfu else None


# MFU from the last log window's images/s, whatever pretrain.py averages over (its own figure may count
# compilation). Dense bf16 peaks; 12 forward-equivalents per image is pretrain.py's accounting: 3 passes
# with gradients (x 3: forward + backward) and 3 without (the consistency key and 2 target views).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}
FORWARDS_PER_IMAGE = 12


def window_mfu(images_per_s: float, preset: str) -> float | None:
    """Percent of the GPU's peak bf16 FLOP/s at this pre-training rate; None on an unknown device."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    flops = ViT(vit_config(preset, "cifar10")).flops_per_image() * FORWARDS_PER_IMAGE
    return 100 * images_per_s * flops / peak


def section_tests(plan: dict, gpu: bool) -> tuple[bool, str]:
    env = dict(os.environ, RRCM_TEST_GPU="1" if gpu else "0")
    ok, out, seconds = run([sys.executable, "-m", "pytest", "-q", *plan["tests"]], plan["timeout"], env)
    summary = next((line for line in reversed(out.splitlines()) if " passed" in line or " failed" in line), "no summary")
    kind = "real Triton kernels on the GPU" if gpu else "Triton interpreter (CPU)"
    body = f"`pytest -q {' '.join(plan['tests'])}` with the {kind}: **{summary.strip('= ')}** ({seconds:.0f} s)"
    return ok, body if ok else body + "\n\n" + tail(out)


def section_kernels(plan: dict) -> tuple[bool, str]:
    ok, out, _ = run([sys.executable, os.path.join("bench", "kernels.py"), *plan["kernels"]], plan["timeout"])
    return ok, out.strip() if ok else tail(out)


def section_certify(plan: dict, work: str) -> tuple[bool, str]:
    ckpt, tsv = os.path.join(work, "finetune", "ckpt.pt"), os.path.join(work, "certify.tsv")
    write_finetune_checkpoint(ckpt, plan["preset"])
    cmd = [sys.executable, "certify.py", "--checkpoint", ckpt, "--data-dir", work, "--n", str(plan["certify_n"]),
           "--num", str(plan["certify_num"]), "--skip", "1", "--batch", str(plan["certify_batch"]), "--precision", plan["precision"],
           "--out", tsv, *plan["script_flags"]]
    ok, out, _ = run(cmd, plan["timeout"])
    if not ok:
        return False, f"`{' '.join(cmd[1:])}` failed:\n\n" + tail(out)
    seconds = certify_seconds(tsv)
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    samples = plan["certify_n"] + 100  # n0 = 100 selection samples, then n
    return True, (f"rRCM-{plan['preset']}, N = {plan['certify_n']:,}, {plan['precision']}, --batch {plan['certify_batch']}: "
                  f"**{steady:.2f} s per image** ({samples / steady:,.0f} samples/s; median of images 2..{len(seconds)}; "
                  f"the first, with compilation, took {seconds[0]:.2f} s). Seconds per image: "
                  + ", ".join(f"{s:.2f}" for s in seconds))


def section_pretrain(plan: dict, work: str) -> tuple[bool, str]:
    cmd = [sys.executable, "pretrain.py", "--data-dir", work, "--preset", plan["preset"], "--steps", str(plan["pretrain_steps"]),
           "--batch", str(plan["pretrain_batch"]), "--log-every", str(plan["log_every"]),
           "--out", os.path.join(work, "pretrain"), *plan["script_flags"]]
    ok, out, _ = run(cmd, plan["timeout"])
    if not ok:
        return False, f"`{' '.join(cmd[1:])}` failed:\n\n" + tail(out)
    images_per_s, logged_mfu = pretrain_rates(out)
    mfu = window_mfu(images_per_s, plan["preset"]) if plan is GPU_PLAN else None
    mfu_text = "MFU unknown (no peak FLOP/s for this device)" if mfu is None else f"MFU **{mfu:.1f} %** at that rate"
    logged = "no MFU" if logged_mfu is None else f"mfu {logged_mfu:.1f} %"
    return True, (f"rRCM-{plan['preset']}, batch {plan['pretrain_batch']}, {plan['pretrain_steps']} steps: "
                  f"**{images_per_s:.1f} images/s** over the last log window, {mfu_text}; pretrain.py's last "
                  f"line says {logged}:\n\n" + tail(next(l for l in reversed(out.splitlines()) if "img/s" in l)))


def device_line(gpu: bool) -> str:
    import triton
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if not gpu:
        return f"CPU ({os.cpu_count()} cores), Triton interpreter, toy shapes, tiny preset; {versions}. Timings say nothing."
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor}), CUDA {torch.version.cuda}, {versions}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="validate a GPU: tests, kernel benchmarks, certify and pre-training speed")
    p.add_argument("--cpu-tiny", action="store_true", help="no GPU: interpreter, toy shapes, tiny preset (runs in the tests)")
    p.add_argument("--out", default=os.path.join("out", "gpu_check.md"), help="the markdown report")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu_tiny
    if not (gpu or args.cpu_tiny):
        raise SystemExit("gpu_check.py: no CUDA GPU here; --cpu-tiny runs the toy version of every step")
    plan = GPU_PLAN if gpu else TINY_PLAN
    sections = {}
    with tempfile.TemporaryDirectory() as work:
        write_cifar(work, n_train=4 * plan["pretrain_batch"], n_test=plan["certify_num"])
        steps = [("Test suite", lambda: section_tests(plan, gpu)), ("Kernel benchmarks", lambda: section_kernels(plan)),
                 ("Certification", lambda: section_certify(plan, work)), ("Pre-training", lambda: section_pretrain(plan, work))]
        for title, step in steps:
            start = time.perf_counter()
            sections[title] = step()
            print(f"gpu_check: {title}: {'ok' if sections[title][0] else 'FAILED'} ({time.perf_counter() - start:.0f} s)", flush=True)
    failed = [title for title, (ok, _) in sections.items() if not ok]
    report = [f"# GPU check, {time.strftime('%Y-%m-%d')}", "", device_line(gpu), "",
              f"Result: {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}"]
    for title, (ok, body) in sections.items():
        report += ["", f"## {title}{'' if ok else ' (FAILED)'}", "", body]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(report) + "\n")
    print(f"gpu_check: {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}; report in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
