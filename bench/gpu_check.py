"""Validate a GPU, one section per command, each sized to end well inside 10 minutes on an H100:

  tests     the whole test suite on the real Triton kernels (RRCM_TEST_GPU=1 turns the interpreter off);
  kernels   bench/kernels.py: attention against SDPA at L = 66 and 198, InfoNCE against the unfused
            reference at B = M = 4096 .. 32768 with peak memory, cross-entropy at C = 10 and 1000;
  certify   certify.py's seconds per image for rRCM-B at N = 100,000, bf16, compiled, with samples/s and MFU;
  pretrain  pretrain.py's images/s and MFU for rRCM-B, compiled, bf16;
  e2e       a short tiny-preset run on real CIFAR-10 (pre-train, fine-tune, certify 100 images at n = 1,000)
            with the fused kernels and again with --kernels torch: the two tables must agree within noise.

    python bench/gpu_check.py --only tests                         # one section per command; report in out/gpu_check.md
    python bench/gpu_check.py --only kernels,certify
    python bench/gpu_check.py --only e2e --data-dir data           # needs data_batch_1 and test_batch at least
    python bench/gpu_check.py --cpu-tiny                           # CPU, interpreter, toy sizes: every section in seconds

Each section writes out/gpu_check/<section>.md (and its raw output, <section>.log, as it runs) the moment it
ends, then out/gpu_check.md is rebuilt from every section file there: a time-out or a failure in one section
loses nothing the others measured, and sections run in separate commands add up to one report. The scripts
run as a user runs them, through their command lines, on a synthetic CIFAR-10 (random pixels, official pickle
layout) and randomly initialised checkpoints, except e2e: speed does not depend on what the weights learned.
`--cpu-tiny` runs every section at toy size, so that tests/test_gpu_check.py notices when a change to a script
breaks this one.
"""
import argparse
import contextlib
import math
import os
import pickle
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jobs import peak_bf16_flops, save_checkpoint  # noqa: E402
from model import ViT, vit_config  # noqa: E402

SECTIONS = ("tests", "kernels", "certify", "pretrain", "e2e")
# Sizes per mode. GPU: rRCM-B at the paper's N for certify (4 images; --batch 10000 also launches attention over
# 120,000 heads, past the old 65,535 grid limit), pre-training at batch 1024 (2048 does not fit 80 GB with three
# online passes), each section under ~8 minutes of an H100 including compilation (`timeout` per section).
GPU_PLAN = dict(tests=["tests"], kernels=[], preset="B", precision="bf16", certify_n=100_000, certify_num=4, certify_batch=10_000,
                pretrain_steps=200, pretrain_batch=1024, log_every=50, script_flags=[], timeout=540,
                e2e=dict(pretrain=["--steps", "1500", "--batch", "256", "--warmup", "100"],
                         finetune=["--epochs", "5", "--warmup-epochs", "1", "--batch", "256", "--train-head", "--eval-images", "1000"],
                         certify=["--n", "1000", "--num", "100", "--skip", "100", "--batch", "1000"]))
# Tiny: fp32, since bf16 without native CPU support is emulated and about 20x slower on such CPUs.
TINY_PLAN = dict(tests=["tests/test_kernels.py", "-k", "cross_entropy_matches"], kernels=["--tiny"],
                 preset="tiny", precision="fp32", certify_n=100, certify_num=1, certify_batch=100, pretrain_steps=1, pretrain_batch=8,
                 log_every=1, script_flags=["--no-compile", "--kernels", "torch"], timeout=300,
                 # e2e: the fused kernels run under the interpreter (~10 ms a Triton program): two images at a time
                 e2e=dict(pretrain=["--steps", "1", "--batch", "2", "--warmup", "0", "--no-compile", "--precision", "fp32"],
                          finetune=["--epochs", "1", "--warmup-epochs", "0", "--batch", "2", "--train-images", "2", "--train-head",
                                    "--eval-images", "2", "--no-compile", "--precision", "fp32"],
                          certify=["--n0", "2", "--n", "2", "--num", "1", "--skip", "1", "--batch", "100", "--no-compile",
                                   "--precision", "fp32"]))


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


