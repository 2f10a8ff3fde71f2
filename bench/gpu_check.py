"""The first look at a GPU in one command of about 8 minutes: correctness on the real kernels first, then speed.

    python bench/gpu_check.py --budget 480 --data-dir gpudata --out $OUT/gpu_check    # the H200 call (bench/README.md)
    python bench/gpu_check.py --only certify,pretrain --budget 240 --out $OUT/rerun     # a rerun of some sections
    python bench/gpu_check.py --only tests --cap tests=400 --budget 420 --out $OUT/tests
    python bench/gpu_check.py --cpu-tiny --data-dir data --out /tmp/gpu_check          # CPU, interpreter, toy sizes

Sections run in this order, each with its own cap in seconds, inside one --budget:
  tests     tests/test_kernels.py, then the GPU-path tests, with the real Triton kernels (RRCM_TEST_GPU=1):
            pass/fail counts and the first failure;
  kernels   bench/kernels.py --quick: attention against SDPA at (B 256, H 12, L 66) and (64, 12, 198), d 64;
            InfoNCE against the unfused loss at B = M = 4096 and 16384, D 256; cross-entropy at C 10 and 1000;
            forward + backward in bf16, time and peak memory;
  certify   certify.py, rRCM-B with random weights, compiled, bf16, --batch 10,000, a few images at n = 10,000:
            seconds per image at the paper's n = 100,000 by proportion, samples/s, MFU;
  pretrain  pretrain.py, rRCM-B, batch 1024, 40 compiled steps: images/s and MFU over the last 10;
  e2e       if time remains: the tiny preset on real CIFAR-10 (data_batch_1 and test_batch), pre-train, fine-tune
            and certify 100 images, with --kernels triton and again with --kernels torch, tables side by side.
A section is killed at its cap (or at the budget's end) with its partial output kept and read; one that would
start with less than its `least` seconds left is not started and is reported as not run. The folder --out holds
report.md, rewritten as each section starts and ends (a time-out of the whole command loses nothing finished),
and <section>.log, each section's raw output as it comes: at most 6 files, as the device tool returns them.
The scripts run as a user runs them, through their command lines, on a synthetic CIFAR-10 (random pixels, the
official pickle layout) and randomly initialised checkpoints, except e2e: speed does not depend on the weights.
`--cpu-tiny` runs the same command path at toy size (tests/test_gpu_check.py), so the GPU call cannot fail for a
reason a CPU could have shown (its e2e pre-trains and fine-tunes with PyTorch's kernels, certifies with each choice).
"""
import argparse
import contextlib
import math
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jobs import peak_bf16_flops, save_checkpoint  # noqa: E402
from model import ViT, vit_config  # noqa: E402

SECTIONS = ("tests", "kernels", "certify", "pretrain", "e2e")
# The GPU's tests in the order that matters: the kernels, then the scripts' GPU path in one process; the two-process
# training last, since with one GPU it runs on the CPU (gloo, interpreter) exactly as CI runs it.
GPU_TESTS = ["tests/test_kernels.py", "tests/test_gpu_path.py::test_training_on_the_gpu_path_matches_the_reference[1]",
             "tests/test_gpu_path_certify.py::test_certification_on_the_gpu_path_matches_the_reference_in_one_and_two_processes",
             "tests/test_gpu_path.py::test_training_on_the_gpu_path_matches_the_reference[2]"]
