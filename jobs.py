"""The machinery that runs the stages as jobs, kept here so that each stage script shows its method first:

- usage errors and flags: one line and a non-zero exit for every mistake in the user's input;
- processes: one per GPU under torchrun (NCCL), or gloo on CPU; who speaks;
- precision (bf16 autocast where the hardware has it) and the kernels (fused Triton or PyTorch);
- checkpoints: one dict {kind, model_args, model, ..., step, config}, written atomically;
- the training loop's skeleton (`Trainer`): resume, log lines with the global batch's losses, checkpoints,
  and a clean stop on SIGINT/SIGTERM (finish the step, save, exit; --resume continues bit-identically);
- progress a person can read (throughput, elapsed, ETA) and the warm-up + cosine learning-rate schedule.
"""
import argparse
import contextlib
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import torch
import torch.distributed as dist

import kernels
from model import SIGMA_MIN, ViT, ViTConfig


class UsageError(ValueError):
    """A mistake in the user's input (flags, files): the scripts print it as one line and exit non-zero."""


def run_script(main: Callable[[], None], *errors: type[Exception]) -> None:
    """A script's `__main__`: a UsageError (or one of `errors`) becomes `<script>: error: <message>`, exit 1;
    so does running out of GPU memory despite the estimate (Trainer.micro_batch)."""
    script = os.path.basename(sys.argv[0])
    try:
        main()
    except (UsageError, *errors) as e:
        sys.exit(f"{script}: error: {e}")
    except torch.OutOfMemoryError:
        sys.exit(f"{script}: error: out of GPU memory: pass a smaller --micro-batch, or use more processes or a "
                 f"smaller --batch")


# ----------------------------------------------------------------------------------------------------
# Flags: checked where they are declared, each mistake one line

