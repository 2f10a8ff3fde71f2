"""Samples per second of smoothing.py's noise loop (Smooth.counts over rRCM, as certify.py runs it), eager and
compiled, against another revision's smoothing.py, side by side in one process: what a change to the loop costs.
The two versions take turns, one call each and in alternating order (in a fixed order the second of each pair
measured 9-10 % slower on a loaded 2-core machine), so that other work slows both alike: samples/s is the median of --reps calls, and
after / before the median of the rounds' ratios (two calls in a row see about the same load).

    python bench/noise_loop.py --against main~1                                    # tiny and S, batches 100, 500, 1000
    OMP_NUM_THREADS=1 python bench/noise_loop.py --against main~1 --presets linear,tiny --reps 9   # steadier beside other work
    python bench/noise_loop.py --against main~1 --presets tiny --batches 100 --n 500 --reps 3 --no-compile   # seconds
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import certify  # noqa: E402
import smoothing  # noqa: E402
from bench.certify import cpu_name  # noqa: E402
from model import ViT, vit_config  # noqa: E402


class Linear(torch.nn.Module):
    """--presets linear: a classifier that costs next to nothing, so that the loop's own work is what is timed."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.layer(x.flatten(1))


def smoothing_at(revision: str):
    """smoothing.py as it was at `revision`, imported as its own module."""
    source = subprocess.run(["git", "show", f"{revision}:smoothing.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "smoothing_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("smoothing_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--against", default="main~1", help="the git revision whose smoothing.py is 'before'")
    p.add_argument("--presets", default="tiny,S", help="ViT presets, and 'linear': a near-free classifier (the loop's own cost)")
    p.add_argument("--batches", default="100,500,1000")
    p.add_argument("--n", type=int, default=2000, help="samples per call")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also the compiled loop")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    versions = {"before": smoothing_at(args.against), "after": smoothing}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"{where}, torch {torch.__version__}, fp32, N = {args.n} per call, median of {args.reps}; before = {args.against}")
    print("| preset | loop | batch | before samples/s | after samples/s | after / before |\n|---|---|---|---|---|---|")
    x = torch.rand(3, 32, 32, device=device)
    for preset in args.presets.split(","):
        model = (Linear() if preset == "linear" else ViT(vit_config(preset, "cifar10"))).to(device).eval()
        for compiled in (False, True) if args.compile else (False,):
            for batch in map(int, args.batches.split(",")):
                loops = {name: module.Smooth(certify.RRCMClassifier(model, 0.25), 10, 0.25, batch=batch,
                                             compile=compiled) for name, module in versions.items()}
                seconds = {name: [] for name in loops}
                for rep in range(args.reps + 1):  # the first round warms up (compiles); then before-after, after-before, ...
                    for name, smooth in list(loops.items())[::1 if rep % 2 else -1]:
                        start = time.perf_counter()
                        smooth.counts(x, args.n, key=rep)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        if rep:
                            seconds[name].append(time.perf_counter() - start)
                rate = {name: args.n / statistics.median(s) for name, s in seconds.items()}
                paired = statistics.median(b / a for b, a in zip(seconds["before"], seconds["after"]))  # same load, one round
                print(f"| {preset} | {'compiled' if compiled else 'eager'} | {batch} | {rate['before']:,.0f} | {rate['after']:,.0f} | "
                      f"{paired:.3f} |", flush=True)


if __name__ == "__main__":
    main()
