"""The machinery that runs every stage as a job, kept here so that each stage script shows its method first
(the training loop's own skeleton is trainer.py):

- usage errors and flags: one line and a non-zero exit for every mistake in the user's input;
- processes: one per GPU under torchrun (NCCL), or gloo on CPU; who speaks; a lost process ends the others in one
  line within --collective-timeout, so that torchrun or the scheduler can restart them all;
- precision (bf16 autocast where the hardware has it) and the kernels (fused Triton or PyTorch);
- checkpoints: one dict {kind, model_args, model, ..., step, config}, written atomically and synced to disk;
- certification as a job: its images shared among processes, its results files locked, its progress (samples/s,
  ETA), and a stop on SIGINT/SIGTERM.
"""
import argparse
import contextlib
import datetime
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

import kernels
import results
from model import ViT, ViTConfig


class UsageError(ValueError):
    """A mistake in the user's input (flags, files): the scripts print it as one line and exit non-zero."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside the user's input (a process lost, a disk full): the scripts
    print it as one line and exit non-zero, so that torchrun or the scheduler restarts the same command."""


def run_script(main: Callable[[], None], *errors: type[Exception]) -> None:
    """A script's `__main__`: a UsageError, RunError (or one of `errors`) becomes `<script>: error: <message>`,
    exit 1; so do running out of GPU memory despite the estimate (Trainer.micro_batch) and losing another process."""
    script = os.path.basename(sys.argv[0])
    try:
        main()
    except (UsageError, RunError, *errors) as e:
        if distributed():  # a peer may be gone: leaving the process group could block or abort
            leave_now(f"{script}: error: {e}")
        sys.exit(f"{script}: error: {e}")
    except torch.OutOfMemoryError:
        sys.exit(f"{script}: error: out of GPU memory: pass a smaller --micro-batch, or use more processes or a "
                 f"smaller --batch")
    except RuntimeError as e:
        if (lost := lost_process(e)) is None:
            raise
        leave_now(f"{script}: error: {lost}")


def leave_now(line: str) -> None:
    """Print one line and exit 1 with no clean-up: a process group torn down while a collective still waits on a lost
    process aborts the interpreter (SIGABRT, and a C++ message) instead of exiting."""
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


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


def add_device_flags(g) -> None:
    """--kernels, --precision (auto is resolved as it is parsed: the run's config records bf16 or fp32) and
    --collective-timeout."""
    g.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend(), help="fused Triton kernels or PyTorch")
    g.add_argument("--precision", type=precision_flag, choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32")
    g.add_argument("--collective-timeout", type=positive, default=COLLECTIVE_TIMEOUT, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others in a collective before it ends with "
                        "one line (another process died, stopped or lost its node); longer than the slowest step or "
                        "image, as unequal as they get across processes")


# ----------------------------------------------------------------------------------------------------
# Processes: one per GPU under torchrun; rank 0 speaks and writes

COLLECTIVE_TIMEOUT = 600.0  # seconds; NCCL's own default, and far longer than a step's imbalance across processes
_timeout = {"seconds": COLLECTIVE_TIMEOUT}  # the process group's, for the line that reports it


def init_distributed(timeout: float = COLLECTIVE_TIMEOUT) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK is set) join the process group: NCCL on GPUs,
    gloo on CPU; otherwise a single process on the GPU if there is one. A collective that waits longer than
    `timeout` seconds for another process fails (see lost_process); a group that cannot form is a RunError."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    _timeout["seconds"], wait = timeout, datetime.timedelta(seconds=timeout)
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=wait))
        # torchrun keeps one store across its restarts: without a prefix of their own, the processes of a restart
        # can read the addresses of the last attempt's dead ones (gloo: connection refused)
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=wait)
    except RuntimeError as e:  # a store never reached, a peer that refuses the connection
        raise RunError(f"the processes could not connect ({failure(e)}); under torchrun --max-restarts the next "
                       f"restart tries again") from None
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


def start_processes(kernels_backend: str, timeout: float = COLLECTIVE_TIMEOUT) -> tuple[int, int, torch.device]:
    """Select the kernels, then join the processes: (rank, world, device)."""
    select_kernels(kernels_backend)
    return init_distributed(timeout)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lost_process(e: BaseException) -> str | None:
    """What a failed collective means, in a line, or None for an error that is not one. Gloo raises a plain
    RuntimeError: "Timed out waiting ..." when a process stops answering, "Connection reset/closed" when one dies."""
    text = str(e)
    if not dist.is_initialized() or not isinstance(e, RuntimeError):
        return None
    if "timed out" in text.lower():
        return (f"no answer from another process within --collective-timeout {_timeout['seconds']:g} s: it stopped, "
                f"hangs, or its node was lost; the same command continues from the last checkpoint (torchrun "
                f"--max-restarts does it)")
    if isinstance(e, dist.DistError) or any(s in text for s in CONNECTION_LOST):
        return (f"another process ended or its connection broke ({failure(e)}); the same command continues from the "
                f"last checkpoint (torchrun --max-restarts does it)")
    return None


CONNECTION_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def failure(e: BaseException) -> str:
    """The gist of torch's message about a failed connection: the socket error where it names one."""
    text = str(e).strip()
    return next((s for s in CONNECTION_LOST if s in text), text.splitlines()[0][:160] if text else type(e).__name__)


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