class Parser(argparse.ArgumentParser):
    """argparse with every default shown in --help and every error one line and exit 1:
    `<script>: error: --steps must be >= 1, got 0`."""

    def __init__(self, script: str, description: str):
        super().__init__(prog=script, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(self, message: str):
        # argparse writes "argument --steps: must be ..."; the flag reads better as the sentence's subject
        message = re.sub(r"^argument (\S+): (must |needs )?", lambda m: m[1] + (" " + m[2] if m[2] else ": "), message)
        sys.exit(f"{self.prog}: error: {message}")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""
    def check(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    check.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return check


def interval(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a float in the interval (written as in the message: [0, 1), > 0, >= 0 ...). NaN never passes."""
    if high == math.inf:
        name = f"{'>' if low_open else '>='} {low:g}" + (" and finite" if high_open else "")
    else:
        name = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(text: str) -> float:
        value = float(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be {name}, got {value:g}")
        return value
    check.__name__ = "float"
    return check


positive = interval(0.0, low_open=True)  # > 0 and finite
non_negative = interval(0.0)             # >= 0 and finite


def add_run_flags(g, save_every: int, save_when: str) -> None:
    """The flags both trainers share: seed and shards, logging, checkpoints, compilation, kernels, precision."""
    g.add_argument("--seed", type=int, default=0, help="all randomness of step k is derived from (seed, k, shard)")
    g.add_argument("--shards", type=at_least(1), default=None, help="independent random streams per step (unset: the "
                   "number of processes); runs with equal --shards agree whatever the number of processes dividing it")
    g.add_argument("--log-every", type=at_least(1), default=50, help="steps between log lines (also step 1 and the last)")
    g.add_argument("--save-every", type=at_least(1), default=save_every, help=f"steps between checkpoints ({save_when})")
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the transformer blocks (ViT.compile_blocks)")
    add_device_flags(g)


def add_device_flags(g) -> None:
    g.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend(), help="fused Triton kernels or PyTorch")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32")


def check_out_dir(out: str) -> None:
    """Refuse, in one line, an output directory that cannot be created or written."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out} is not writable")


# ----------------------------------------------------------------------------------------------------
# Processes: one per GPU under torchrun; rank 0 speaks and writes

def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK is set) join the process group: NCCL on GPUs,
    gloo on CPU; otherwise a single process on the GPU if there is one."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def select_kernels(backend: str) -> None:
    """kernels.use, with its refusal (e.g. Triton without a GPU) as a one-line usage error."""
    try:
        kernels.use(backend)
    except ValueError as e:
        raise UsageError(str(e)) from None


def start_processes(kernels_backend: str) -> tuple[int, int, torch.device]:
    """Select the kernels, then join the processes: (rank, world, device)."""
    select_kernels(kernels_backend)
    return init_distributed()


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def close_processes() -> None:
    """Leave the process group together: a rank that tears down its connections while another still
    talks to it makes gloo abort that other rank (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of x concatenated in rank order (no gradient), and this rank's row offset."""
    if not distributed():
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a collective: every rank calls it)."""
    if not distributed():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def decided_by_rank0(decide: Callable[[], object], *refusals: type[Exception]):
    """decide() on rank 0 alone, its result -- or its refusal, a UsageError or one of `refusals` -- broadcast to
    every rank, so that a refusal ends every process with the same one line (a UsageError)."""
    box = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box[0] = decide()
        except (UsageError, *refusals) as e:
            box[1] = str(e)
    if distributed():
        dist.broadcast_object_list(box)
    if box[1] is not None:
        raise UsageError(box[1])
    return box[0]


def run_log(out_dir: str, master: bool) -> Callable[[str], None]:
    """A print to stdout and <out_dir>/log.txt on rank 0; a no-op on the other ranks."""
    if not master:
        return lambda line: None
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "log.txt"), "a")

    def log_line(line: str) -> None:
        for stream in (sys.stdout, log):
            print(line, file=stream, flush=True)
    return log_line


# ----------------------------------------------------------------------------------------------------
# Precision and MFU

PRECISIONS = ("auto", "bf16", "fp32")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}  # dense


def native_bf16(device: torch.device) -> bool:
    """CUDA GPUs, and CPUs with AMX-BF16 or AVX512-BF16 (on others bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto -> "bf16" or "fp32" for this device; an explicit choice is kept."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision: matmuls in bf16 with fp32 weights and reductions."""
    if precision == "bf16":
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


def peak_bf16_flops() -> float | None:
    """The current CUDA GPU's dense bf16 peak FLOP/s (for MFU); None on a CPU or a GPU not listed: no guess."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one dict {kind, model_args, model, [target,] optimizer, step, config}, enough to rebuild
# the model without being told its shape

def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, kind: str) -> dict:
    """Load a checkpoint written by pretrain.py (kind "pretrain") or finetune.py (kind "finetune")."""
    if os.path.isdir(path):
        raise UsageError(f"checkpoint {path} is a directory; give the ckpt.pt file inside it")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise UsageError(f"checkpoint {path} is truncated or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or "kind" not in checkpoint or "model_args" not in checkpoint:
        raise UsageError(f"{path} is not an rRCM checkpoint")
    if checkpoint["kind"] != kind:
        raise UsageError(f"{path} is a {checkpoint['kind']} checkpoint, but a {kind} checkpoint is needed here")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, weights: str = "model") -> ViT:
    """Rebuild the network from the checkpoint's own model_args and load its weights."""
    try:
        model = ViT(ViTConfig(**checkpoint["model_args"]))
    except TypeError as e:
        raise UsageError(f"checkpoint model_args are not a ViT configuration ({e})") from None
    try:
        model.load_state_dict(checkpoint[weights])
    except RuntimeError:
        theirs = {k: tuple(v.shape) for k, v in checkpoint[weights].items()}
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad = next((k for k in ours if theirs.get(k) != ours[k]), next(iter(theirs.keys() - ours.keys()), "?"))
        raise UsageError(f"checkpoint weights do not match its model_args {checkpoint['model_args']} "
                         f"(first mismatch: {bad})") from None
    return model


def resume_checkpoint(out_dir: str, kind: str, resume: bool, config: dict, run_keys: tuple) -> dict | None:
    """The checkpoint to continue from, or None for a fresh run. Refuses to overwrite an existing run
    without --resume, and to resume one whose run-defining settings (`run_keys`) differ from `config`."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not resume:
        if os.path.exists(path):
            raise UsageError(f"{path} exists; pass --resume to continue that run or choose another --out")
        return None
    if not os.path.exists(path):
        raise UsageError(f"--resume given but {path} does not exist")
    checkpoint = load_checkpoint(path, kind)
    changed = [k for k in run_keys if checkpoint["config"].get(k) != config[k]]
    if changed:
        raise UsageError(f"{path} was made with different {', '.join('--' + k.replace('_', '-') for k in changed)}")
    return checkpoint


# ----------------------------------------------------------------------------------------------------
# Progress a person can read

def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (days spelled out), for elapsed time and ETA."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class StepProgress:
    """Throughput, elapsed and ETA of a training run, from the steps done in this process (a resumed run's ETA
    counts only the steps still to do), and with `data` (an Images) the seconds each step waited for its input:
    above about 0 the input, not the model, sets the pace."""

    def __init__(self, first_step: int, total: int, images_per_step: int, data=None):
        self.start, self.first, self.total, self.images = time.time(), first_step, total, images_per_step
        self.last_time, self.last_step, self.rate = self.start, first_step, 0.0
        self.data, self.last_wait = data, data.wait_seconds if data is not None else 0.0

    def line(self, step: int) -> str:
        now = time.time()
        self.rate = (step - self.last_step) * self.images / max(now - self.last_time, 1e-9)  # since the last line
        per_step = (now - self.start) / max(step - self.first, 1)
        wait = ""
        if self.data is not None:
            wait = f" | data wait {(self.data.wait_seconds - self.last_wait) / max(step - self.last_step, 1):.3f} s/step"
            self.last_wait = self.data.wait_seconds
        self.last_time, self.last_step = now, step
        return f"{self.rate:.1f} img/s{wait} | elapsed {clock(now - self.start)} | ETA {clock(per_step * (self.total - step))}"


PROGRESS_EVERY = 30.0  # seconds between certification progress lines inside one image


class SampleProgress:
    """Certification progress: image k / total, samples/s, elapsed and ETA after each image, and a line every
    PROGRESS_EVERY seconds inside a long one (rRCM-B on a CPU at n = 100,000 takes over an hour per image). Adaptive
    runs draw at most n0 + n samples an image: their ETA is an upper bound."""

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


class SharedImages:
    """Images shared among the processes in rounds of one image each: iterating gives this process's images,
    `record` takes each one's result line, and rank 0 hands every round's lines, in image order, to `write`
    (a collective per round: every rank iterates to the end)."""

    def __init__(self, todo: list[int], write: Callable[[list[str]], None] | None, progress: SampleProgress, rank: int,
                 world: int, about: str):
        self.todo, self.write, self.progress, self.rank, self.world, self.about = todo, write, progress, rank, world, about
        self.tick = progress.tick

    def announce(self, also: str | None = None) -> None:
        if self.rank == 0:
            print(self.about + (f"\n{also}" if also else ""), flush=True)

    def __iter__(self) -> Iterator[int]:
        self.progress.start = self.progress.last = time.time()
        for r in range(0, len(self.todo), self.world):
            self.line = None
            if r + self.rank < len(self.todo):
                yield self.todo[r + self.rank]
            rows = [line for line in gather_objects(self.line) if line is not None]
            if self.write is not None:
                self.write(rows)
            self.progress.images_done(rows)

    def record(self, line: str) -> None:
        self.line = line


def forward_seconds_per_image(model: ViT, x: torch.Tensor, t: float, precision) -> float:
    """Seconds of one no-grad forward per image of x (timed after a warm-up call): the first guess of a step's
    time that lets a slow run (preset B on a CPU) say how long it will take before its first step ends. A
    backward costs about two forwards. Timing one image keeps the guess cheap where the forward is slow and
    errs long (bench/README.md)."""
    # Eager, compiled blocks included: compiling a graph for this shape would cost more than the guess saves.
    with torch.no_grad(), precision, torch.compiler.set_stance("force_eager"):
        model.features(x, t)
        start = time.time()
        model.features(x, t)
    return (time.time() - start) / len(x)


# ----------------------------------------------------------------------------------------------------
# Stopping: SIGINT at a desk, SIGTERM before a cluster's preemption

class StopSignal:
    """Records SIGINT/SIGTERM instead of dying mid-step, while the training loop runs inside `with`; the
    previous handlers come back afterwards. `requested()` is called once per step and is collective under
    torchrun, so every rank stops after the same step (one rank leaving early would hang the others'
    all-reduces). The first signal says at once what will happen; a second one exits at once, keeping the
    last checkpoint on disk (written atomically, so never torn)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopSignal":
        self.signum = 0
        self.script = os.path.basename(sys.argv[0])
        self.speaks = not dist.is_initialized() or dist.get_rank() == 0  # every rank gets the signal; one speaks
        self.last_call, self.step_seconds = time.time(), None
        self.previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _record(self, signum, frame) -> None:
        self.signum = signum
        for s in self.SIGNALS:  # first: a second signal arriving while this one is reported must already exit
            signal.signal(s, self._exit_now)
        name = signal.Signals(signum).name
        when = (f"the last one took {clock(self.step_seconds)}" if self.step_seconds is not None
                else f"it started {clock(time.time() - self.last_call)} ago")
        if self.speaks:
            print(f"{self.script}: {name} received: finishing the current step ({when}), then saving a checkpoint "
                  f"and exiting; a second {name} exits at once without saving (the last checkpoint on disk stays)",
                  file=sys.stderr, flush=True)

    def _exit_now(self, signum, frame) -> None:
        if self.speaks:
            print(f"{self.script}: second signal ({signal.Signals(signum).name}): exiting without saving; the last "
                  f"checkpoint on disk is intact", file=sys.stderr, flush=True)
        os._exit(128 + signum)  # no clean-up that could block (a collective waiting for another rank)

    def requested(self, device: torch.device) -> bool:
        now = time.time()
        self.step_seconds, self.last_call = now - self.last_call, now
        if distributed():
            flag = torch.tensor([self.signum], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item())
        return self.signum != 0

    def exit(self, script: str, step: int, path: str) -> None:
        name = signal.Signals(self.signum).name if self.signum > 0 else "a signal"
        print(f"{script}: stopped by {name} after step {step}; checkpoint {path} saved, continue with --resume",
              file=sys.stderr, flush=True)
        close_processes()
        sys.exit(128 + max(self.signum, 1))


class Interrupted(Exception):
    """SIGINT or SIGTERM outside a training loop (certification): stop where it is."""


class Interruptible:
    """Inside `with` SIGINT/SIGTERM raise Interrupted("interrupted by SIGINT" + note), the note saying what
    is left on disk (the job updates it as it goes); the previous handlers come back after the block."""

    def __init__(self, note: str):
        self.note = note

    def _interrupt(self, signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}{self.note}")

    def __enter__(self) -> "Interruptible":
        self.previous = {s: signal.signal(s, self._interrupt) for s in StopSignal.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------
# Memory: micro-batches that fit the device, or one line that says what to change

# Bytes a ViT keeps for its backward, per image, token, unit of width and block, for one encoder pass with
# gradient: measured on a CPU (bench/README.md, "Micro-batching"; rRCM-S and B: 42 and 37 in bf16, 76 and 74 in
# fp32), rounded up, so an estimate errs on the safe side.
ACTIVATION_BYTES = {"bf16": 44, "fp32": 80}


def activation_bytes(cfg: ViTConfig, precision: str) -> int:
    """Estimated activation memory per image of one encoder pass with gradient."""
    tokens = 2 + (cfg.img_size // cfg.patch_size) ** 2
    return ACTIVATION_BYTES[precision] * tokens * cfg.width * cfg.depth


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate: the GPU's free memory, or on a CPU the kernel's MemAvailable (within
    a cgroup's limit, where one is set)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            free = min(free, int(f.read()) - int(g.read()))
    except (OSError, ValueError):  # no cgroup v2 limit ("max"), or none readable
        pass
    return free


# ----------------------------------------------------------------------------------------------------
# The training loop's skeleton, shared by pretrain.py and finetune.py

def warmup_cosine(k: int, total: int, warmup: int, peak: float) -> float:
    """The lr at step (or epoch) k = 0, 1, ...: linear warm-up peak k / W up to k = W, then peak 0.5 (1 + cos(pi
    (k - W) / (K - W))) down to 0 at k = K: the released "warmup-cosine" (rrcm/utils.py) under LambdaLR, which
    gives k = 0 lr 0. W = 0 is a constant lr, no cosine (099127a:rrcm/utils.py:311,323)."""
    if warmup == 0:
        return peak
    if k <= warmup:
        return peak * k / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup)))


class Trainer:
    """The run around a training loop: processes, precision and kernels; resume; the log; checkpoints every
    --save-every steps, at the end and on SIGINT/SIGTERM; the estimate of the run's time. A stage uses it as

        run = Trainer(args, "pretrain", RUN_KEYS)              # kernels, processes, precision, --shards checked
        step = run.resume(model=model, optimizer=opt)          # what a checkpoint holds; loaded under --resume
        run.start(model, sample, step, total, forwards_per_image)
        for step in run.steps(step, total):                   # saves and stops between steps
            ... one optimizer step ...
            if run.log_due(step + 1):
                run.log(step + 1, dict(loss=loss), f"lr {lr:.2e}")
    """

    def __init__(self, args: argparse.Namespace, kind: str, run_keys: tuple):
        self.args, self.kind, self.run_keys, self.script = args, kind, run_keys, f"{kind}.py"
        self.rank, self.world, self.device = start_processes(args.kernels)
        self.master = self.rank == 0
        args.precision = resolve_precision(args.precision, self.device)
        self.autocast = autocast(self.device, args.precision)
        args.shards = args.shards or self.world
        if args.shards % self.world or args.batch % args.shards:
            raise UsageError(f"--shards {args.shards} must be a multiple of the {self.world} process(es) and divide "
                             f"--batch {args.batch}")
        self.path = os.path.join(args.out, "ckpt.pt")
        self.state: dict = {}

    def resume(self, **state) -> int:
        """Name what a checkpoint holds (`model=`, `target=`, `optimizer=`: anything with a state_dict) and, under
        --resume, load it from <out>/ckpt.pt. Returns the step to start at."""
        check_out_dir(self.args.out)
        self.state = state
        checkpoint = resume_checkpoint(self.args.out, self.kind, self.args.resume, vars(self.args), self.run_keys)
        if checkpoint is None:
            return 0
        for name, obj in state.items():
            obj.load_state_dict(checkpoint[name])
        return checkpoint["step"]

    def micro_batch(self, requested: int | None, model: ViT, grad_passes: int, input_bytes: int) -> int | None:
        """Images per encoder pass with gradient, checked against the device's memory before the first step: None
        (this rank's whole share of --batch at once) when the share fits, else the largest divisor of the share that
        does, or --micro-batch as given. Refuses, in one line, a run that fits at no micro-batch (never an
        out-of-memory kill after a minute of silence). grad_passes: encoder passes with gradient per image and step,
        whose activations coexist in a whole-share step; input_bytes: the step's inputs per image."""
        share = self.args.batch // self.world
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        per_image = activation_bytes(model.cfg, self.args.precision)
        tokens = 2 + (model.cfg.img_size // model.cfg.patch_size) ** 2
        # gradients and AdamW's two moments (fp32, allocated at the first step), the inputs, and a forward without
        # gradient over the share (the keys), which holds a few fp32 activations of each image at a time
        fixed = 12 * params + share * (input_bytes + 16 * tokens * model.cfg.width)
        free = int(0.9 * free_memory(self.device))  # a margin for the allocator and the rest of the process
        gb = lambda b: f"{b / 1e9:.1f} GB"
        if requested is None and fixed + grad_passes * share * per_image <= free:
            self.memory = f"memory: the whole batch share of {share} images needs about {gb(fixed + grad_passes * share * per_image)} of {gb(free)} free"
            return None
        fits = [d for d in range(1, share + 1) if share % d == 0 and fixed + d * per_image <= free]
        if requested is not None:
            if fixed + min(requested, share) * per_image > free:
                raise UsageError(f"--micro-batch {requested} needs about {gb(fixed + requested * per_image)} and "
                                 f"{gb(free)} are free on this {self.device.type}; the largest that fits is "
                                 f"{max(fits) if fits else 'none'}")
            micro = min(requested, share)
        elif not fits:
            raise UsageError(f"this run needs about {gb(fixed)} for gradients, optimizer state and inputs plus "
                             f"{per_image / 1e6:.0f} MB per image of a micro-batch, and {gb(free)} are free on this "
                             f"{self.device.type}: use more processes (torchrun), a smaller --batch or a smaller --preset")
        else:
            micro = max(fits)
        self.memory = (f"memory: micro-batches of {micro} of the {share} images of this rank's share, about "
                       f"{gb(fixed + micro * per_image)} of {gb(free)} free (the whole share would need "
                       f"{gb(fixed + grad_passes * share * per_image)})")
        return micro

    def average_gradients(self, model: torch.nn.Module) -> None:
        """What DDP does after a backward, for steps that run several (micro-batches): every rank's gradients
        averaged, in one all-reduce of one flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def distribute(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the processes (gradients averaged once per backward), or the module."""
        if self.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def start(self, model: ViT, sample: torch.Tensor, first: int, total: int, forwards_per_image: float, about: str = "") -> None:
        """The run's first lines: what runs where (and `about` it), and on a CPU an estimate of its time from one
        timed forward of `sample` (one model-space image). forwards_per_image: forward-equivalents per image and
        step (a backward counts 2), for the estimate and the MFU."""
        self.log_line = run_log(self.args.out, self.master)
        self.first, self.total, self.forwards = first, total, forwards_per_image
        self.flops_per_image = forwards_per_image * model.cfg.flops_per_image()
        self.peak = peak_bf16_flops() if self.device.type == "cuda" else None
        self.log_line(f"{self.script} | {model.num_params() / 1e6:.2f}M parameters | {self.world} process(es) on "
                 f"{self.device.type} | precision {self.args.precision} | kernels {kernels.backend()}{about} | "
                 f"config: {vars(self.args)}")
        if getattr(self, "memory", None):
            self.log_line(self.memory)
        if first:
            self.log_line(f"resuming {self.path} at step {first}")
        if self.device.type == "cpu":
            per_step = (forward_seconds_per_image(model, sample, SIGMA_MIN, self.autocast) * forwards_per_image
                        * self.args.batch / self.world)
            self.log_line(f"estimate from a timed forward: {per_step:.1f} s per step, {clock(per_step * (total - first))} "
                     f"for the {total - first} steps to go")

    def steps(self, first: int, total: int, save_also: Callable[[int], bool] = lambda done: False, data=None) -> Iterator[int]:
        """Steps first .. total - 1. After each: a checkpoint every --save-every steps, at the last, and where
        `save_also(steps done)`; otherwise a SIGINT/SIGTERM received during it saves and exits. With `data` (an
        ImageNet Images) the log says how long each step waited for it."""
        with StopSignal() as stop:
            self.progress = StepProgress(first, total, self.args.batch, data if getattr(data, "dataset", "") == "imagenet" else None)
            for step in range(first, total):
                yield step
                done = step + 1
                if done % self.args.save_every == 0 or done == total or save_also(done):
                    self.save(done)
                elif stop.requested(self.device):
                    self.save(done)
                    stop.exit(self.script, done, self.path)
        close_processes()

    def save(self, step: int) -> None:
        if self.master:
            states = {name: obj.state_dict() for name, obj in self.state.items()}
            save_checkpoint(self.path, dict(kind=self.kind, model_args=asdict(self.state["model"].cfg), **states,
                                            step=step, config=vars(self.args)))

    def check_finite(self, loss: torch.Tensor, terms: dict, step: int) -> None:
        """Stop on a non-finite loss before the optimizer step, so neither the weights nor the last checkpoint are
        touched. One host sync per step; the terms are inspected only when it fails."""
        if not torch.isfinite(loss):
            name, value = next(((k, v) for k, v in terms.items() if not torch.isfinite(v)), ("total", loss))
            message = f"{name} loss is {value.item()} at step {step}; the last good checkpoint is left as it was"
            self.log_line(f"error: {message}")
            raise SystemExit(f"{self.script}: error: {message}")

    def log_due(self, done: int) -> bool:
        return done % self.args.log_every == 0 or done == self.total or done == self.progress.first + 1

    def log(self, done: int, losses: dict, *fields: str) -> None:
        """One log line: the losses averaged over the global batch (an all-reduce: every rank calls this on
        the steps `log_due` names), then `fields`, throughput and ETA, and the MFU on a known GPU."""
        values = torch.stack([v.detach() for v in losses.values()]).float()
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        if not self.master:
            return
        line = " | ".join([f"step {done}/{self.total}", *(f"{k} {v:.4f}" for k, v in zip(losses, values.tolist())),
                           *fields, self.progress.line(done)])
        if self.peak:
            line += f" | mfu {self.progress.rate * self.flops_per_image / (self.world * self.peak):.1%}"
        self.log_line(line)
