"""Stage 3: certify the fine-tuned classifier with randomized smoothing (Cohen et al. 2019).

CERTIFY (smoothing.Smooth.certify), for each test image x:
  1. draw n0 noisy copies x + sigma * eps, take the most frequent class cA (selection);
  2. draw n fresh copies, count nA = how often cA wins (estimation);
  3. pA_lower = one-sided (1 - alpha) Clopper-Pearson lower bound on P(f(x + sigma eps) = cA);
  4. if pA_lower < 1/2 abstain, else certify cA with L2 radius sigma * Phi^-1(pA_lower).
Guarantee: with probability at least 1 - alpha over the noise, the smoothed classifier g returns cA for
every x' with ||x' - x||_2 < radius, and (when it does not abstain) it is g's prediction at x.
PREDICT (--predict): n copies, the top class unless a two-sided binomial test of the top two counts has
p-value > alpha (abstain). Adaptive CERTIFY (--adaptive): the estimation samples are looked at after 100,
200, 400, ... and sampling stops once more samples cannot change the image's row of the certified-accuracy
table, with the same guarantee (smoothing.certify_adaptive).

rRCM is the base classifier f of noisy pixels (`RRCMClassifier`). Noise is N(0, sigma^2) in pixel space
[0, 1], where radii are measured, seeded per (image index, phase, chunk of 100 samples): results do not depend
on --batch or on how many processes share the images. Every --sigma goes to its own TSV (results.py: one line
per image, resumable: re-run the same command after a kill or Ctrl-C); the default 0.25, 0.5, 1.0 is the
released certify.py's grid (paper Table 9; Table 2 is the best over it).

    python certify.py --checkpoint out/finetune_sigma0.25/ckpt.pt --n 100000              # sigma 0.25, 0.5, 1.0
    python certify.py --checkpoint out/finetune_sigma0.25/ckpt.pt --sigma 0.25 --adaptive
    python certify.py --checkpoint a/ckpt.pt b/ckpt.pt c/ckpt.pt --sigma 0.25   # Boosting: an ensemble as one f
    torchrun --standalone --nproc_per_node=8 -- certify.py --checkpoint ... --sigma 0.25
"""
import argparse
import math
import os
import time
from decimal import Decimal, InvalidOperation

import torch

import jobs
import results
import smoothing
from data import Images, add_workers_flag
from jobs import load_checkpoint, model_from_checkpoint
from model import smoothing_time, to_model_space
from report import different_images, summary, table
from smoothing import CHUNK, AdaptivePlan, Smooth

PAPER_SIGMAS = "0.25,0.5,1.0"  # the released certify.py's --sigmas default
DEFAULT_SKIP = {"cifar10": 20, "imagenet": 100}  # Carlini et al. 2022: 500 of CIFAR-10's 10k, 500 of ImageNet's 50k
PAPER_RADII = {"cifar10": [0.0, 0.25, 0.5, 0.75, 1.0],  # the radii of the paper's tables (Tables 1, 2, 9)
               "imagenet": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]}
MAX_MEMBERS = 10  # Boosting's ensembles: up to 10 models (Horvath et al. 2021)
NOISE = "smoothing.stream_seed v2"  # recorded in each .json: files written with other noise streams are not continued


class RRCMClassifier(torch.nn.Module):
    """rRCM as a base classifier f of noisy images in pixel space [0, 1] (what Smooth feeds it: x + sigma eps):
    normalised to the model's [-1, 1] and told the time 2 sigma snapped to the pre-training grid
    (model.smoothing_time), as the released code does. The noise itself is exactly sigma in pixel space.
    Given several models, f is their ensemble (Boosting, Horvath et al. 2021): the members' logits summed in fp32,
    the default "soft voting" of their certify_ensemble.py (--aggregation_scheme 0; averaging softmaxes is their
    scheme 2, an ablation). Every member is told the same time, that of the noise actually in its input."""

    def __init__(self, models: torch.nn.Module | list[torch.nn.Module], sigma: float):
        super().__init__()
        self.members = torch.nn.ModuleList(models if isinstance(models, (list, tuple)) else [models])
        self.t = smoothing_time(sigma)
        self.training = self.members.training = any(m.training for m in self.members)  # no mode of their own

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        x = to_model_space(noisy)
        return sum(member(x, self.t).float() for member in self.members)