def precision_flag(text: str) -> str:
    """--precision as argparse reads it: `auto` resolved for the device the run will use (the GPU if there is one),
    so that the parsed flags are the run's configuration; anything else is left to argparse's choices."""
    if text != "auto":
        return text
    return resolve_precision(text, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


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

class _Writes:
    """A file's write and flush for torch.save, keeping the OSError that torch's writer turns into "unexpected pos"."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically and durably: into <path>.tmp, synced to disk, renamed over `path`, and the rename synced
    too, so that a crash or a lost node at any moment leaves the previous checkpoint or this one, whole. A write
    that fails (a full disk, a quota) removes the temporary file and is a RunError; `path` keeps the previous one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            writes = _Writes(f)
            try:
                torch.save(checkpoint, writes)
            except RuntimeError:  # torch's zip writer reports a failed write as "unexpected pos ..."
                if writes.error is None:
                    raise
                raise writes.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = "the previous checkpoint there is intact" if os.path.exists(path) else "no checkpoint was kept"
        raise RunError(f"cannot write checkpoint {path}: {e.strerror or e} ({kept}); free space or choose another "
                       f"--out") from None


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


# ----------------------------------------------------------------------------------------------------
# Progress a person can read

def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (days spelled out), for elapsed time and ETA."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


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
    """One results file's images, shared among the processes in rounds of one image each: iterating gives this
    process's images, `record` takes each one's result line, and rank 0 hands every round's lines, in image order,
    to `write` (a collective per round: every rank iterates to the end)."""

    def __init__(self, path: str, todo: list[int], write: Callable[[list[str]], None] | None, progress: SampleProgress,
                 job: "CertificationJob"):
        self.path, self.todo, self.write, self.progress, self.job = path, todo, write, progress, job
        self.mine = todo[job.rank::job.world]  # this process's images, for decoding ahead
        self.tick = progress.tick
        self.about = path

    def announce(self, also: str | None = None) -> None:
        """Say (rank 0) what runs now: `about`, and `also`; from here on a stop names this file."""
        self.job.stop.note = f"; {self.path} holds whole lines only; run the same command to continue"
        if self.job.master:
            print(self.about + (f"\n{also}" if also else ""), flush=True)

    def __iter__(self) -> Iterator[int]:
        rank, world = self.job.rank, self.job.world
        self.progress.start = self.progress.last = time.time()
        for r in range(0, len(self.todo), world):
            self.line = None
            if r + rank < len(self.todo):
                yield self.todo[r + rank]
            rows = [line for line in gather_objects(self.line) if line is not None]
            if self.write is not None:
                self.write(rows)
            self.progress.images_done(rows)

    def record(self, line: str) -> None:
        self.line = line


# ----------------------------------------------------------------------------------------------------
# Stopping: SIGINT at a desk, SIGTERM before a cluster's preemption

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        self.previous = {s: signal.signal(s, self._interrupt) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------
# Certification as a job: the machinery around certify.py's loop

class CertificationJob:
    """The run around certification's loop: the processes (joined on entry, left together at the end),
    SIGINT/SIGTERM as Interrupted with a note of what is on disk, and the results files' one-writer locks, held
    by rank 0 to the end. A run killed or restarted (torchrun --max-restarts) continues from its files: the
    same command certifies only the images they lack. Used as

        with CertificationJob(args.kernels, args.collective_timeout) as job:
            for images in job.share(files, header, indices, per_image, upper):
                for idx in images:                     # this process's images, round by round
                    images.record(results.row(...))    # rank 0 appends each round's lines
    """

    def __init__(self, kernels_backend: str, timeout: float = COLLECTIVE_TIMEOUT):
        self.kernels_backend, self.timeout = kernels_backend, timeout

    def __enter__(self) -> "CertificationJob":
        with contextlib.ExitStack() as stack:
            self.stop = stack.enter_context(Interruptible(" before certifying; nothing was written"))
            self.rank, self.world, self.device = start_processes(self.kernels_backend, self.timeout)
            self.master = self.rank == 0
            self.held = stack.pop_all()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.held.close()  # the locks, then the signal handlers
        if kind is None:
            close_processes()

    def share(self, files: list[tuple[str, dict]], header: str, indices: list[int], per_image: int,
              upper: bool) -> list[SharedImages]:
        """Per (TSV path, its run's configuration): the images of `indices` it still lacks, shared among the
        processes. Rank 0 takes every file's lock and reads what is there before anything is written; a refusal (a
        file of another configuration, a malformed line) ends every process with the same one line. per_image:
        samples an image draws at most (upper: the ETA is an upper bound)."""
        opened = []

        def read_all() -> list[set[int]]:
            for path, config in files:
                self.held.enter_context(results.lock_results(path))
                opened.append(results.Results(path, config, header))
            return [f.done for f in opened]
        done = decided_by_rank0(read_all, results.ResultsError)
        shared = []
        for k, (path, _) in enumerate(files):
            todo = [i for i in indices if i not in done[k]]
            progress = SampleProgress(len(indices) - len(todo), len(indices), len(todo), per_image, self.world, upper,
                                      self.master)
            shared.append(SharedImages(path, todo, opened[k].append if opened else None, progress, self))
        return shared
