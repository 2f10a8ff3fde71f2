"""Fingerprint what the tiny pipeline produces, to show that a change to the code leaves results as they were.

Runs pre-training, fine-tuning and certification (fixed-n and adaptive, two sigmas) of the tiny preset on a
fixed subset of real CIFAR-10, in one process (eager fp32, and compiled with --precision bf16) and in two
processes (torchrun, gloo, eager fp32), then prints one line per output: a SHA-256 of every tensor of each
checkpoint (weights, target, optimizer state, step) and of each TSV without its time column (wall-clock
seconds are the one thing a rerun may change). Run it on two versions of the code and compare:

    git stash; python bench/same_results.py --data-dir ../shared/data > before.txt; git stash pop
    python bench/same_results.py --data-dir ../shared/data > after.txt; diff before.txt after.txt

About 4 minutes on 2 cores.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EAGER = ["--no-compile", "--kernels", "torch", "--precision", "fp32"]
PRETRAIN = ["--preset", "tiny", "--train-images", "64", "--batch", "16", "--steps", "4", "--warmup", "2", "--log-every", "1"]
FINETUNE = ["--train-images", "64", "--batch", "16", "--epochs", "2", "--warmup-epochs", "1", "--eval-images", "40"]
CERTIFY = ["--sigma", "0.25,0.5", "--n0", "100", "--num", "4", "--skip", "500"]


def tensor_digest(value) -> str:
    """SHA-256 over every tensor and number in a (nested) checkpoint value, in key order."""
    h = hashlib.sha256()

    def walk(v, name):
        if torch.is_tensor(v):
            h.update(f"{name}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k], f"{name}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(item, f"{name}.{i}")
        elif isinstance(v, (int, float, bool)) or v is None:
            h.update(f"{name}={v!r}".encode())
    walk(value, "")
    return h.hexdigest()[:16]


def checkpoint_lines(path: str) -> list[str]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return [f"{os.path.basename(os.path.dirname(path))} {part} {tensor_digest(ckpt[part])}"
            for part in ("model", "target", "optimizer", "step", "model_args") if part in ckpt]


def tsv_line(path: str) -> str:
    """The TSV without its time column (the sixth)."""
    with open(path) as f:
        rows = ["\t".join(f for i, f in enumerate(line.rstrip("\n").split("\t")) if i != 5) for line in f]
    return f"{os.path.basename(path)} {hashlib.sha256(chr(10).join(rows).encode()).hexdigest()[:16]} ({len(rows) - 1} rows)"


def run(cmd: list[str], procs: int) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "--"]
                if procs > 1 else [sys.executable])
    env = os.environ | {"OMP_NUM_THREADS": "1"} if procs > 1 else os.environ
    done = subprocess.run(launcher + cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def pipeline(out: str, data_dir: str, procs: int, flags: list[str]) -> list[str]:
    shards = ["--shards", "2"]
    run(["pretrain.py", *PRETRAIN, "--data-dir", data_dir, "--out", f"{out}/pre", *shards, *flags], procs)
    run(["finetune.py", "--init", f"{out}/pre/ckpt.pt", *FINETUNE, "--data-dir", data_dir, "--out", f"{out}/ft",
         *shards, *flags], procs)
    lines = checkpoint_lines(f"{out}/pre/ckpt.pt") + checkpoint_lines(f"{out}/ft/ckpt.pt")
    for mode, extra in (("fixed", ["--n", "1000", "--batch", "500"]), ("adaptive", ["--n", "1000", "--batch", "500", "--adaptive"])):
        run(["certify.py", "--checkpoint", f"{out}/ft/ckpt.pt", *CERTIFY, *extra, "--data-dir", data_dir,
             "--out", f"{out}/{mode}.tsv", *flags], procs)
        lines += [tsv_line(f"{out}/{mode}_sigma{s}.tsv") for s in ("0.25", "0.5")]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/")
    args = p.parse_args()
    data_dir = os.path.abspath(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for name, procs, flags in (("1 process, eager fp32", 1, EAGER), ("2 processes, eager fp32", 2, EAGER),
                                   ("1 process, compiled bf16", 1, ["--kernels", "torch", "--precision", "bf16"])):
            print(f"# {name}", flush=True)
            for line in pipeline(os.path.join(tmp, name.replace(" ", "_").replace(",", "")), data_dir, procs, flags):
                print(line, flush=True)


if __name__ == "__main__":
    main()