def main(argv=None) -> None:
    args = parse_args(argv)
    with jobs.CertificationJob(args.kernels, args.collective_timeout) as job:  # processes, file locks, SIGINT/SIGTERM
        checkpoint, models = load_members(args.checkpoint)
        dataset = checkpoint["config"]["dataset"]
        models = [m.to(job.device).eval() for m in models]
        test = Images(dataset, args.data_dir, "test", job.device, workers=args.workers)
        indices = certified_indices(len(test), args.skip or DEFAULT_SKIP[dataset], args.num)
        for sigma, plan, images in open_results(args, checkpoint, indices, job):
            smooth = Smooth(RRCMClassifier(models, sigma), models[0].cfg.num_classes, sigma, batch=args.batch, seed=args.seed,
                            compile=args.compile, autocast=torch.bfloat16 if args.precision == "bf16" else None)
            images.announce("compiling the noise loop ..." if args.compile and images.todo else None)
            if args.compile and images.todo:  # compile every batch size the loop will use, outside any image's time
                smooth.warm_up(test.batch(torch.tensor(images.todo[:1]))[0][0], args.n0, plan.looks if plan else [args.n])
            test.prefetch([torch.tensor([i]) for i in images.mine])  # ImageNet: decode ahead
            for idx in images:  # this process's images, round by round; rank 0 appends each round's lines
                x, label = test.batch(torch.tensor([idx]))
                start, samples = time.time(), None
                if args.predict:
                    prediction, radius = smooth.predict(x[0], args.n, args.alpha, key=idx, tick=images.tick), 0.0
                elif plan:
                    prediction, radius, samples = smooth.certify_adaptive(x[0], args.n0, plan, key=idx, tick=images.tick)
                else:
                    prediction, radius = smooth.certify(x[0], args.n0, args.n, args.alpha, key=idx, tick=images.tick)
                images.record(results.row(idx, int(label), prediction, radius, time.time() - start, samples))
            if job.master and os.path.exists(images.path):
                print(summary(images.path), flush=True)
        if job.master:
            print_best_over_sigma([out_path(args, sigma) for sigma in args.sigma])


def load_members(paths: list[str]) -> tuple[dict, list[torch.nn.Module]]:
    """The fine-tuned models of --checkpoint and the checkpoint that describes the run: the single one, or for an
    ensemble the first with "checkpoint" and "step" listing every member's and "sigma" their fine-tuning sigmas.
    Members must classify the same dataset into the same classes."""
    if len(set(map(os.path.abspath, paths))) < len(paths):
        raise jobs.UsageError("--checkpoint names a file twice: an ensemble of a model with itself is that model")
    checkpoints = [load_checkpoint(p, "finetune") for p in paths]
    for path, c in zip(paths[1:], checkpoints[1:]):
        first, this = checkpoints[0], c
        if (this["config"]["dataset"], this["model_args"]["num_classes"]) != (first["config"]["dataset"], first["model_args"]["num_classes"]):
            raise jobs.UsageError(f"{path} classifies {this['config']['dataset']} ({this['model_args']['num_classes']} classes), "
                                  f"{paths[0]} {first['config']['dataset']} ({first['model_args']['num_classes']}): an ensemble "
                                  f"needs one dataset and one set of classes")
    models = [model_from_checkpoint(c) for c in checkpoints]
    if len(paths) == 1:
        return checkpoints[0] | dict(path=paths[0]), models
    about = dict(checkpoints[0], path=[os.path.abspath(p) for p in paths], step=[c["step"] for c in checkpoints])
    about["config"] = dict(checkpoints[0]["config"], sigma=[c["config"]["sigma"] for c in checkpoints])
    return about, models


# ----------------------------------------------------------------------------------------------------
# Which images, which files, and the flags

