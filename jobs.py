"""What the scripts share as jobs: the processes (one per GPU under torchrun, gloo on CPU), who speaks,
progress a person can read, and a clean stop.

A run on a cluster is stopped by SIGTERM before preemption and by Ctrl-C (SIGINT) at a desk. Either one
sets a flag; the training loop finishes the step it is in, writes a checkpoint at that step (atomically)
and exits, and `--resume` continues exactly where it stopped. A second signal during that save gets the
default behaviour (the checkpoint on disk is then the previous one, never a torn file).
"""
import argparse
import os
import signal
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


class StopSignal:
    """Records SIGINT/SIGTERM instead of dying mid-step, while the training loop runs inside `with`; the
    previous handlers come back afterwards. `requested()` is called once per step and is collective under
    torchrun, so every rank stops after the same step (one rank leaving early would hang the others'
    all-reduces). The first signal says at once what will happen and roughly when (a step of rRCM-B on a
    CPU takes hours); a second one exits at once, keeping the last checkpoint on disk (they are written
    atomically, so none is ever torn)."""

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
        if dist.is_initialized() and dist.get_world_size() > 1:
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


def add_run_flags(g, save_every: int, save_when: str) -> None:
    """The flags both trainers share: seed and shards, logging, checkpoints, compilation, kernels, precision."""
    import kernels
    from model import PRECISIONS
    g.add_argument("--seed", type=int, default=0, help="all randomness of step k is derived from (seed, k, shard)")
    g.add_argument("--shards", type=int, default=None, help="independent random streams per step (unset: the number "
                   "of processes); runs with equal --shards agree whatever the number of processes dividing it")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines (also step 1 and the last)")
    g.add_argument("--save-every", type=int, default=save_every, help=f"steps between checkpoints ({save_when})")
    g.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the transformer blocks (ViT.compile_blocks)")
    g.add_argument("--kernels", choices=kernels.BACKENDS, default=kernels.backend(), help="fused Triton kernels or PyTorch")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32")


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (days spelled out), for elapsed time and ETA."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class Progress:
    """`step k/K`, throughput, elapsed and ETA from the steps done in this process (a resumed run's ETA
    counts only the steps still to do)."""

    def __init__(self, first_step: int, total: int, images_per_step: int):
        self.start, self.first, self.total, self.images = time.time(), first_step, total, images_per_step
        self.last_time, self.last_step = self.start, first_step

    def line(self, step: int) -> str:
        now = time.time()
        self.rate = (step - self.last_step) * self.images / max(now - self.last_time, 1e-9)  # since the last line
        per_step = (now - self.start) / max(step - self.first, 1)
        self.last_time, self.last_step = now, step
        return (f"{self.rate:.1f} img/s | elapsed {clock(now - self.start)} | "
                f"ETA {clock(per_step * (self.total - step))}")


def forward_seconds_per_image(model, x: torch.Tensor, t: float, mixed) -> float:
    """Seconds of one no-grad forward per image of x (timed after a warm-up call): the first guess of a step's
    time that lets a slow run (preset B on a CPU) say how long it will take before its first step ends. A
    backward costs about two forwards. The scripts time one image, which keeps the guess cheap where the forward
    is slow (the Triton interpreter in the tests) and errs long: on 2 cores one image takes 1.3-1.6x the time
    per image of a batch of 16 (tiny and S presets, measured 2026-11-23), the cores being less busy."""
    # Eager, compiled blocks included: compiling a graph for this shape would cost more than the guess saves.
    with torch.no_grad(), mixed, torch.compiler.set_stance("force_eager"):
        model.features(x, t)
        start = time.time()
        model.features(x, t)
    return (time.time() - start) / len(x)


def close_processes() -> None:
    """Leave the process group together: a rank that tears down its connections while another still
    talks to it makes gloo abort that other rank (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_out_dir(out: str) -> None:
    """Refuse, in one line, an output directory that cannot be created or written."""
    from model import UsageError
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out} is not writable")


# ----------------------------------------------------------------------------------------------------
# Processes: which rank sees which share of the data, and which one speaks

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


def run_log(out_dir: str, master: bool) -> Callable[[str], None]:
    """A print to stdout and <out_dir>/log.txt on rank 0; a no-op on the other ranks."""
    if not master:
        return lambda line: None
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "log.txt"), "a")

    def say(line: str) -> None:
        for stream in (sys.stdout, log):
            print(line, file=stream, flush=True)
    return say


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of x concatenated in rank order (no gradient), and this rank's row offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]