def run(cmd: list[str], timeout: float, log: str, env: dict | None = None, interpret: bool = False) -> tuple[bool, str, float]:
    """(exit status 0, stdout + stderr, seconds) of a command run from the repository root, its output also
    written to `log` line by line as it comes (a section cut off by a time-out keeps what it printed). The
    scripts decide about the interpreter themselves (the tests' conftest, bench/kernels.py without a GPU),
    so an inherited TRITON_INTERPRET is dropped: certify.py and pretrain.py must run the real thing, unless
    `interpret` (--cpu-tiny's --kernels triton). At the deadline a timer kills the command and every process
    below it, whether or not it is printing: a silent hang, or torchrun's ranks, cannot outlive the budget
    (nor keep a GPU busy during the next section); so does Ctrl-C here."""
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"} | {"PYTHONUNBUFFERED": "1"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if timeout <= 0:
        return False, "no time left in this section's budget\n", 0.0
    start, lines, expired = time.perf_counter(), [], threading.Event()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
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
                f.write(line)
                f.flush()
            proc.wait()
        except BaseException:  # Ctrl-C: leave nothing running
            kill_tree(proc.pid)
            raise
        finally:
            timer.cancel()
        if expired.is_set():
            lines.append(f"timed out after {timeout:.0f} s\n")
            f.write(lines[-1])
            return False, "".join(lines), time.perf_counter() - start
    return proc.returncode == 0, "".join(lines), time.perf_counter() - start


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


def partial_cifar(source: str, folder: str) -> int:
    """A CIFAR-10 folder from whatever batch files `source` holds (a GPU machine may carry only data_batch_1 and
    test_batch): those are linked, each missing training file is written empty. Returns the training images."""
    src, dst = os.path.join(source, "cifar-10-batches-py"), os.path.join(folder, "cifar-10-batches-py")
    if not os.path.isfile(os.path.join(src, "test_batch")):
        raise SystemExit(f"gpu_check.py: error: e2e needs real CIFAR-10: {src}/test_batch is missing")
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
    if images == 0:
        raise SystemExit(f"gpu_check.py: error: e2e needs at least one CIFAR-10 training file (data_batch_1) in {src}")
    return images


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
    return mfu(images_per_s * pretrain.forwards_per_image(symmetric=False), preset)


# ----------------------------------------------------------------------------------------------------
# Sections: each returns (passed, markdown body)

def section_tests(plan: dict, gpu: bool, log: str) -> tuple[bool, str]:
    env = dict(os.environ, RRCM_TEST_GPU="1" if gpu else "0")
    ok, out, seconds = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan["tests"]], plan["timeout"], log, env)
    summary = next((line for line in reversed(out.splitlines()) if " passed" in line or " failed" in line), "no summary")
    kind = "real Triton kernels on the GPU" if gpu else "Triton interpreter (CPU)"
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    body = f"`pytest -q {' '.join(plan['tests'])}` with the {kind}: **{summary.strip('= ')}** ({seconds:.0f} s)"
    return ok, body if ok else body + "\n\n" + "\n".join(failures[:40]) + "\n\n" + tail(out)


def section_kernels(plan: dict, gpu: bool, log: str) -> tuple[bool, str]:
    ok, out, _ = run([sys.executable, os.path.join("bench", "kernels.py"), *plan["kernels"]], plan["timeout"], log)
    return ok, out.strip() if ok else tail(out)


def section_certify(plan: dict, gpu: bool, log: str, work: str) -> tuple[bool, str]:
    write_cifar(work, n_train=5 * 8, n_test=plan["certify_num"])
    ckpt, tsv = os.path.join(work, "finetune", "ckpt.pt"), os.path.join(work, "certify.tsv")
    write_finetune_checkpoint(ckpt, plan["preset"])
    cmd = [sys.executable, "certify.py", "--checkpoint", ckpt, "--data-dir", work, "--sigma", "0.25", "--n", str(plan["certify_n"]),
           "--num", str(plan["certify_num"]), "--skip", "1", "--batch", str(plan["certify_batch"]), "--precision", plan["precision"],
           "--out", tsv, *plan["script_flags"]]
    ok, out, _ = run(cmd, plan["timeout"], log)
    if not ok:
        return False, f"`{' '.join(cmd[1:])}` failed:\n\n" + tail(out)
    seconds = certify_seconds(tsv)
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    samples = plan["certify_n"] + 100  # n0 = 100 selection samples, then n
    mfu_percent = mfu(samples / steady, plan["preset"])
    return True, (f"rRCM-{plan['preset']}, N = {plan['certify_n']:,}, {plan['precision']}, --batch {plan['certify_batch']}: "
                  f"**{steady:.2f} s per image** ({samples / steady:,.0f} samples/s"
                  + (f", MFU {mfu_percent:.1f} %" if mfu_percent is not None else "") + f"; median of images 2..{len(seconds)}; "
                  f"the first took {seconds[0]:.2f} s). Seconds per image: " + ", ".join(f"{s:.2f}" for s in seconds))


