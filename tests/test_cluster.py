"""What clusters do to jobs, on CPU with gloo: a rank SIGKILLed under torchrun --max-restarts (the others are
restarted with it and continue from the last checkpoint, or from the TSVs), a rank that stops answering (the others
end within --collective-timeout, in one line), a node lost (the run goes on with fewer processes and the same
--shards), a checkpoint write that fails, a corrupt checkpoint, checkpoints by wall time, and a process group that
cannot form. Every run is eager fp32 (conftest.FAST), whatever the CPU's bf16 support; the reference a restarted run
must equal is an uninterrupted run in one process with the same --shards, to float rounding (tests/test_faults.py:
UPDATE_TOLERANCE), and TSVs equal line for line but for the time column."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import certify
import jobs
import pretrain
from conftest import FAST, ROOT, finetune_args, refusal, update_difference
from jobs import load_checkpoint

UPDATE_TOLERANCE = 1e-4  # as tests/test_faults.py: one process and two differ only in summation order


def torchrun(argv: list, tmp_path, restarts: int = 0) -> subprocess.Popen:
    """Two gloo processes on the CPU under torchrun; their output and the launcher's go to the files `.out` and
    `.err` name (one pair per launch in tmp_path)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "--", *argv]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launch = len(list(tmp_path.glob("launch*.out")))
    out, err = tmp_path / f"launch{launch}.out", tmp_path / f"launch{launch}.err"
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=open(out, "w"), stderr=open(err, "w"), env=env)
    process.out, process.err = out, err
    return process


def wait_for(check, what: str, process: subprocess.Popen, timeout: float = 300):
    """Poll `check()` until it is truthy; fail if the launcher ends first or time runs out."""
    end = time.time() + timeout
    while time.time() < end:
        if value := check():
            return value
        assert process.poll() is None, f"torchrun ended (exit {process.returncode}) before {what}"
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout} s")


def worker(launcher: subprocess.Popen, rank: int, restart: int = 0) -> int | None:
    """The pid of the launcher's worker of `rank` in round `restart` (torchrun's env: RANK, TORCHELASTIC_RESTART_COUNT)."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != launcher.pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"RANK") == str(rank).encode() and env.get(b"TORCHELASTIC_RESTART_COUNT") == str(restart).encode():
            return int(pid)
    return None


def running(pid: int) -> bool:
    """Alive and not a zombie (torchrun reaps its workers only when it looks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def text(path) -> str:
    return open(path, errors="replace").read()


def assert_same_run(got: dict, want: dict, start: dict, parts=("model",)) -> None:
    for part in parts:
        gap = update_difference(got[part], want[part], start)
        assert gap < UPDATE_TOLERANCE, f"{part}: updates differ by {gap:.2%}"


PRETRAIN_STEPS = 6


def pretrain_argv(cifar_dir, out, *extra) -> list:
    return ["pretrain.py", "--data-dir", cifar_dir, "--out", str(out), "--preset", "tiny", "--steps", str(PRETRAIN_STEPS),
            "--batch", "8", "--warmup", "1", "--log-every", "1", "--save-every", "2", "--shards", "2", *FAST, *extra]


@pytest.fixture(scope="module")
def pretrained(cifar_dir, tmp_path_factory) -> tuple[dict, dict]:
    """(the uninterrupted run's checkpoint, the initial weights): one process, --shards 2."""
    out = tmp_path_factory.mktemp("uninterrupted")
    pretrain.main(pretrain_argv(cifar_dir, out)[1:])
    torch.manual_seed(0)
    start = pretrain.ViT(pretrain.vit_config("tiny", "cifar10")).state_dict()
    return load_checkpoint(str(out / "ckpt.pt"), "pretrain"), start


def test_a_rank_killed_under_max_restarts_is_restarted_and_the_run_ends_as_if_uninterrupted(pretrained, cifar_dir, tmp_path):
    """torchrun --max-restarts=1, rank 1 SIGKILLed after step 3: both ranks start again with the same command
    line, from the last checkpoint, and the weights at step 6 are those of an uninterrupted run. Checkpoints come
    every step by wall time (--save-minutes 1e-6, decided by rank 0 for both), and rank 0 saves the
    step it finished when it finds its peer gone: the restart loses no step it could keep."""
    launcher = torchrun(pretrain_argv(cifar_dir, tmp_path / "run", "--save-minutes", "1e-6"), tmp_path, restarts=1)
    try:
        wait_for(lambda: f"step 3/{PRETRAIN_STEPS} |" in text(launcher.out), "step 3", launcher)
        os.kill(worker(launcher, 1), signal.SIGKILL)
        assert launcher.wait(timeout=300) == 0, text(launcher.err)[-3000:]
    finally:
        launcher.kill()
    out = text(launcher.out)
    resumed = [line for line in out.splitlines() if line.startswith("resuming")]
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) in (3, 4, 5), out  # saved every step: at most one lost
    assert out.count(f"step {PRETRAIN_STEPS}/{PRETRAIN_STEPS} |") == 1
    want, start = pretrained
    got = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "pretrain")
    assert got["step"] == PRETRAIN_STEPS and got["config"]["shards"] == 2
    assert_same_run(got, want, start, ("model", "target"))