def open_results(args, checkpoint: dict, indices: list[int], job: jobs.CertificationJob) -> list[tuple]:
    """(sigma, adaptive plan or None, its SharedImages: the images its TSV still lacks) per --sigma, each TSV's
    configuration recorded beside it (a file of another configuration is refused, not continued)."""
    dataset = checkpoint["config"]["dataset"]
    mode = "predict" if args.predict else "certify-adaptive" if args.adaptive else "certify"
    planned = []
    for sigma in args.sigma:
        try:  # refused when no requested radius is within reach of n samples at this sigma
            plan = AdaptivePlan(args.n, args.alpha, sigma, args.radii or PAPER_RADII[dataset], looks(args)) if args.adaptive else None
        except ValueError as e:
            raise jobs.UsageError(f"--adaptive at sigma {sigma:g}: {e}") from None
        path = checkpoint["path"]
        config = dict(checkpoint=path if isinstance(path, list) else os.path.abspath(path), step=checkpoint["step"], sigma=sigma, mode=mode,
                      n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed, skip=args.skip or DEFAULT_SKIP[dataset],
                      precision=args.precision, noise=NOISE)
        if plan is not None:
            config |= dict(looks=plan.looks, alphas=plan.alphas, radii=plan.radii)
        planned.append((sigma, plan, out_path(args, sigma), config))
    shared = job.share([(path, config) for _, _, path, config in planned],
                       results.ADAPTIVE_HEADER if args.adaptive else results.HEADER, indices, args.n0 + args.n, args.adaptive)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    tuned = checkpoint["config"]["sigma"]
    tuned = (f"an ensemble of {len(tuned)} fine-tuned at {', '.join(f'{s:g}' for s in tuned)}" if isinstance(tuned, list)
             else f"fine-tuned at {tuned:g}")
    for (sigma, plan, path, _), images in zip(planned, shared):
        images.about = (f"{mode.upper()} sigma {sigma:g} ({tuned}), "
                        f"{len(indices)} images, {len(indices) - len(images.todo)} already in {path}, {job.world} "
                        f"process(es) on {where}, precision {args.precision}" + (f", {plan.describe()}" if plan else ""))
    return [(sigma, plan, images) for (sigma, plan, _, _), images in zip(planned, shared)]


def print_best_over_sigma(paths: list[str]) -> None:
    """Table 2's row under the table of every TSV written: the best certified accuracy over sigma at each radius."""
    written = [path for path in paths if os.path.exists(path)]
    if len(written) > 1:
        names, done = [os.path.basename(p) for p in written], [results.read_tsv(p) for p in written]
        problem = different_images(names, done)  # e.g. a file continued from a run with another --num
        print(table(names, done, envelope=problem is None) + (f"\nno best-over-sigma row: {problem}" if problem else ""))


def certified_indices(num_images: int, skip: int, num: int) -> list[int]:
    """Every skip-th test image, at most num of them. ImageNet's val folder is sorted by class, 50 images
    each, so skip 100 gives one image from each of 500 classes."""
    return list(range(0, num_images, skip))[:num]


def out_path(args: argparse.Namespace, sigma: float) -> str:
    """The TSV of one sigma: --out itself for a single sigma, else with _sigma<sigma> before its extension."""
    if args.out is None:
        name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint[0])))
        name += f"_ensemble{len(args.checkpoint)}" if len(args.checkpoint) > 1 else ""
        suffix = "_predict" if args.predict else "_adaptive" if args.adaptive else ""
        return os.path.join("out", "certify", f"{name}_sigma{sigma:g}{suffix}.tsv")
    if len(args.sigma) == 1:
        return args.out
    root, extension = os.path.splitext(args.out)
    return f"{root}_sigma{sigma:g}{extension}"


def sigmas(text: str) -> list[float]:
    """--sigma: comma-separated, each > 0 and finite, none twice."""
    try:
        values = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must list each value once, got {text}")
    return values


def radii(text: str) -> list[float]:
    """--radii: finite, >= 0, at most 4 decimals -- the TSV floors radii to 4 decimals, so a radius with more
    could count as certified when sampling stops and not in the table."""
    values = []
    for part in text.split(","):
        try:
            value = Decimal(part.strip())
        except InvalidOperation:
            raise argparse.ArgumentTypeError(f"must be numbers, got {text}") from None
        if not value.is_finite() or value < 0 or value.as_tuple().exponent < -4:
            raise argparse.ArgumentTypeError(f"must be finite, >= 0 and have at most 4 decimals, got {text}")
        values.append(float(value))
    return sorted(set(values))


def looks(args: argparse.Namespace) -> list[int]:
    """Adaptive CERTIFY's looks: --stages below --n and n itself, or by default 100, 200, 400, ... below n, and n."""
    if args.stages is None:
        return smoothing.default_looks(args.n)
    return sorted({s for s in args.stages if s < args.n} | {args.n})