def section_pretrain(plan: dict, gpu: bool, log: str, work: str) -> tuple[bool, str]:
    write_cifar(work, n_train=2 * plan["pretrain_batch"], n_test=10)
    cmd = [sys.executable, "pretrain.py", "--data-dir", work, "--preset", plan["preset"], "--steps", str(plan["pretrain_steps"]),
           "--batch", str(plan["pretrain_batch"]), "--log-every", str(plan["log_every"]), "--precision", plan["precision"],
           "--out", os.path.join(work, "pretrain"), *plan["script_flags"]]
    ok, out, _ = run(cmd, plan["timeout"], log)
    if not ok:
        return False, f"`{' '.join(cmd[1:])}` failed:\n\n" + tail(out)
    images_per_s, logged_mfu = pretrain_rates(out)
    mfu_percent = window_mfu(images_per_s, plan["preset"]) if gpu else None
    mfu_text = "MFU unknown (no peak FLOP/s for this device)" if mfu_percent is None else f"MFU **{mfu_percent:.1f} %** at that rate"
    logged = "no MFU" if logged_mfu is None else f"mfu {logged_mfu:.1f} %"
    return True, (f"rRCM-{plan['preset']}, batch {plan['pretrain_batch']}, {plan['pretrain_steps']} steps: "
                  f"**{images_per_s:.1f} images/s** over the last log window, {mfu_text}; pretrain.py's last "
                  f"line says {logged}:\n\n" + tail(next(line for line in reversed(out.splitlines()) if "img/s" in line)))


def section_e2e(plan: dict, gpu: bool, log: str, work: str, data_dir: str | None) -> tuple[bool, str]:
    """The same short tiny-preset pipeline with the fused kernels and with PyTorch's: both tables side by side."""
    if data_dir is None and gpu:
        raise SystemExit("gpu_check.py: error: --only e2e needs --data-dir with real CIFAR-10 (data_batch_1 and test_batch at least)")
    if data_dir is None:  # --cpu-tiny: the synthetic images only check that the section runs
        write_cifar(work, n_train=5 * 8, n_test=4)
        images = 40
    else:
        images = partial_cifar(data_dir, work)
    rows, lines = [], []
    deadline = time.perf_counter() + plan["timeout"]  # both pipelines together: one command on a 10-minute budget
    for kernels in ("triton", "torch"):
        out = os.path.join(work, kernels)
        steps = [["pretrain.py", "--preset", "tiny", *plan["e2e"]["pretrain"], "--out", os.path.join(out, "pretrain")],
                 ["finetune.py", "--init", os.path.join(out, "pretrain", "ckpt.pt"), "--sigma", "0.25", *plan["e2e"]["finetune"],
                  "--out", os.path.join(out, "finetune")],
                 ["certify.py", "--checkpoint", os.path.join(out, "finetune", "ckpt.pt"), "--sigma", "0.25", *plan["e2e"]["certify"],
                  "--out", os.path.join(out, "certify.tsv")]]
        start = time.perf_counter()
        for step in steps:
            cmd = [sys.executable, *step, "--data-dir", work, "--kernels", kernels]
            ok, text, _ = run(cmd, deadline - time.perf_counter(), log, interpret=kernels == "triton" and not gpu)
            if not ok:
                return False, f"`{' '.join(cmd[1:])}` failed:\n\n" + tail(text)
            if step[0] == "finetune.py":
                lines.append(f"{kernels}: " + next(line for line in reversed(text.splitlines()) if line.startswith("epoch")))
        rows.append((kernels, os.path.join(out, "certify.tsv"), time.perf_counter() - start))
    import report
    import results
    runs = [results.read_tsv(tsv) for _, tsv, _ in rows]
    table = report.table([f"kernels {k} ({s:.0f} s)" for k, _, s in rows], runs)
    # Within noise: 100 images, so one standard error of a certified accuracy near 50 % is 5 points.
    radii = report.radii_for(runs)
    gaps = [abs(report.certified_accuracy(runs[0]["radius"], runs[0]["correct"], r)
                - report.certified_accuracy(runs[1]["radius"], runs[1]["correct"], r)) * 100 for r in radii]
    n = len(runs[0]["radius"])
    tolerance = 300 / math.sqrt(max(n, 1))  # three standard errors at p = 1/2, in points
    ok = max(gaps) <= tolerance or not gpu
    verdict = (f"largest gap {max(gaps):.1f} points at {n} images (tolerance {tolerance:.0f} points, 3 standard errors): "
               f"**{'agree within noise' if max(gaps) <= tolerance else 'DIFFER'}**")
    return ok, (f"tiny preset on {images:,} training images, {' '.join(plan['e2e']['pretrain'])} / "
                f"{' '.join(plan['e2e']['finetune'])} / {' '.join(plan['e2e']['certify'])}:\n\n" + "\n".join(f"- {l}" for l in lines)
                + "\n\n```\n" + table + "\n```\n\n" + verdict)


