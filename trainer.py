"""The training loop's skeleton, shared by pretrain.py and finetune.py: the run around a loop whose body is the
method. Processes, precision and kernels (jobs.py); continuing from <out>/ckpt.pt; the memory check that picks
micro-batches before the first step; log lines with the global batch's losses, throughput and ETA; checkpoints
every --save-every steps and --save-minutes minutes, at the end and on SIGINT/SIGTERM (finish the step, save,
exit); and the warm-up + cosine learning-rate schedule both trainers follow.

One command line serves every launch: the first, a requeue after preemption, torchrun's restart after a lost
process or node. With --resume auto (the default) a run starts fresh when --out holds no ckpt.pt and continues,
bit-identically, when it holds one of the same run-defining settings; another run's checkpoint is refused.
"""
import argparse
import datetime
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import torch
import torch.distributed as dist

import kernels
from jobs import (STOP_SIGNALS, RunError, UsageError, add_device_flags, at_least, autocast, clock, close_processes,
                  decided_by_rank0, distributed, gather_objects, load_checkpoint, lost_process, non_negative,
                  peak_bf16_flops, run_log, save_checkpoint, start_processes)
from model import SIGMA_MIN, ViT, ViTConfig


RESUME = ("auto", "never", "must")


def add_run_flags(g, save_every: int, save_when: str) -> None:
    """The flags both trainers share: seed and shards, logging, checkpoints, compilation, kernels, precision."""
    g.add_argument("--seed", type=int, default=0, help="all randomness of step k is derived from (seed, k, shard)")
    g.add_argument("--shards", type=at_least(1), default=int(os.environ.get("WORLD_SIZE", 1)), help="independent "
                   "random streams per step, by default the number of processes; runs with equal --shards agree "
                   "whatever the number of processes dividing it (give it when that number may change: torchrun "
                   "--nnodes=MIN:MAX)")
    g.add_argument("--log-every", type=at_least(1), default=50, help="steps between log lines (also step 1 and the last)")
    g.add_argument("--save-every", type=at_least(1), default=save_every, help=f"steps between checkpoints ({save_when})")
    g.add_argument("--save-minutes", type=non_negative, default=30.0, help="also a checkpoint at the first step that "
                   "ends this many minutes after the last one (0: only --save-every)")
    g.add_argument("--resume", choices=RESUME, nargs="?", const="must", default="auto", help="<out>/ckpt.pt: auto "
                   "continues it when it is there (and refuses one of other settings), else starts fresh; never "
                   "refuses to start where one is; must (also --resume alone) refuses to start without one")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the transformer blocks (ViT.compile_blocks)")
    add_device_flags(g)