def test_a_stopped_rank_ends_the_others_within_the_timeout_and_one_process_finishes_the_run(pretrained, cifar_dir, tmp_path):
    """Rank 1 SIGSTOPped (a hung GPU, a frozen node) while rank 0 is told to stop (SIGTERM, as a scheduler does):
    rank 0 does not wait forever or for torch's default, but ends within --collective-timeout with one line naming
    the likely cause, leaving a whole checkpoint. Then the node is lost for good: the same command in one process,
    with the same --shards, continues to the uninterrupted run's weights."""
    timeout = 4
    launcher = torchrun(pretrain_argv(cifar_dir, tmp_path / "run", "--collective-timeout", str(timeout)), tmp_path)
    try:
        wait_for(lambda: f"step 3/{PRETRAIN_STEPS} |" in text(launcher.out), "step 3", launcher)
        hung, survivor = worker(launcher, 1), worker(launcher, 0)
        os.kill(hung, signal.SIGSTOP)
        os.kill(survivor, signal.SIGTERM)
        stopped = time.time()
        wait_for(lambda: not running(survivor), "rank 0's exit", launcher, timeout=timeout + 60)
        waited = time.time() - stopped
        os.kill(hung, signal.SIGKILL)
        assert launcher.wait(timeout=60) != 0
    finally:
        launcher.kill()
    assert waited < timeout + 30, waited  # the timeout and the step rank 0 was in, on a loaded machine
    said = [line for line in text(launcher.err).splitlines() if line.startswith("pretrain.py: ")]
    assert said[0].startswith("pretrain.py: SIGTERM received: finishing the current step"), said
    assert len(said) == 2 and said[1].startswith("pretrain.py: error: "), said
    assert (f"no answer from another process within --collective-timeout {timeout} s" in said[1]
            or "the other processes did not answer within" in said[1]), said[1]
    # no traceback from the project's scripts (torchrun prints its own, from the venv, which may lie inside ROOT)
    assert not re.search(rf'File "{re.escape(ROOT)}/(?!\.?venv/)', text(launcher.err)), text(launcher.err)
    cut = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "pretrain")
    assert 2 <= cut["step"] < PRETRAIN_STEPS
    pretrain.main(pretrain_argv(cifar_dir, tmp_path / "run")[1:])  # the node is gone: one process, --shards 2
    want, start = pretrained
    assert_same_run(load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "pretrain"), want, start, ("model", "target"))


def test_finetuning_restarted_by_torchrun_then_requeued_ends_as_if_uninterrupted(cifar_dir, tmp_path):
    """Fine-tuning from scratch, 2 epochs of 3 steps, one command line for all of it: rank 1 SIGKILLed after step 2
    (torchrun --max-restarts=1 restarts both from the last checkpoint); then SIGTERM to torchrun, as a scheduler
    sends before its kill (the processes finish the step, save and exit); then the same command again, as a
    requeued batch script runs it. The weights at step 6 are an uninterrupted run's."""
    import finetune
    argv = lambda out: finetune_args(cifar_dir, out, "--epochs", "2", "--save-every", "2", "--log-every", "1", "--shards", "2",
                                     "--train-images", "24", "--batch", "8", "--eval-images", "4")
    launcher = torchrun(["finetune.py", *argv(tmp_path / "run")], tmp_path, restarts=1)
    try:
        wait_for(lambda: "step 2/6 |" in text(launcher.out), "step 2", launcher)
        os.kill(worker(launcher, 1), signal.SIGKILL)
        wait_for(lambda: "step 4/6 |" in text(launcher.out).partition("resuming")[2], "step 4 after the restart", launcher)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) != 0
    finally:
        launcher.kill()
    stopped = [line for line in text(launcher.err).splitlines() if line.startswith("finetune.py: stopped by SIGTERM after step ")]
    assert len(stopped) == 1 or "step 6/6 |" in text(launcher.out), text(launcher.err)[-3000:]  # or it ended first
    requeued = torchrun(["finetune.py", *argv(tmp_path / "run")], tmp_path)
    assert requeued.wait(timeout=300) == 0, text(requeued.err)[-3000:]
    step = stopped[0].split("after step ")[1].split(";")[0] if stopped else "6"
    assert f"ckpt.pt at step {step}" in text(requeued.out), text(requeued.out)
    finetune.main(argv(tmp_path / "one"))
    start = finetune.build_model(finetune.parse_args(argv(tmp_path / "one"))).state_dict()
    got, want = (load_checkpoint(str(tmp_path / d / "ckpt.pt"), "finetune") for d in ("run", "one"))
    assert got["step"] == want["step"] == 6
    assert_same_run(got, want, start)