def device_line(gpu: bool) -> str:
    import triton
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if not gpu:
        return f"CPU ({os.cpu_count()} cores), Triton interpreter, toy sizes, tiny preset; {versions}. Timings say nothing."
    major, minor = torch.cuda.get_device_capability()
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    return (f"{torch.cuda.get_device_name()} (sm_{major}{minor}), driver {driver.stdout.strip() or '?'}, CUDA {torch.version.cuda}, "
            f"{versions}")


def write_report(folder: str, path: str) -> str:
    """out/gpu_check.md from every section file in `folder`, in SECTIONS order; returns its result line."""
    done = [s for s in SECTIONS if os.path.isfile(os.path.join(folder, f"{s}.md"))]
    bodies = {s: open(os.path.join(folder, f"{s}.md")).read().strip() for s in done}
    failed = [s for s in done if bodies[s].splitlines()[0].endswith("(FAILED)")]
    missing = [s for s in SECTIONS if s not in done]
    result = (f"Result: {'FAILED: ' + ', '.join(failed) if failed else 'passed'} ({len(done)} of {len(SECTIONS)} sections run"
              + (f"; not run yet: {', '.join(missing)}" if missing else "") + ")")
    with open(path, "w") as f:
        f.write(f"# GPU check\n\n{result}\n\n" + "\n\n".join(bodies[s] for s in done) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="validate a GPU: tests, kernel benchmarks, certify and pre-training speed, a short "
                                            "end-to-end run", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"gpu_check.py: error: {msg}")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run, one command each on a "
                                                                "10-minute budget")
    p.add_argument("--cpu-tiny", action="store_true", help="no GPU: interpreter, toy sizes, tiny preset (runs in the tests)")
    p.add_argument("--data-dir", default=None, help="e2e: real CIFAR-10 (cifar-10-batches-py/ with data_batch_1 and test_batch at least)")
    p.add_argument("--out", default=os.path.join("out", "gpu_check.md"), help="the markdown report; sections go beside it, in "
                                                                               "<out without .md>/")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        p.error(f"--only takes sections from {', '.join(SECTIONS)}; got {args.only!r}")
    gpu = torch.cuda.is_available() and not args.cpu_tiny
    if not (gpu or args.cpu_tiny):
        p.error("no CUDA GPU here; --cpu-tiny runs the toy version of every section")
    plan = GPU_PLAN if gpu else TINY_PLAN
    folder = os.path.splitext(args.out)[0]
    os.makedirs(folder, exist_ok=True)
    failed, device = [], device_line(gpu)
    for section in only:
        log = os.path.join(folder, f"{section}.log")
        open(log, "w").close()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            if section == "tests":
                ok, body = section_tests(plan, gpu, log)
            elif section == "kernels":
                ok, body = section_kernels(plan, gpu, log)
            elif section == "certify":
                ok, body = section_certify(plan, gpu, log, work)
            elif section == "pretrain":
                ok, body = section_pretrain(plan, gpu, log, work)
            else:
                ok, body = section_e2e(plan, gpu, log, work, args.data_dir)
        seconds = time.perf_counter() - start
        with open(os.path.join(folder, f"{section}.md"), "w") as f:
            f.write(f"## {section}{'' if ok else ' (FAILED)'}\n\n{time.strftime('%Y-%m-%d %H:%M')}, {device}; "
                    f"{seconds:.0f} s\n\n{body}\n")
        print(f"gpu_check: {section}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s)", flush=True)
        failed += [] if ok else [section]
        result = write_report(folder, args.out)
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'ok'} this run; report in {args.out}: {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
