"""Pre-training in micro-batches (GradCache) against the whole batch: one step of rRCM-B per configuration, each in a
fresh process, side by side in one run: peak resident memory (the kernel's VmHWM), images/s of the step, and the
memory check's estimate (trainer.Trainer.micro_batch) beside them.

    python bench/micro_batch.py --data-dir ../shared/data                         # batches 256, 512, 2048
    python bench/micro_batch.py --data-dir ../shared/data --preset tiny --batches 64,128 --micro 16   # quick

A configuration "auto" lets pretrain.py choose from the free memory, as its default does.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import sys
sys.argv = ["pretrain.py", *sys.argv[1:]]
import jobs, pretrain
try:
    pretrain.main(sys.argv[1:])
except jobs.UsageError as e:
    print(f"refused: {e}")
print("VmHWM", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def one_step(data_dir: str, preset: str, batch: int, micro: str | None, out: str) -> dict:
    cmd = [sys.executable, "-c", CHILD, "--data-dir", data_dir, "--preset", preset, "--steps", "1", "--batch", str(batch),
           "--warmup", "0", "--log-every", "1", "--no-compile", "--kernels", "torch", "--out", out]
    if micro not in (None, "auto"):
        cmd += ["--micro-batch", micro]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    text = done.stdout + done.stderr
    rate = re.search(r"step 1/1 .*?\| ([\d.]+) img/s", text)
    memory = re.search(r"^memory: (.*)$", text, re.M)
    refused = re.search(r"^refused: (.*)$", text, re.M)
    peak = re.search(r"VmHWM (\d+)", text)
    return dict(batch=batch, micro=micro or "whole", rate=float(rate[1]) if rate else None, seconds=time.time() - start,
                peak_gb=int(peak[1]) * 1024 / 1e9 if peak else None, check=(memory or refused)[1] if (memory or refused) else text[-300:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--preset", default="B")
    p.add_argument("--batches", default="256,512,2048")
    p.add_argument("--micro", default="32", help="the micro-batch compared with the whole batch")
    args = p.parse_args()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for micro in (None, args.micro) if batch <= 512 else ("auto",):
            with tempfile.TemporaryDirectory() as out:
                rows.append(one_step(os.path.abspath(args.data_dir), args.preset, batch, micro, out))
            r = rows[-1]
            print(f"| {r['batch']} | {r['micro']} | {r['peak_gb'] or 0:.1f} | {r['rate'] or 0:.2f} | {r['seconds']:.0f} | {r['check']} |", flush=True)


if __name__ == "__main__":
    main()