# Caps on an H200 (16 host cores), estimated since no run has touched a GPU yet; the first run's report and the
# tests' --durations show what to change. The first four sum to 470 s of a 480 s budget, so each gets its whole
# cap; what a section leaves unused goes to the next ones, e2e runs only on such savings. A cut-off test run still
# counts what it ran; a certify or pretrain run cut off while compiling measures nothing, so those get the margin.
#   tests     ~140 Triton builds (3 kernels x 2 autotune configs x 3 dtypes x head dims, InfoNCE, CE) at ~1 s each,
#             Inductor for the tiny preset's blocks, then CPU processes compiling C++: 250-350 s in all, so the cap
#             keeps the kernel tests and what it can of the GPU path; the CPU-only two-process training goes first.
#   kernels   Triton's disk cache holds the builds the tests made; autotuning and 20 timed steps per row: ~30 s.
#   certify   Inductor on the whole 12-block forward, at n0's batch of 100 and again (dynamic) at 10,000: 50-90 s,
#             a 340 MB checkpoint written and read, then 8 images of 10,100 samples at ~0.3 s each.
#   pretrain  regional compilation: 3 block graphs forward + backward, 45-75 s, then 40 steps of ~0.35 s at 40 % MFU
#             and the 1.4 GB checkpoint.
#   e2e       eager (compiling 6 script runs would take ~2 minutes): ~25 s per pipeline of 3 process starts and runs.
GPU_PLAN = dict(caps=dict(tests=180, kernels=45, certify=125, pretrain=120, e2e=120),
                least=dict(tests=60, kernels=25, certify=60, pretrain=60, e2e=50),
                tests=GPU_TESTS, kernels=["--quick"], preset="B", precision="bf16", script_flags=[],
                # --batch 10,000 = n: one forward pass per image's estimate (660k token rows per matmul: the GPU is
                # full) and a larger batch draws no more samples at n = 10,000; ~10 GB of activations in bf16
                certify=dict(n=10_000, num=8, batch=10_000),
                pretrain=dict(steps=40, batch=1024, log_every=10),
                e2e=dict(pretrain=["--steps", "200", "--batch", "256", "--warmup", "20", "--no-compile"],
                         finetune=["--epochs", "1", "--warmup-epochs", "0", "--batch", "256", "--train-head", "--eval-images",
                                   "1000", "--no-compile"],
                         certify=["--n", "1000", "--num", "100", "--skip", "100", "--batch", "1000", "--no-compile"],
                         train_kernels=None))  # None: pre-train and fine-tune with the kernels under test too
# Tiny: fp32, since bf16 without native CPU support is emulated and about 20x slower on such CPUs; caps generous
# for a shared 2-core machine.
TINY_PLAN = dict(caps=dict(tests=120, kernels=120, certify=120, pretrain=120, e2e=240),
                 least=dict(tests=3, kernels=3, certify=3, pretrain=3, e2e=3),
                 tests=["tests/test_kernels.py", "-k", "cross_entropy_matches"], kernels=["--quick", "--tiny"],
                 preset="tiny", precision="fp32", script_flags=["--no-compile", "--kernels", "torch"],
                 certify=dict(n=100, num=1, batch=100), pretrain=dict(steps=2, batch=8, log_every=1),
                 # e2e: two images at a time. Each pipeline pre-trains and fine-tunes with PyTorch's kernels and
                 # certifies with its own: eager training under the interpreter would be the toy run's largest cost,
                 # and tests/test_gpu_path.py trains with the fused kernels, test_kernels.py checks their gradients.
                 # The same commands, chain of checkpoints and report as on the GPU.
                 e2e=dict(pretrain=["--steps", "1", "--batch", "2", "--warmup", "0", "--no-compile", "--precision", "fp32"],
                          finetune=["--epochs", "1", "--warmup-epochs", "0", "--batch", "2", "--train-images", "2", "--train-head",
                                    "--eval-images", "2", "--no-compile", "--precision", "fp32"],
                          certify=["--n0", "2", "--n", "2", "--num", "1", "--skip", "1", "--batch", "100", "--no-compile",
                                   "--precision", "fp32"],
                          train_kernels="torch"))
LOG_LIMIT = 8 * 2**20  # bytes per log: the device tool returns no file over 16 MiB
MATMUL_BF16_H200 = 790e12  # FLOP/s of an 8192^3 bf16 matmul measured on the device tool's H200 (its KINDS.md)
PAPER_SECONDS_PER_IMAGE = 16  # rRCM-B, CIFAR-10, n = 100,000 on an A800 (the paper)


class Ran(NamedTuple):
    ok: bool          # exit status 0
    output: str       # stdout and stderr as they came
    seconds: float
    timed_out: bool   # killed at the deadline