def check_out_dir(out: str) -> None:
    """Refuse, in one line, an output directory that cannot be created or written."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out} is not writable")


def resume_checkpoint(out_dir: str, kind: str, resume: str, config: dict, run_keys: tuple) -> dict | None:
    """The checkpoint to continue from, or None for a fresh run, as --resume (auto, never, must) says. Refuses one
    whose run-defining settings (`run_keys`) differ from `config`, and one that cannot be read. Rank 0 decides and
    every process loads the same file (--out must be on storage every node sees)."""
    path = os.path.join(out_dir, "ckpt.pt")
    loaded = {}

    def decide() -> int | None:
        if not os.path.exists(path):
            if resume == "must":
                raise UsageError(f"--resume must, but {path} does not exist")
            return None
        if resume == "never":
            raise UsageError(f"{path} exists and --resume is never: choose another --out, or move it away")
        try:
            checkpoint = load_checkpoint(path, kind)
        except UsageError as e:
            raise UsageError(f"{e}: move it away to start this run afresh") from None
        changed = [k for k in run_keys if checkpoint["config"].get(k) != config[k]]
        if changed:
            hint = " (--shards defaults to the number of processes: give the run's)" if changed == ["shards"] else ""
            raise UsageError(f"{path} was made with different {', '.join('--' + k.replace('_', '-') for k in changed)}"
                             f"{hint}; choose another --out")
        loaded["checkpoint"] = checkpoint
        return checkpoint["step"]
    step = decided_by_rank0(decide)
    if step is None:
        return None
    problem = None
    if "checkpoint" not in loaded:  # the other processes read the file rank 0 chose
        try:
            loaded["checkpoint"] = load_checkpoint(path, kind)
            if loaded["checkpoint"]["step"] != step:
                problem = f"{path} holds step {loaded['checkpoint']['step']} here but step {step} on rank 0"
        except UsageError as e:
            problem = str(e)
    problems = [p for p in gather_objects(problem) if p is not None]
    if problems:
        raise UsageError(f"{problems[0]}: --out must be on storage that every node shares")
    return loaded["checkpoint"]


# ----------------------------------------------------------------------------------------------------
# Progress and stopping

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


def forward_seconds_per_image(model: ViT, x: torch.Tensor, t: float, autocast) -> float:
    """Seconds of one no-grad forward per image of x (timed after a warm-up call): the first guess of a step's
    time that lets a slow run (preset B on a CPU) say how long it will take before its first step ends. A
    backward costs about two forwards. Timing one image keeps the guess cheap where the forward is slow and
    errs long (bench/README.md)."""
    # Eager, compiled blocks included: compiling a graph for this shape would cost more than the guess saves.
    with torch.no_grad(), autocast, torch.compiler.set_stance("force_eager"):
        model.features(x, t)
        start = time.time()
        model.features(x, t)
    return (time.time() - start) / len(x)


class StopSignal:
    """Records SIGINT/SIGTERM instead of dying mid-step, while the training loop runs inside `with`; the
    previous handlers come back afterwards. `agree()` is called once per step and is collective under
    torchrun, so every rank stops after the same step (one rank leaving early would hang the others'
    all-reduces). The first signal says at once what will happen; a second one exits at once, keeping the
    last checkpoint on disk (written atomically, so never torn)."""

    SIGNALS = STOP_SIGNALS
    WAIT = 10.0  # seconds a signalled process waits for the others' agreement: a scheduler's grace ends soon after

    def __init__(self, timeout: float = WAIT):
        self.wait = min(self.WAIT, timeout)  # the collective timeout, if shorter, fails the wait first

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

    def agree(self, device: torch.device, save: bool) -> tuple[bool, bool]:
        """(stop, save) alike on every rank: stop if any rank was signalled, save if rank 0 says so (its clock
        decides --save-minutes). One all-reduce, which a signalled rank waits for at most `wait` seconds: then it
        is a RunError, as a lost process is."""
        now = time.time()
        self.step_seconds, self.last_call = now - self.last_call, now
        if not distributed():
            return self.signum != 0, save
        flags = torch.tensor([self.signum, int(save)], device=device)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
        if self.signum == 0:
            work.wait()
        else:
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.wait))
            except RuntimeError:
                raise RunError(f"stopped by {signal.Signals(self.signum).name}, and the other processes did not "
                               f"answer within {self.wait:g} s") from None
        self.signum = int(flags[0].item())
        return self.signum != 0, bool(flags[1].item())

    def exit(self, script: str, step: int, path: str) -> None:
        name = signal.Signals(self.signum).name if self.signum > 0 else "a signal"
        if self.speaks:
            print(f"{script}: stopped by {name} after step {step}; checkpoint {path} saved, run the same command to "
                  f"continue", file=sys.stderr, flush=True)
        close_processes()
        sys.exit(128 + max(self.signum, 1))


# ----------------------------------------------------------------------------------------------------
# Memory: micro-batches that fit the device, or one line that says what to change

# Bytes a ViT keeps for its backward, per image, token, unit of width and block, for one encoder pass with
# gradient: rounded up from what rRCM-S and B keep (bench/README.md, "Micro-batching"), so an estimate errs on the
# safe side.
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
# The skeleton

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
    """The run around a training loop: processes, precision and kernels; continuing from a checkpoint; the log;
    checkpoints every --save-every steps and --save-minutes, at the end and on SIGINT/SIGTERM; the estimate of the
    run's time. A stage uses it as

        run = Trainer(args, "pretrain", RUN_KEYS)              # kernels, processes, precision, --shards checked
        step = run.resume(model=model, optimizer=opt)          # what a checkpoint holds; loaded if --out has one
        run.start(model, sample, step, total, forwards_per_image)
        for step in run.steps(step, total):                   # saves and stops between steps
            ... one optimizer step ...
            if run.log_due(step + 1):
                run.log(step + 1, dict(loss=loss), f"lr {lr:.2e}")
    """

    def __init__(self, args: argparse.Namespace, kind: str, run_keys: tuple):
        self.args, self.kind, self.run_keys, self.script = args, kind, run_keys, f"{kind}.py"
        self.rank, self.world, self.device = start_processes(args.kernels, args.collective_timeout)
        self.master = self.rank == 0
        self.precision = args.precision  # "bf16" or "fp32": the flags resolve auto as they are parsed
        self.autocast = autocast(self.device, self.precision)
        if args.shards % self.world or args.batch % args.shards:
            raise UsageError(f"--shards {args.shards} must be a multiple of the {self.world} process(es) and divide "
                             f"--batch {args.batch}")
        self.path = os.path.join(args.out, "ckpt.pt")
        self.state: dict = {}

    def resume(self, **state) -> int:
        """Name what a checkpoint holds (`model=`, `target=`, `optimizer=`: anything with a state_dict) and load it
        from <out>/ckpt.pt where --resume says so. Returns the step to start at."""
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
        per_image = activation_bytes(model.cfg, self.precision)
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
                 f"{self.device.type} | precision {self.precision} | kernels {kernels.backend()}{about} | "
                 f"config: {vars(self.args)}")
        if getattr(self, "memory", None):
            self.log_line(self.memory)
        if first:
            self.log_line(f"resuming {self.path} at step {first}" + (": the run is complete" if first >= total else ""))
        if self.device.type == "cpu":
            per_step = (forward_seconds_per_image(model, sample, SIGMA_MIN, self.autocast) * forwards_per_image
                        * self.args.batch / self.world)
            self.log_line(f"estimate from a timed forward: {per_step:.1f} s per step, {clock(per_step * (total - first))} "
                     f"for the {total - first} steps to go")

    def steps(self, first: int, total: int, save_also: Callable[[int], bool] = lambda done: False, data=None) -> Iterator[int]:
        """Steps first .. total - 1. After each: a checkpoint every --save-every steps, at the first step ending
        --save-minutes after the last save, at the last step, and where `save_also(steps done)`; a SIGINT/SIGTERM
        received during a step saves and exits after it. With `data` (an ImageNet Images) the log says how long each
        step waited for it."""
        with StopSignal(self.args.collective_timeout) as stop:
            self.progress = StepProgress(first, total, self.args.batch, data if getattr(data, "dataset", "") == "imagenet" else None)
            last_save = time.time()
            for step in range(first, total):
                yield step
                done = step + 1
                late = self.master and 0 < self.args.save_minutes * 60 <= time.time() - last_save
                try:
                    stopping, late = stop.agree(self.device, late)
                except RuntimeError as e:  # the others are gone, yet this rank's state after the step is whole
                    reason = str(e) if isinstance(e, RunError) else lost_process(e)
                    if reason is None:
                        raise
                    self.save(done)
                    raise RunError(reason + (f"; checkpoint {self.path} saved at step {done}" if self.master else "")) from None
                if late or stopping or done % self.args.save_every == 0 or done == total or save_also(done):
                    self.save(done)
                    last_save = time.time()
                if stopping and done < total:
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
