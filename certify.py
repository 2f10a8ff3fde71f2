"""Stage 3: certify the fine-tuned classifier with randomized smoothing (Cohen et al. 2019).

The statistics and the noise loop are the library `smoothing.py` (CERTIFY, PREDICT, adaptive CERTIFY for any
base classifier); this script is the job around it: the checkpoint and test images, the results files,
processes, resume and progress. rRCM is wrapped as a base classifier of noisy pixels (`RRCMClassifier`).

CERTIFY, for each test image x:
  1. draw n0 noisy copies x + sigma * eps, take the most frequent class cA (selection);
  2. draw n fresh copies, count nA = how often cA wins (estimation);
  3. pA_lower = one-sided (1 - alpha) Clopper-Pearson lower bound on P(f(x + sigma eps) = cA);
  4. if pA_lower < 1/2 abstain, else certify cA with L2 radius sigma * Phi^-1(pA_lower).
Guarantee: with probability at least 1 - alpha over the noise, the smoothed classifier g returns cA for
every x' with ||x' - x||_2 < radius, and (when it does not abstain) it is g's prediction at x.
PREDICT (--predict): n copies, return the top class unless a two-sided binomial test of the top two
counts has p-value > alpha (abstain); with probability >= 1 - alpha it does not return a wrong g(x).
Adaptive CERTIFY (--adaptive): the n estimation samples are looked at after 100, 200, 400, 800, ... and
sampling stops once more samples cannot change the image's row of the certified-accuracy table at the
reported radii, with the same guarantee; see `smoothing.certify_adaptive` for the price.

Every --sigma is certified in turn, each into its own TSV (--out c.tsv: c_sigma0.25.tsv, ...); the default is
the released certify.py's 0.25, 0.5 and 1.0 (paper Table 9 crosses them with the fine-tuning sigmas; Table 2
is the best of the grid). Noise is N(0, sigma^2) in pixel space [0, 1] (where radii are measured; see
model.py), one stream per (image index, phase, chunk of 100 samples) that no other chunk of the image shares
(smoothing.stream_seed): results do not depend on --batch or on how many processes share the images.
Everything is checked (flags, checkpoint, test images, existing results) before anything is written.

    python certify.py --checkpoint out/finetune_sigma0.25/ckpt.pt --n 100000              # sigma 0.25, 0.5, 1.0
    python certify.py --checkpoint out/finetune_sigma0.25/ckpt.pt --sigma 0.25 --adaptive
    torchrun --standalone --nproc_per_node=8 -- certify.py --checkpoint ... --sigma 0.25
Output: per sigma a TSV `idx label predict radius correct time` (adaptive runs add `samples`, the estimation
samples drawn), appended and flushed per image; re-running the same command continues after a kill or
Ctrl-C. One run writes a file at a time (a lock beside it). Then a table of certified accuracy by radius.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import time
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

import torch
import torch.distributed as dist

import kernels
import smoothing
from data import Images
from jobs import clock, init_distributed
from model import (PRECISIONS, UsageError, load_checkpoint, model_from_checkpoint, resolve_precision, select_kernels,
                   smoothing_time, to_model_space)
from report import ADAPTIVE_HEADER, HEADER, ReportError, check_rows, read_tsv, summary, table
from smoothing import CHUNK, AdaptivePlan, Smooth

PAPER_SIGMAS = "0.25,0.5,1.0"  # the released certify.py's --sigmas default (as of Dec 2024 and today)
DEFAULT_SKIP = {"cifar10": 20, "imagenet": 100}  # Carlini et al. 2022: 500 of CIFAR-10's 10k, 500 of ImageNet's 50k
PAPER_RADII = {"cifar10": [0.0, 0.25, 0.5, 0.75, 1.0],  # the radii of the paper's tables (Tables 1, 2, 9)
               "imagenet": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}
NOISE = "smoothing.stream_seed"  # recorded in each .json: files written with the old per-chunk seeds are not continued
PROGRESS_EVERY = 30.0  # seconds between progress lines inside one long image
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # Ctrl-C, and what cluster schedulers send before preemption


def _sigmas(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="randomized-smoothing certification", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: sys.exit(f"certify.py: error: {msg}")
    p.add_argument("--checkpoint", default="out/finetune_sigma0.25/ckpt.pt", help="a finetune.py checkpoint")
    p.add_argument("--sigma", type=_sigmas, default=PAPER_SIGMAS, help="smoothing noise stds in pixel space, comma-separated, "
                                                                      "certified in turn, one TSV each (the released grid)")
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=100_000, help="estimation samples (adaptive: at most)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--predict", action="store_true", help="run PREDICT instead of CERTIFY")
    p.add_argument("--adaptive", action="store_true", help="stop sampling an image once more samples cannot change its row of the "
                                                              "certified-accuracy table (alpha split over the looks)")
    p.add_argument("--stages", default=None, help="adaptive: comma-separated sample counts of the looks before n (multiples of 100); "
                                                  "default 100, 200, 400, 800, ... (doubling) below n")
    p.add_argument("--radii", default=None, help="adaptive: comma-separated radii the table reports (at most 4 decimals); default "
                                                 "the paper's: CIFAR-10 0, 0.25, ..., 1.0, ImageNet 0, 0.5, ..., 3.0; radii "
                                                 "above what n samples can certify at that sigma are left out")
    p.add_argument("--num", type=int, default=500, help="how many test images")
    p.add_argument("--skip", type=int, default=None, help="certify every skip-th test image; default 20 for CIFAR-10 (500 of 10k), "
                                                          "100 for ImageNet (500 of 50k)")
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass (multiple of 100)")
    p.add_argument("--data-dir", default="data", help="where the test images are (CIFAR-10 is downloaded there if missing)")
    p.add_argument("--out", default=None, help="TSV path; with several sigmas _sigma<sigma> goes before its extension (c.tsv: "
                                               "c_sigma0.25.tsv, ...); default out/certify/<checkpoint dir>_sigma<sigma>.tsv")
    p.add_argument("--seed", type=int, default=0, help="seed of the smoothing noise")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="bf16 autocast or fp32; auto: bf16 where the "
                                                                            "hardware has native bf16 (CUDA, AMX/AVX512-BF16 CPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the noise loop")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend(), help="fused Triton kernels or the PyTorch reference")
    args = p.parse_args(argv)  # argparse passes the default string through `type` too
    if not all(math.isfinite(s) and s > 0 for s in args.sigma):
        p.error(f"--sigma must be > 0 and finite, got {','.join(f'{s:g}' for s in args.sigma)}")
    if len(set(args.sigma)) != len(args.sigma):
        p.error(f"--sigma lists a value twice: {','.join(f'{s:g}' for s in args.sigma)}")
    for path in [out_path(args, s) for s in args.sigma] if args.out else ():
        if os.path.isdir(path):
            p.error(f"--out {path} is a directory; give a file name for the TSV")
    for name in ("n0", "n", "num", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.skip is not None and args.skip < 1:
        p.error("--skip must be >= 1")
    if not 0 < args.alpha < 1:
        p.error(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.batch % CHUNK:
        p.error(f"--batch must be a multiple of {CHUNK}, got {args.batch}")
    if (args.stages is not None or args.radii is not None) and not args.adaptive:
        p.error("--stages and --radii need --adaptive")
    if args.adaptive and args.predict:
        p.error("--adaptive applies to CERTIFY, not --predict")
    if args.adaptive:
        try:
            args.stages = adaptive_stages(args.n, args.stages)
            args.radii = None if args.radii is None else parse_radii(args.radii)
        except ValueError as e:
            p.error(str(e))
    return args


def adaptive_stages(n: int, stages: str | None) -> list[int]:
    """The looks n_1 < ... < n_K = n, multiples of CHUNK, so that look k's samples are exactly the first n_k
    samples of a fixed-n run: an adaptive run that goes to n sees the very counts CERTIFY sees."""
    if n % CHUNK:
        raise ValueError(f"--adaptive needs --n to be a multiple of {CHUNK}, got {n}")
    if stages is None:
        return smoothing.default_looks(n)
    try:
        looks = [int(s) for s in stages.split(",")]
    except ValueError:
        raise ValueError(f"--stages must be comma-separated integers, got {stages}") from None
    if any(s < CHUNK or s % CHUNK for s in looks):
        raise ValueError(f"--stages must be multiples of {CHUNK}, got {stages}")
    return sorted({s for s in looks if s < n} | {n})


def parse_radii(text: str) -> list[float]:
    """--radii: finite, >= 0, at most 4 decimals -- the TSV floors radii to 4 decimals, so a radius with more
    could count as certified when sampling stops and not in the table."""
    radii = []
    for part in text.split(","):
        try:
            value = Decimal(part.strip())
        except InvalidOperation:
            raise ValueError(f"--radii must be numbers, got {text}") from None
        if not value.is_finite() or value < 0 or value.as_tuple().exponent < -4:
            raise ValueError(f"--radii must be finite, >= 0 and have at most 4 decimals, got {text}")
        radii.append(float(value))
    return sorted(set(radii))


# ----------------------------------------------------------------------------------------------------
# rRCM as a base classifier

class RRCMClassifier(torch.nn.Module):
    """rRCM as a base classifier f of noisy images in pixel space [0, 1] (what smoothing.Smooth feeds it:
    x + sigma eps): normalised to the model's [-1, 1] and told the time 2 sigma snapped to the pre-training
    grid (model.smoothing_time), as the released code does. Only the time input is snapped: the noise is
    exactly sigma, added in pixel space where the radii are measured."""

    def __init__(self, model: torch.nn.Module, sigma: float):
        super().__init__()
        self.model, self.t = model, smoothing_time(sigma)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.model(to_model_space(noisy), self.t)


# ----------------------------------------------------------------------------------------------------
# Results file: one writer, append-only, whole lines only, resumable, never mixed across configurations

def floor_radius(radius: float) -> str:
    """The radius as the TSV holds it: rounded *down* to 4 decimals, so the written certificate is never
    larger than the computed one (0.24996 is 0.2499, not 0.2500, which would count at r = 0.25)."""
    return str(Decimal(radius).quantize(Decimal("0.0001"), rounding=ROUND_FLOOR))


def certified_indices(num_images: int, skip: int, num: int) -> list[int]:
    """Every skip-th test image, at most num of them. ImageNet's val folder is sorted by class, 50 images
    each, so skip 100 gives one image from each of 500 classes."""
    return list(range(0, num_images, skip))[:num]


def lock_results(path: str):
    """Take the one-writer lock: an exclusive flock on `path`.lock. The kernel drops it when the process
    dies, even by SIGKILL, so a killed run never leaves it stuck. Returns the lock file: closing it unlocks."""
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a directory; give a file name for the TSV")
    folder = os.path.dirname(os.path.abspath(path))
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {path}: {parent} is not a directory")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"{path} is being written by another certify.py run; wait for it or choose another --out") from None
    return lock


def has_rows(path: str) -> bool:
    """Whether `path` holds anything but nothing or a certification header (with perhaps a torn first row)."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    first, _, rest = data.partition(b"\n")
    return not (data == b"" or (first.decode(errors="replace") in (HEADER, ADAPTIVE_HEADER) and b"\n" not in rest))