def process_tree(pid: int) -> list[int]:
    """pid and every process below it (Linux /proc), listed before any is killed: torchrun starts each rank in
    a session of its own, so neither a process group nor a signal to torchrun is sure to reach them all."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the (command name)
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
            os.kill(p, signal.SIGKILL)


def run(cmd: list[str], timeout: float, log: str, env: dict | None = None, interpret: bool = False) -> Ran:
    """Run a command from the repository root, its output also appended to `log` line by line as it comes (a
    command cut off keeps what it printed; past LOG_LIMIT the log keeps only the command lines). The scripts
    decide about the interpreter themselves (the tests' conftest, bench/kernels.py without a GPU), so an
    inherited TRITON_INTERPRET is dropped: certify.py and pretrain.py must run the real thing, unless
    `interpret` (--cpu-tiny's --kernels triton). At the deadline a timer kills the command and every process
    below it, whether or not it is printing: a silent hang, or torchrun's ranks, cannot outlive the budget
    (nor keep a GPU busy during the next section); so does Ctrl-C or SIGTERM here."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"} | {"PYTHONUNBUFFERED": "1"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if timeout <= 0:
        return Ran(False, "no time left in this section\n", 0.0, True)
    start, lines, expired = time.perf_counter(), [], threading.Event()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def kill() -> None:
            if proc.poll() is None:  # a command that has just ended on its own did not time out
                expired.set()
                kill_tree(proc.pid)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout:  # ends when every process holding the pipe has exited
                lines.append(line)
                if f.tell() < LOG_LIMIT:
                    f.write(line if f.tell() + len(line) < LOG_LIMIT else "[log cut here: the rest is not kept]\n")
                    f.flush()
            proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: leave nothing running, nor a zombie
            kill_tree(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
        if expired.is_set():  # on a line of its own, also after a line the command had only begun
            lines.append(("" if not lines or lines[-1].endswith("\n") else "\n") + f"cut off after {timeout:.0f} s\n")
            f.write(lines[-1])
    return Ran(proc.returncode == 0 and not expired.is_set(), "".join(lines), time.perf_counter() - start, expired.is_set())


def status_of(ran: Ran) -> str:
    return "cut off" if ran.timed_out else "passed" if ran.ok else "FAILED"


def tail(text: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(text.strip().splitlines()[-lines:]) + "\n```"


# ----------------------------------------------------------------------------------------------------
# Data and checkpoints the sections run on

def write_cifar(folder: str, n_train: int, n_test: int, train_files: int = 5) -> None:
    """Random images in the official CIFAR-10 pickle layout: `train_files` training files and a test file."""
    rng = np.random.default_rng(0)
    root = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(root, exist_ok=True)
    files = {f"data_batch_{i}": n_train // train_files for i in range(1, train_files + 1)} | {"test_batch": n_test}
    for name, n in files.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f, protocol=4)


def missing_cifar(data_dir: str) -> str | None:
    """What a --data-dir lacks for e2e (data_batch_1 and test_batch at least), or None."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    absent = [name for name in ("data_batch_1", "test_batch") if not os.path.isfile(os.path.join(folder, name))]
    return f"{folder} has no {' or '.join(absent)}" if absent else None


def partial_cifar(source: str, folder: str) -> int:
    """A CIFAR-10 folder from whatever batch files `source` holds (the GPU machine gets only data_batch_1 and
    test_batch: 64 MiB travel in all): those are linked, each missing training file is written empty, so the
    scripts train on the files present and nothing is counted twice. Returns the training images."""
    src, dst = os.path.join(source, "cifar-10-batches-py"), os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(dst, exist_ok=True)
    images = 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if os.path.isfile(os.path.join(src, name)):
            os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
            if name != "test_batch":
                with open(os.path.join(src, name), "rb") as f:
                    images += len(pickle.load(f, encoding="bytes")[b"labels"])
        else:
            with open(os.path.join(dst, name), "wb") as f:
                pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, f, protocol=4)
    return images


def write_finetune_checkpoint(path: str, preset: str) -> None:
    """A randomly initialised classifier in finetune.py's checkpoint format, fine-tuned at sigma 0.25."""
    cfg = vit_config(preset, "cifar10")
    save_checkpoint(path, dict(kind="finetune", model_args=asdict(cfg), model=ViT(cfg).state_dict(), optimizer={},
                               step=0, config=dict(sigma=0.25, dataset="cifar10")))


# ----------------------------------------------------------------------------------------------------
# Reading what the scripts printed, also when they were cut off

PYTEST_OUTCOME = re.compile(r"^(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def pytest_progress(out: str) -> tuple[Counter, int | None, str | None, str | None]:
    """From `pytest -v` output, finished or cut off: (outcomes counted, tests collected, the first test that
    failed or errored, the test that was running when the output ends)."""
    outcomes = [(m[1], m[2]) for m in PYTEST_OUTCOME.finditer(out)]
    collected = re.search(r"collected (\d+) items?(?: / \d+ deselected / (\d+) selected)?", out)
    first_failure = next((test for test, outcome in outcomes if outcome in ("FAILED", "ERROR")), None)
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("cut off after")]  # run()'s note
    last = lines[-1] if lines else ""
    running = last.split()[0] if re.match(r"\S+::\S+", last) and not PYTEST_OUTCOME.match(last) else None
    return (Counter(o for _, o in outcomes), int(collected[2] or collected[1]) if collected else None, first_failure,
            running)


def first_traceback(out: str, lines: int = 40) -> str | None:
    """The first block of pytest's FAILURES / ERRORS section (printed once every test has run)."""
    match = re.search(r"^_{3,} (.+?) _{3,}\n(.*?)(?=^_{3,} |^={3,})", out, re.M | re.S)
    return None if match is None else tail(f"{match[1]}\n{match[2]}", lines)


def certify_seconds(tsv: str) -> list[float]:
    """Seconds per image: the `time` column (6th) of certify.py's TSV, header line first; [] before any row."""
    if not os.path.isfile(tsv):
        return []
    with open(tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [float(r[5]) for r in rows if len(r) >= 6]


def pretrain_rates(log: str) -> tuple[float, float | None, int]:
    """(images/s, MFU %, step) of pretrain.py's last log line that reports them; MFU is None where the GPU's
    peak FLOP/s is unknown to pretrain.py (or on a CPU)."""
    lines = [line for line in log.splitlines() if re.search(r"[\d.]+ img/s", line)]
    if not lines:
        raise ValueError("no 'img/s' in pretrain.py's output")
    mfu = re.search(r"mfu ([\d.]+)%", lines[-1])
    step = re.search(r"step (\d+)/", lines[-1])
    return (float(re.search(r"([\d.]+) img/s", lines[-1])[1]), float(mfu[1]) if mfu else None,
            int(step[1]) if step else 0)


# MFU from measured rates, whatever the scripts average over (their own figures may count compilation), against
# jobs.py's table of dense bf16 peaks. Pre-training: pretrain.forwards_per_image encoder forward-equivalents
# per image (its default loss); certification: one forward per noisy sample.

def mfu(forwards_per_s: float, preset: str) -> float | None:
    """Percent of the GPU's peak bf16 FLOP/s at this rate of encoder forwards; None on an unknown device."""
    peak = peak_bf16_flops()
    return None if peak is None else 100 * forwards_per_s * vit_config(preset, "cifar10").flops_per_image() / peak


def window_mfu(images_per_s: float, preset: str) -> float | None:
    """mfu at this pre-training rate."""
    import pretrain
    return mfu(images_per_s * pretrain.forwards_per_image(pretrain.parse_args([])), preset)


# ----------------------------------------------------------------------------------------------------
# Sections: each gets a Section and returns (status, markdown body)

@dataclass
class Section:
    """What a section's code is given: the plan, its log, a scratch folder and when it is cut off."""
    plan: dict
    gpu: bool
    log: str
    work: str
    deadline: float  # time.perf_counter() at which this section's command is killed
    data_dir: str | None

    def run(self, cmd: list[str], env: dict | None = None, interpret: bool = False) -> Ran:
        return run(cmd, self.deadline - time.perf_counter(), self.log, env, interpret)


def section_tests(s: Section) -> tuple[str, str]:
    env = dict(os.environ, RRCM_TEST_GPU="1" if s.gpu else "0")
    cmd = [sys.executable, "-m", "pytest", "-v", "--tb=short", "--durations=8", "-p", "no:cacheprovider", *s.plan["tests"]]
    ran = s.run(cmd, env)
    counts, collected, first_failure, running = pytest_progress(ran.output)
    kind = "the real Triton kernels on the GPU (RRCM_TEST_GPU=1)" if s.gpu else "the Triton interpreter (CPU)"
    tally = ", ".join(f"{n} {outcome.lower()}" for outcome, n in sorted(counts.items())) or "no test finished"
    body = [f"`pytest -v {' '.join(s.plan['tests'])}` with {kind}: **{tally}** of {collected or '?'} collected "
            f"({ran.seconds:.0f} s)" + (f"; cut off while running `{running}`" if ran.timed_out and running else "")]
    if first_failure:
        body.append(f"First failure: `{first_failure}`" + ("" if ran.timed_out else ":\n\n" + (first_traceback(ran.output) or "")))
    if not ran.timed_out:
        slowest = re.search(r"slowest \d+ durations.*?\n(.*?)(?:\n\n|\n=)", ran.output, re.S)
        body.append("Slowest:\n\n```\n" + slowest[1].strip() + "\n```" if slowest else "")
    if not (ran.ok or ran.timed_out or counts):  # pytest itself failed (collection, an import)
        body.append(tail(ran.output))
    return status_of(ran), "\n\n".join(b for b in body if b)


def section_kernels(s: Section) -> tuple[str, str]:
    ran = s.run([sys.executable, os.path.join("bench", "kernels.py"), *s.plan["kernels"]])
    if ran.ok:
        return "passed", ran.output.strip()
    return status_of(ran), ("Tables measured before the cut:\n\n" + ran.output.strip() if ran.timed_out else tail(ran.output))


# The scripts' command lines, one function each, so that tests/test_gpu_check.py can parse the GPU plan's with
# the scripts' own parsers on a CPU.

def certify_command(plan: dict, work: str) -> list[str]:
    return [sys.executable, "certify.py", "--checkpoint", os.path.join(work, "finetune", "ckpt.pt"), "--data-dir", work,
            "--sigma", "0.25", "--n", str(plan["certify"]["n"]), "--num", str(plan["certify"]["num"]), "--skip", "1",
            "--batch", str(plan["certify"]["batch"]), "--precision", plan["precision"], "--out", os.path.join(work, "certify.tsv"),
            *plan["script_flags"]]


def pretrain_command(plan: dict, work: str) -> list[str]:
    return [sys.executable, "pretrain.py", "--data-dir", work, "--preset", plan["preset"], "--steps", str(plan["pretrain"]["steps"]),
            "--batch", str(plan["pretrain"]["batch"]), "--log-every", str(plan["pretrain"]["log_every"]), "--precision",
            plan["precision"], "--out", os.path.join(work, "pretrain"), *plan["script_flags"]]


def e2e_commands(plan: dict, work: str, kernels: str) -> list[list[str]]:
    """Pre-train, fine-tune and certify the tiny preset with these kernels (training with the plan's train_kernels
    where it names them), in work/<kernels>/. Training with the same kernels for both is the same commands, in
    work/<train_kernels>/: section_e2e runs them once."""
    train = plan["e2e"]["train_kernels"] or kernels
    out, trained = os.path.join(work, kernels), os.path.join(work, train)
    steps = [["pretrain.py", "--preset", "tiny", *plan["e2e"]["pretrain"], "--out", os.path.join(trained, "pretrain")],
             ["finetune.py", "--init", os.path.join(trained, "pretrain", "ckpt.pt"), "--sigma", "0.25", *plan["e2e"]["finetune"],
              "--out", os.path.join(trained, "finetune")],
             ["certify.py", "--checkpoint", os.path.join(trained, "finetune", "ckpt.pt"), "--sigma", "0.25", *plan["e2e"]["certify"],
              "--out", os.path.join(out, "certify.tsv")]]
    return [[sys.executable, *step, "--data-dir", work, "--kernels", kernels if step[0] == "certify.py" else train]
            for step in steps]


def section_certify(s: Section) -> tuple[str, str]:
    plan = s.plan["certify"]
    write_cifar(s.work, n_train=5 * 8, n_test=plan["num"])
    tsv = os.path.join(s.work, "certify.tsv")
    write_finetune_checkpoint(os.path.join(s.work, "finetune", "ckpt.pt"), s.plan["preset"])
    cmd = certify_command(s.plan, s.work)
    ran = s.run(cmd)
    seconds = certify_seconds(tsv)  # the images certified before a cut too
    if not seconds:
        return status_of(ran), f"`{' '.join(cmd[1:])}` certified no image:\n\n" + tail(ran.output)
    samples = plan["n"] + 100  # n0 = 100 selection samples, then n
    per_image = statistics.median(seconds)  # certify.py compiles before the first image: every one is steady
    rate = samples / per_image
    at_paper_n = 100_100 / rate
    mfu_percent = mfu(rate, s.plan["preset"])
    compute_limit = 100_100 * vit_config(s.plan["preset"], "cifar10").flops_per_image() / MATMUL_BF16_H200
    cut = f"; cut off after {len(seconds)} of {plan['num']} images" if ran.timed_out else ""
    return status_of(ran), (
        f"rRCM-{s.plan['preset']}, n = {plan['n']:,} (+ n0 100), {s.plan['precision']}, --batch {plan['batch']:,}: "
        f"**{per_image:.3f} s per image**, **{rate:,.0f} samples/s**"
        + (f", **MFU {mfu_percent:.1f} %**" if mfu_percent is not None else ", MFU unknown (no peak FLOP/s for this device)")
        + f"; median of {len(seconds)} images{cut}.\n\nAt the paper's n = 100,000 by proportion: **{at_paper_n:.2f} s per "
        f"image** (the paper: {PAPER_SECONDS_PER_IMAGE} s on an A800; the compute limit at {MATMUL_BF16_H200 / 1e12:.0f} "
        f"TFLOP/s, an H200's measured bf16 matmul rate: {compute_limit:.2f} s). Seconds per image: "
        + ", ".join(f"{x:.3f}" for x in seconds))


def section_pretrain(s: Section) -> tuple[str, str]:
    plan = s.plan["pretrain"]
    write_cifar(s.work, n_train=2 * plan["batch"], n_test=10)
    cmd = pretrain_command(s.plan, s.work)
    ran = s.run(cmd)
    try:
        images_per_s, logged_mfu, step = pretrain_rates(ran.output)
    except ValueError:
        return "FAILED" if ran.ok else status_of(ran), f"`{' '.join(cmd[1:])}` logged no rate:\n\n" + tail(ran.output)
    mfu_percent = window_mfu(images_per_s, s.plan["preset"]) if s.gpu else None
    mfu_text = ("MFU unknown (no peak FLOP/s for this device)" if mfu_percent is None
                else f"**MFU {mfu_percent:.1f} %** (target >= 40 %)")
    window = "step 1, compilation included" if step <= 1 else f"the log window ending at step {step}"
    logged = "no MFU" if logged_mfu is None else f"mfu {logged_mfu:.1f} %"
    cut = f"; cut off at step {step} of {plan['steps']}" if ran.timed_out else ""
    return status_of(ran), (f"rRCM-{s.plan['preset']}, batch {plan['batch']}, {s.plan['precision']}: **{images_per_s:.1f} "
                            f"images/s** over {window}, {mfu_text}{cut}; pretrain.py's line says {logged}:\n\n"
                            + tail(next(line for line in reversed(ran.output.splitlines()) if "img/s" in line)))


def section_e2e(s: Section) -> tuple[str, str]:
    """The same short tiny-preset pipeline with the fused kernels and with PyTorch's: both tables side by side."""
    if s.data_dir is None:
        return "not run", "needs --data-dir with CIFAR-10 (cifar-10-batches-py/ with data_batch_1 and test_batch at least)"
    images = partial_cifar(s.data_dir, s.work)
    rows, lines, commands_run = [], [], []
    for kernels in ("triton", "torch"):
        start = time.perf_counter()
        for cmd in e2e_commands(s.plan, s.work, kernels):
            if cmd in commands_run:  # training shared by both pipelines (the toy plan trains with PyTorch's kernels)
                continue
            commands_run.append(cmd)
            ran = s.run(cmd, interpret=kernels == "triton" and not s.gpu)
            if not ran.ok:
                done = "".join(f"- {line}\n" for line in lines)
                return status_of(ran), f"{done}\n`{' '.join(cmd[1:])}` {'was cut off' if ran.timed_out else 'failed'}:\n\n" + tail(ran.output)
            if cmd[1] == "finetune.py":
                lines.append(f"trained with {cmd[-1]}: " + next((l for l in reversed(ran.output.splitlines()) if l.startswith("epoch")), "?"))
        rows.append((kernels, os.path.join(s.work, kernels, "certify.tsv"), time.perf_counter() - start))
    import report
    import results
    runs = [results.read_tsv(tsv) for _, tsv, _ in rows]
    table = report.table([f"kernels {k} ({t:.0f} s)" for k, _, t in rows], runs)
    # Within noise: 100 images, so one standard error of a certified accuracy near 50 % is 5 points.
    radii = report.radii_for(runs)
    gaps = [abs(report.certified_accuracy(runs[0]["radius"], runs[0]["correct"], r)
                - report.certified_accuracy(runs[1]["radius"], runs[1]["correct"], r)) * 100 for r in radii]
    n = len(runs[0]["radius"])
    tolerance = 300 / math.sqrt(max(n, 1))  # three standard errors at p = 1/2, in points
    agree = max(gaps) <= tolerance
    verdict = (f"largest gap {max(gaps):.1f} points at {n} images (tolerance {tolerance:.0f} points, 3 standard errors): "
               f"**{'agree within noise' if agree else 'DIFFER'}**")
    return ("passed" if agree or not s.gpu else "FAILED"), (
        f"tiny preset on {images:,} training images (data_batch_1), {' '.join(s.plan['e2e']['pretrain'])} / "
        f"{' '.join(s.plan['e2e']['finetune'])} / {' '.join(s.plan['e2e']['certify'])}:\n\n" + "\n".join(f"- {l}" for l in lines)
        + "\n\n```\n" + table + "\n```\n\n" + verdict)


RUNNERS = dict(tests=section_tests, kernels=section_kernels, certify=section_certify, pretrain=section_pretrain, e2e=section_e2e)


# ----------------------------------------------------------------------------------------------------
# The report

@dataclass
class Outcome:
    status: str = "not run yet"  # then running, passed, FAILED, cut off, not run
    seconds: float | None = None
    body: str = ""


def device_line(gpu: bool) -> str:
    import triton
    versions = f"torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}"
    if not gpu:
        return f"CPU ({os.cpu_count()} cores), Triton interpreter, toy sizes, tiny preset; {versions}. Timings say nothing."
    major, minor = torch.cuda.get_device_capability()
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):  # no nvidia-smi: the report still comes
        driver = ""
    return (f"{torch.cuda.get_device_name()} (sm_{major}{minor}), driver {driver or '?'}, CUDA {torch.version.cuda}, "
            f"{os.cpu_count()} host cores; {versions}")


def write_report(path: str, head: str, caps: dict, outcomes: dict) -> str:
    """report.md: the summary table, then each section's body; returns the result line."""
    done = [s for s, o in outcomes.items() if o.status in ("passed", "FAILED", "cut off")]
    bad = [f"{s} {o.status}" for s, o in outcomes.items() if o.status in ("FAILED", "cut off")]
    running = [s for s, o in outcomes.items() if o.status == "running"]
    waiting = [s for s, o in outcomes.items() if o.status.startswith("not run")]
    result = (f"Result: {', '.join(bad) or 'passed'} ({len(done)} of {len(outcomes)} sections run"
              + (f"; running: {running[0]}" if running else "") + (f"; not run: {', '.join(waiting)}" if waiting else "") + ")")
    table = ["| section | status | s | cap s |", "|---|---|---|---|"] + [
        f"| {s} | {o.status} | {'' if o.seconds is None else f'{o.seconds:.0f}'} | {caps[s]:.0f} |" for s, o in outcomes.items()]
    bodies = [f"## {s} ({o.status}{'' if o.seconds is None else f', {o.seconds:.0f} s'})\n\n{o.body}"
              for s, o in outcomes.items() if o.body]
    with open(path + ".tmp", "w") as f:
        f.write(f"# GPU check\n\n{head}\n\n{result}\n\n" + "\n".join(table) + "\n\n" + "\n\n".join(bodies) + "\n")
    os.replace(path + ".tmp", path)  # a reader, or a kill, never sees half a report
    return result


def parse_caps(text: str, parser: argparse.ArgumentParser) -> dict:
    caps = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if name not in SECTIONS or not seconds > 0:
            parser.error(f"--cap takes section=seconds (> 0) with sections from {', '.join(SECTIONS)}; got {part!r}")
        caps[name] = seconds
    return caps


def stop_on_sigterm(signum: int, frame) -> None:
    raise KeyboardInterrupt  # as Ctrl-C: run() kills the running command's tree, main writes the report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="validate a GPU in one command: the kernel tests, kernel benchmarks, certify and "
                                            "pre-training speed, a short end-to-end run", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"gpu_check.py: error: {msg}")
    p.add_argument("--budget", type=float, default=480, help="seconds for all sections together; a section is cut off at "
                                                             "the end of it, one with too little left is not started")
    p.add_argument("--out", default=os.path.join("out", "gpu_check"), help="folder for report.md and one <section>.log each")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run, always in the order of the default")
    p.add_argument("--cap", default="", help="override sections' caps, e.g. tests=400,e2e=60 (seconds)")
    p.add_argument("--data-dir", default=None, help="e2e: real CIFAR-10 (cifar-10-batches-py/ with data_batch_1 and test_batch "
                                                   "at least); without it e2e is not run")
    p.add_argument("--cpu-tiny", action="store_true", help="no GPU: interpreter, toy sizes, tiny preset (the tests run this)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not only or any(s not in SECTIONS for s in only):
        p.error(f"--only takes sections from {', '.join(SECTIONS)}; got {args.only!r}")
    if not args.budget > 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget:g}")
    if args.data_dir is not None and missing_cifar(args.data_dir):
        p.error(f"--data-dir: {missing_cifar(args.data_dir)} (e2e needs real CIFAR-10)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder")
    gpu = torch.cuda.is_available() and not args.cpu_tiny
    if not (gpu or args.cpu_tiny):
        p.error("no CUDA GPU here; --cpu-tiny runs the toy version of every section")
    plan = GPU_PLAN if gpu else TINY_PLAN
    caps = plan["caps"] | parse_caps(args.cap, p)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.budget
    order = [s for s in SECTIONS if s in only]
    outcomes = {s: Outcome() for s in order}
    head = (f"{time.strftime('%Y-%m-%d %H:%M')}, {device_line(gpu)}\n\nbudget {args.budget:.0f} s; caps "
            + ", ".join(f"{s} {caps[s]:.0f} s" for s in order))
    report = os.path.join(args.out, "report.md")
    write_report(report, head, caps, outcomes)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        for name in order:
            left, least = deadline - time.perf_counter(), plan["least"][name]
            if left < least:
                outcomes[name] = Outcome("not run", None, f"{max(left, 0):.0f} s of the budget left; the section needs at least {least} s")
                write_report(report, head, caps, outcomes)
                continue
            outcomes[name] = Outcome("running")
            write_report(report, head, caps, outcomes)
            log = os.path.join(args.out, f"{name}.log")
            open(log, "w").close()
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                section = Section(plan, gpu, log, work, began + min(caps[name], left), args.data_dir)
                try:
                    status, body = RUNNERS[name](section)
                except Exception:  # a fault of this script's own: the next sections still run
                    status, body = "FAILED", "gpu_check.py itself failed:\n\n" + tail(traceback.format_exc(), 40)
            outcomes[name] = Outcome(status, time.perf_counter() - began, body)
            write_report(report, head, caps, outcomes)
            print(f"gpu_check: {name}: {status} ({outcomes[name].seconds:.0f} s)", flush=True)
    except KeyboardInterrupt:
        running = next((s for s, o in outcomes.items() if o.status == "running"), None)
        if running:
            outcomes[running] = Outcome("cut off", None, "stopped by a signal (Ctrl-C or SIGTERM); its log holds what it printed")
        write_report(report, head, caps, outcomes)
        print(f"gpu_check: stopped by a signal; report in {report}", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = write_report(report, head, caps, outcomes)
    print(f"gpu_check: {time.perf_counter() - start:.0f} s; report in {report}: {result}", flush=True)
    return 1 if any(o.status in ("FAILED", "cut off") for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