def stages(text: str) -> list[int]:
    """--stages: the looks before n, multiples of CHUNK, so that look k's samples are exactly the first n_k
    samples of a fixed-n run: an adaptive run that goes to n sees the very counts CERTIFY sees."""
    try:
        looks = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text}") from None
    if any(s < CHUNK or s % CHUNK for s in looks):
        raise argparse.ArgumentTypeError(f"must be multiples of {CHUNK}, got {text}")
    return looks


def parse_args(argv=None) -> argparse.Namespace:
    p = jobs.Parser("certify.py", "randomized-smoothing certification")
    p.add_argument("--checkpoint", nargs="+", default=["out/finetune_sigma0.25/ckpt.pt"], help="a finetune.py checkpoint; "
                   f"several (at most {MAX_MEMBERS}): their ensemble as one base classifier (Boosting, Horvath et al. 2021)")
    p.add_argument("--sigma", type=sigmas, default=PAPER_SIGMAS, help="smoothing noise stds in pixel space, comma-"
                   "separated, certified in turn, one TSV each (the released grid)")
    p.add_argument("--n0", type=jobs.at_least(1), default=100, help="selection samples")
    p.add_argument("--n", type=jobs.at_least(1), default=100_000, help="estimation samples (adaptive: at most)")
    p.add_argument("--alpha", type=jobs.interval(0, 1, low_open=True), default=0.001, help="failure probability")
    p.add_argument("--predict", action="store_true", help="run PREDICT instead of CERTIFY")
    p.add_argument("--adaptive", action="store_true", help="stop sampling an image once more samples cannot change its "
                   "row of the certified-accuracy table (alpha split over the looks)")
    p.add_argument("--stages", type=stages, default=None, help="adaptive: comma-separated sample counts of the looks "
                   "before n (multiples of 100); default 100, 200, 400, 800, ... (doubling) below n")
    p.add_argument("--radii", type=radii, default=None, help="adaptive: comma-separated radii the table reports (at "
                   "most 4 decimals); default the paper's: CIFAR-10 0, 0.25, ..., 1.0, ImageNet 0, 0.5, ..., 2.5; radii "
                   "above what n samples can certify at that sigma are left out")
    p.add_argument("--num", type=jobs.at_least(1), default=500, help="how many test images")
    p.add_argument("--skip", type=jobs.at_least(1), default=None, help="certify every skip-th test image; default 20 for "
                   "CIFAR-10 (500 of 10k), 100 for ImageNet (500 of 50k, one per class: the folder is sorted by class)")
    p.add_argument("--batch", type=jobs.at_least(1), default=1000, help="noisy copies per forward pass (multiple of 100)")
    p.add_argument("--data-dir", default="data", help="where the test images are (CIFAR-10 is downloaded there if missing)")
    add_workers_flag(p)
    p.add_argument("--out", default=None, help="TSV path; with several sigmas _sigma<sigma> goes before its extension "
                   "(c.tsv: c_sigma0.25.tsv, ...); default out/certify/<checkpoint dir>_sigma<sigma>.tsv")
    p.add_argument("--seed", type=int, default=0, help="seed of the smoothing noise")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the noise loop")
    jobs.add_device_flags(p)
    args = p.parse_args(argv)  # argparse passes the default string through `type` too
    for path in [out_path(args, s) for s in args.sigma] if args.out else ():
        if os.path.isdir(path):
            p.error(f"--out {path} is a directory; give a file name for the TSV")
    if args.batch % CHUNK:
        p.error(f"--batch must be a multiple of {CHUNK}, got {args.batch}")
    if len(args.checkpoint) > MAX_MEMBERS:
        p.error(f"--checkpoint takes at most {MAX_MEMBERS} models (Horvath et al.'s largest ensemble), got {len(args.checkpoint)}")
    if (args.stages is not None or args.radii is not None) and not args.adaptive:
        p.error("--stages and --radii need --adaptive")
    if args.adaptive and args.predict:
        p.error("--adaptive applies to CERTIFY, not --predict")
    if args.adaptive and args.n % CHUNK:
        p.error(f"--adaptive needs --n to be a multiple of {CHUNK}, got {args.n}")
    return args


if __name__ == "__main__":
    jobs.run_script(main, jobs.Interrupted)