def test_certification_restarted_by_torchrun_loses_and_repeats_no_line(finetuned, cifar_dir, tmp_path):
    """Rank 1 SIGKILLed once the TSV has its first round of lines: torchrun restarts both, rank 0 continues the
    file, and it equals a one-process run's line for line (but for the time column)."""
    argv = lambda out: ["--checkpoint", finetuned, "--data-dir", cifar_dir, "--out", str(out), "--sigma", "0.25", "--n",
                        "100", "--n0", "100", "--num", "6", "--skip", "3", "--batch", "100", *FAST]
    launcher = torchrun(["certify.py", *argv(tmp_path / "two.tsv")], tmp_path, restarts=1)
    try:
        wait_for(lambda: os.path.exists(tmp_path / "two.tsv") and text(tmp_path / "two.tsv").count("\n") >= 3,
                 "the first round of lines", launcher)
        os.kill(worker(launcher, 1), signal.SIGKILL)
        assert launcher.wait(timeout=300) == 0, text(launcher.err)[-3000:]
    finally:
        launcher.kill()
    announced = [line for line in text(launcher.out).splitlines() if line.startswith("CERTIFY sigma 0.25")]
    assert len(announced) == 2 and ", 0 already in" in announced[0] and ", 0 already in" not in announced[1], announced
    certify.main(argv(tmp_path / "one.tsv"))
    without_time = lambda path: [line.split("\t")[:5] for line in text(path).splitlines()]
    assert len(without_time(tmp_path / "one.tsv")) == 7 and without_time(tmp_path / "two.tsv") == without_time(tmp_path / "one.tsv")


def test_a_checkpoint_write_that_fails_keeps_the_previous_one(tmp_path):
    """A disk that fills up (a file size limit, with SIGXFSZ ignored so that the write fails instead of killing
    the process): one line and exit 1, no temporary file left, and ckpt.pt still the previous checkpoint."""
    path = tmp_path / "ckpt.pt"
    script = f"""
import resource, signal, sys, torch
sys.argv[0] = "pretrain.py"
import jobs
jobs.save_checkpoint({str(path)!r}, dict(kind="pretrain", step=1, weights=torch.zeros(10)))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
jobs.run_script(lambda: jobs.save_checkpoint({str(path)!r}, dict(kind="pretrain", step=2, weights=torch.zeros(100_000))))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == (
        f"pretrain.py: error: cannot write checkpoint {path}: File too large (the previous checkpoint there is intact); "
        f"free space or choose another --out\n"), result.stderr
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    previous = torch.load(path, weights_only=True)
    assert previous["step"] == 1 and torch.equal(previous["weights"], torch.zeros(10))


@pytest.mark.quick
def test_a_corrupt_checkpoint_is_refused_in_one_line(cifar_dir, tmp_path):
    """A ckpt.pt cut short (a copy interrupted, a file system that lost its tail): the same command refuses it,
    names it and says what to do, rather than starting afresh over it."""
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04" + bytes(1000))
    said = refusal("pretrain.py", pretrain_argv(cifar_dir, tmp_path)[1:])
    assert said.startswith(f"pretrain.py: error: checkpoint {tmp_path / 'ckpt.pt'} is truncated or not a checkpoint")
    assert said.endswith(": move it away to start this run afresh") and "\n" not in said, said
    assert (tmp_path / "ckpt.pt").read_bytes() == b"PK\x03\x04" + bytes(1000)


def test_checkpoints_by_wall_time(cifar_dir, tmp_path, monkeypatch):
    """--save-minutes: a checkpoint at the first step that ends that long after the last one, here every step,
    besides --save-every (100: never within the run) and the last step."""
    import trainer
    saved = []
    real = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda path, ckpt: saved.append(ckpt["step"]) or real(path, ckpt))
    pretrain.main(["--data-dir", cifar_dir, "--out", str(tmp_path), "--preset", "tiny", "--steps", "3", "--batch", "20",
                   "--warmup", "1", "--save-every", "100", "--save-minutes", "1e-6", *FAST])
    assert saved == [1, 2, 3]


def test_a_process_group_that_cannot_form_ends_in_one_line(monkeypatch, capsys):
    """Nobody listens where the process group meets (a restart whose peer is gone): one line and exit 1, so that
    torchrun, not a traceback, decides what comes next."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    monkeypatch.setattr(sys, "argv", ["certify.py"])
    for key, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exited:
        jobs.run_script(lambda: jobs.start_processes("torch", timeout=1.0))
    said = str(exited.value.code)
    assert said.startswith("certify.py: error: the processes could not connect (") and "\n" not in said, said
    assert said.endswith("under torchrun --max-restarts the next restart tries again")
