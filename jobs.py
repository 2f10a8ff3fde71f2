"""What the two training scripts share as long jobs: progress a person can read, and a clean stop.

A run on a cluster is stopped by SIGTERM before preemption and by Ctrl-C (SIGINT) at a desk. Either one
sets a flag; the training loop finishes the step it is in, writes a checkpoint at that step (atomically)
and exits, and `--resume` continues exactly where it stopped. A second signal during that save gets the
default behaviour (the checkpoint on disk is then the previous one, never a torn file).
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


class StopSignal:
    """Records SIGINT/SIGTERM instead of dying mid-step. `requested()` is collective under torchrun, so
    every rank stops after the same step (one rank leaving early would hang the others' all-reduces)."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._record)

    def _record(self, signum, frame) -> None:
        self.signum = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    def requested(self, device: torch.device) -> bool:
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