def read_done(path: str, header: str) -> set[int]:
    """Indices of the images already certified. A torn last line (a kill mid-write) is cut off the file; any
    other malformed line is refused, leaving the file as it is."""
    with open(path, "rb") as f:
        data = f.read()
    whole = data[: data.rfind(b"\n") + 1]
    try:
        rows = check_rows(path, whole, header)
    except ReportError as e:
        raise UsageError(f"{e}; not appending to it") from None
    if len(whole) != len(data):
        with open(path, "rb+") as f:
            f.truncate(len(whole))
    return {int(row[0]) for row in rows}


class Results:
    """One TSV and its sidecar .json of the configuration, with the lock held. Nothing is written before the
    first row: a run that stops (or is refused) before that leaves only the empty lock file, and a file
    without rows is simply started afresh -- there are no results in it to mix."""

    def __init__(self, path: str, config: dict, header: str):
        self.path, self.config, self.header, self.meta = path, config, header, path + ".json"
        self.fresh = not has_rows(path)
        self.done = set()
        if not self.fresh:
            try:
                with open(self.meta) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                raise UsageError(f"{path} has results but no readable {self.meta}; refusing to mix results") from None
            if previous != config:
                diff = ", ".join(k for k in config if previous.get(k) != config[k])
                raise UsageError(f"{path} holds results of a different configuration ({diff}); choose another --out")
            self.done = read_done(path, header)

    def append(self, rows: list[str]) -> None:
        """Append whole lines (the first time: the .json, then a new file with the header). SIGINT/SIGTERM are
        held back until the lines are on disk, so a stop never tears one (a SIGKILL can; read_done cuts that
        torn line on the next run)."""
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.fresh:
                with open(self.meta, "w") as f:
                    json.dump(self.config, f, indent=1)
            with open(self.path, "w" if self.fresh else "a") as f:
                f.write((self.header + "\n" if self.fresh else "") + "".join(row + "\n" for row in rows))
                f.flush()
                os.fsync(f.fileno())
            self.fresh = False
        except OSError as e:
            raise UsageError(f"cannot write {self.path}: {e.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop, keeping the whole lines already written."""


def raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


# ----------------------------------------------------------------------------------------------------
# Progress a person can read

class Progress:
    """image k / total, samples/s, elapsed and ETA after each image, and a line every PROGRESS_EVERY seconds
    inside a long one (rRCM-B on a CPU at n = 100,000 takes over an hour per image), so the first estimate
    of how long the run takes comes within a minute. Adaptive runs draw at most n0 + n: the ETA is an upper
    bound there."""

    def __init__(self, done_before: int, total: int, todo: int, per_image: int, world: int, upper: bool, show: bool):
        self.done, self.total, self.left, self.per_image, self.world = done_before, total, todo, per_image, world
        self.prefix, self.show = ("ETA <= " if upper else "ETA "), show
        self.start = self.last = time.time()
        self.samples = self.in_image = 0  # this process, this run / the current image

    def line(self, head: str) -> str:
        elapsed = time.time() - self.start
        rate = self.samples / max(elapsed, 1e-9)
        remaining = math.ceil(self.left / self.world) * self.per_image - self.in_image
        eta = clock(remaining / rate) if rate > 0 else "?"
        return f"{head} | {rate:,.0f} samples/s | elapsed {clock(elapsed)} | {self.prefix}{eta}"

    def tick(self, count: int) -> None:
        self.samples += count
        self.in_image += count
        if self.show and time.time() - self.last >= PROGRESS_EVERY:
            self.last = time.time()
            print(self.line(f"image {self.done + 1} / {self.total}: {self.in_image:,} of {self.per_image:,} samples"), flush=True)

    def images_done(self, rows: list[str]) -> None:
        self.in_image = 0
        for row in rows:
            self.done += 1
            self.left -= 1
            if self.show:
                print(self.line(f"image {self.done} / {self.total}") + " | " + row.replace("\t", " "), flush=True)
        self.last = time.time()


# ----------------------------------------------------------------------------------------------------

def certify_image(smooth: Smooth, x: torch.Tensor, idx: int, args: argparse.Namespace, plan: AdaptivePlan | None,
                  tick) -> tuple[int, float, int]:
    """(prediction, radius, estimation samples) for test image idx: fixed-n, adaptive or PREDICT."""
    if args.predict:
        return smooth.predict(x, args.n, args.alpha, key=idx, tick=tick), 0.0, args.n
    if plan is not None:
        return smooth.certify_adaptive(x, args.n0, plan, key=idx, tick=tick)
    return (*smooth.certify(x, args.n0, args.n, args.alpha, key=idx, tick=tick), args.n)


def out_path(args: argparse.Namespace, sigma: float) -> str:
    """The TSV of one sigma: --out itself for a single sigma, else with _sigma<sigma> before its extension."""
    if args.out is None:
        name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
        suffix = "_predict" if args.predict else "_adaptive" if args.adaptive else ""
        return os.path.join("out", "certify", f"{name}_sigma{sigma:g}{suffix}.tsv")
    if len(args.sigma) == 1:
        return args.out
    root, extension = os.path.splitext(args.out)
    return f"{root}_sigma{sigma:g}{extension}"


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """main's work; `stack` closes the locks however this ends. Everything that can be refused -- flags,
    checkpoint, test images, the results files -- is checked before anything is written."""
    select_kernels(args.kernels)
    rank, world, device = init_distributed()
    ckpt = load_checkpoint(args.checkpoint, "finetune")
    trained_sigma, dataset = ckpt["config"]["sigma"], ckpt["config"]["dataset"]
    skip = DEFAULT_SKIP[dataset] if args.skip is None else args.skip
    precision = resolve_precision(args.precision, device)
    model = model_from_checkpoint(ckpt).to(device).eval()
    test = Images(dataset, args.data_dir, "test", device)
    indices = certified_indices(len(test), skip, args.num)
    mode = "predict" if args.predict else "certify-adaptive" if args.adaptive else "certify"
    header = ADAPTIVE_HEADER if args.adaptive else HEADER
    jobs = []
    for sigma in args.sigma:
        plan = AdaptivePlan(args.n, args.alpha, sigma, args.radii or PAPER_RADII[dataset], args.stages) if args.adaptive else None
        config = dict(checkpoint=os.path.abspath(args.checkpoint), step=ckpt["step"], sigma=sigma, mode=mode, n0=args.n0,
                      n=args.n, alpha=args.alpha, seed=args.seed, skip=skip, precision=precision, noise=NOISE)
        if plan is not None:
            config |= dict(looks=plan.looks, alphas=plan.alphas, radii=plan.radii)
        jobs.append((sigma, out_path(args, sigma), config, plan))
    # Rank 0 takes every file's lock and reads what is there before any is written; every rank learns the
    # outcome, so a refusal ends all processes with the same one line.
    done, refusal, files = [set() for _ in jobs], None, []
    if rank == 0:
        try:
            for k, (sigma, out, config, plan) in enumerate(jobs):
                stack.enter_context(lock_results(out))
                files.append(Results(out, config, header))
                done[k] = files[-1].done
        except UsageError as e:
            refusal = str(e)
    if world > 1:
        box = [done, refusal]
        dist.broadcast_object_list(box)
        done, refusal = box
    if refusal:
        raise UsageError(refusal)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    for k, (sigma, out, config, plan) in enumerate(jobs):
        args.writing = out
        todo = [i for i in indices if i not in done[k]]
        if rank == 0:
            print(f"{mode.upper()} sigma {sigma:g} (fine-tuned at {trained_sigma:g}), {len(indices)} images, "
                  f"{len(indices) - len(todo)} already in {out}, {world} process(es) on {where}, precision {precision}"
                  + (f", {plan.describe()}" if plan else ""), flush=True)
        smooth = Smooth(RRCMClassifier(model, sigma), model.cfg.num_classes, sigma, batch=args.batch, seed=args.seed,
                        compile=args.compile, autocast=torch.bfloat16 if precision == "bf16" else None)
        if args.compile and todo:  # compile every batch size the loop will use now, so no image's time includes it
            if rank == 0:
                print("compiling the noise loop ...", flush=True)
            smooth.warm_up(test.batch(torch.tensor([todo[0]]))[0][0], args.n0, plan.looks if plan else [args.n])
        progress = Progress(len(indices) - len(todo), len(indices), len(todo), args.n0 + args.n, world, args.adaptive, rank == 0)
        # Rounds of `world` images, one per process; rank 0 writes each round in image order.
        for r in range(0, len(todo), world):
            line = None
            if r + rank < len(todo):
                idx = todo[r + rank]
                x, y = test.batch(torch.tensor([idx]))
                start = time.time()
                prediction, radius, used = certify_image(smooth, x[0], idx, args, plan, progress.tick)
                label = int(y[0])
                line = f"{idx}\t{label}\t{prediction}\t{floor_radius(radius)}\t{int(prediction == label)}\t{time.time() - start:.3f}"
                line += f"\t{used}" if args.adaptive else ""
            lines = [line]
            if world > 1:
                lines = [None] * world
                dist.all_gather_object(lines, line)
            rows = [row for row in lines if row is not None]
            if rank == 0:
                files[k].append(rows)
            progress.images_done(rows)
        if rank == 0 and os.path.exists(out):
            print(summary(out), flush=True)
    written = [out for _, out, _, _ in jobs if os.path.exists(out)]
    if rank == 0 and len(written) > 1:  # the paper's Table 2 row: the best certified accuracy over sigma at each radius
        print(table([os.path.basename(out) for out in written], [read_tsv(out) for out in written], envelope=True), flush=True)
    if world > 1:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    args.writing = None
    previous = {s: signal.signal(s, raise_interrupted) for s in STOP_SIGNALS}
    try:
        with contextlib.ExitStack() as stack:
            run(args, stack)
    except Interrupted as e:
        if args.writing is None:
            raise Interrupted(f"interrupted by {e} before certifying; nothing was written") from None
        raise Interrupted(f"interrupted by {e}; {args.writing} holds whole lines only; run the same command to continue") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, Interrupted) as e:
        sys.exit(f"certify.py: error: {e}")
