"""ImageNet decoded ahead of the step in worker processes (data.Prefetcher): the same bytes as decoding each batch
when it is asked for (the synchronous path, --workers 0), from any step and on any rank; errors that name the
file; no worker left behind however the main process ends. On a GPU the same tests take the pinned-memory path."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import data
from conftest import ROOT
from jobs import UsageError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED, BATCH, SHARDS = 5, 4, 2


def write_jpegs(root, split: str = "train", classes: int = 3, per_class: int = 4, seed: int = 0) -> None:
    """Small JPEGs of varied shapes (one large enough for the centre crop's box-filter halving)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    shapes = [(60, 45), (45, 80), (120, 90), (500, 460), (90, 90), (75, 130)]
    for c in range(classes):
        os.makedirs(root / split / f"n{c:02d}", exist_ok=True)
        for k in range(per_class):
            w, h = shapes[(c * per_class + k) % len(shapes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"n{c:02d}" / f"{k}.JPEG", quality=90)


def step_views(images: data.Images, step: int, views: str, rank: int = 0, world: int = 1) -> list:
    """What a trainer's step_inputs asks for: each local shard's views with its step generator."""
    out = []
    for shard, idx in data.local_shards(data.batch_indices(len(images), BATCH, step, SEED, rank, world), rank, world, SHARDS):
        out.append((shard, images.views(idx, views, data.generator(DEVICE, SEED, "step", step, shard))))
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_prefetched_steps_equal_the_synchronous_path_from_any_step_and_rank(tmp_path):
    write_jpegs(tmp_path)
    sync = data.Images("imagenet", str(tmp_path), "train", DEVICE)
    want = {(step, shard): v for step in range(6) for shard, v in step_views(sync, step, "pretrain")}
    assert not same(want[0, 0], want[0, 1]) and not same(want[0, 0], want[3, 0])  # the shards and steps differ

    ahead = data.Images("imagenet", str(tmp_path), "train", DEVICE, workers=2)
    ahead.prefetch_steps(0, BATCH, SEED, 0, 1, SHARDS, "pretrain")
    for step in range(6):
        for shard, v in step_views(ahead, step, "pretrain"):
            assert v[0].device.type == DEVICE.type and same(v, want[step, shard]), (step, shard)
    resumed = data.Images("imagenet", str(tmp_path), "train", DEVICE, workers=2)
    resumed.prefetch_steps(3, BATCH, SEED, 0, 1, SHARDS, "pretrain")  # a run resumed at step 3
    for step in range(3, 6):
        assert all(same(v, want[step, shard]) for shard, v in step_views(resumed, step, "pretrain"))
    for rank in range(2):  # two processes, one shard each, give the one-process run's shards
        mine = data.Images("imagenet", str(tmp_path), "train", DEVICE, workers=2)
        mine.prefetch_steps(0, BATCH, SEED, rank, 2, SHARDS, "pretrain")
        for step in range(3):
            [(shard, v)] = step_views(mine, step, "pretrain", rank, 2)
            assert shard == rank and same(v, want[step, shard])
        mine.close()
    assert ahead.wait_seconds > 0
    ahead.close(), resumed.close()


@pytest.mark.parametrize("augment", ["strong", "autoaug"])
def test_prefetched_finetune_batches_equal_the_synchronous_ones(tmp_path, augment):
    """The whole batch, device augmentations included: prefetching leaves the step generator's draws alone."""
    write_jpegs(tmp_path, classes=2, per_class=2)
    sync = data.Images("imagenet", str(tmp_path), "train", DEVICE)
    ahead = data.Images("imagenet", str(tmp_path), "train", DEVICE, workers=2)
    ahead.prefetch_steps(0, 2, SEED, 0, 1, 1, augment)
    for step in range(2):
        idx = data.batch_indices(len(sync), 2, step, SEED)
        x, y = sync.finetune_batch(idx, data.generator(DEVICE, SEED, "step", step, 0), augment)
        x2, y2 = ahead.finetune_batch(idx, data.generator(DEVICE, SEED, "step", step, 0), augment)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    ahead.close()


def test_prefetched_chunks_equal_batch_and_their_workers_stop_at_the_end(tmp_path):
    write_jpegs(tmp_path, "val")
    sync = data.Images("imagenet", str(tmp_path), "test", DEVICE)
    ahead = data.Images("imagenet", str(tmp_path), "test", DEVICE, workers=2)
    chunks = torch.arange(1, len(sync)).split(5)  # 5, 5, 1 images: the last chunk is smaller
    ahead.prefetch(chunks)
    workers = ahead.prefetcher.workers
    for chunk in chunks:
        (x, y), (x2, y2) = sync.batch(chunk), ahead.batch(chunk)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert ahead.prefetcher is None and all(p.exitcode is not None for p in workers)
    assert torch.equal(ahead.batch(chunks[0])[0], sync.batch(chunks[0])[0])  # afterwards: decoded when asked
    ahead.prefetch(chunks)
    workers = ahead.prefetcher.workers
    with pytest.raises(RuntimeError, match="not the one prefetched"):
        ahead.batch(chunks[1])  # out of the announced order
    assert ahead.prefetcher is None and all(p.exitcode is not None for p in workers)


@pytest.mark.quick
def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path):
    write_jpegs(tmp_path, "val", classes=2, per_class=4)
    bad = tmp_path / "val" / "n01" / "2.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-scan, as a failed copy leaves it
    sync = data.Images("imagenet", str(tmp_path), "test", DEVICE)
    with pytest.raises(UsageError, match=f"cannot read the image {re.escape(str(bad))} \\(OSError: (?i:.*truncated)") as refused:
        sync.batch(torch.arange(8))
    assert "\n" not in str(refused.value)
    ahead = data.Images("imagenet", str(tmp_path), "test", DEVICE, workers=2)
    chunks = torch.arange(8).split(3)  # the file is image 6: the third chunk
    ahead.prefetch(chunks)
    workers = ahead.prefetcher.workers
    ahead.batch(chunks[0]), ahead.batch(chunks[1])  # served as the synchronous path serves them
    with pytest.raises(UsageError) as raised:
        ahead.batch(chunks[2])
    assert str(raised.value) == str(refused.value)
    assert ahead.prefetcher is None and all(p.exitcode is not None for p in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _descendants(pid: int) -> set[int]:
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (ValueError, OSError):
            continue
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


ENDINGS = ("exception", "ctrl-c", "killed")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("ending", ENDINGS)
def test_workers_never_outlive_the_main_process(tmp_path, ending):
    """The main process, its workers running, ends by an exception; by Ctrl-C (SIGINT to the whole process group,
    as a terminal sends it), which a trainer answers by finishing its step (StopSignal), so the workers must live
    on; or by SIGKILL of the main process alone (the OOM killer). Within seconds nothing it started is left
    (workers, forkserver), and no worker prints a traceback."""
    write_jpegs(tmp_path)
    script = textwrap.dedent(f"""
        import signal, sys, time
        sys.path.insert(0, {ROOT!r})
        import torch, data
        if __name__ == "__main__":
            stopped = []
            signal.signal(signal.SIGINT, lambda *_: stopped.append(1))  # as the trainers' StopSignal
            images = data.Images("imagenet", {str(tmp_path)!r}, "train", torch.device("cpu"), workers=2)
            images.prefetch_steps(0, 4, 0, 0, 1, 1, "pretrain")
            take = lambda step: images.views(data.batch_indices(len(images), 4, step, 0), "pretrain",
                                             data.generator(torch.device("cpu"), 0, "step", step, 0))
            take(0)
            print("running", flush=True)
            if {ending!r} == "exception":
                sys.stdin.readline()
                raise ValueError("a bug in the step")
            while not stopped:
                time.sleep(0.05)
            for step in range(1, 5):  # more steps than are decoded ahead: the workers outlived the SIGINT
                take(step)
            sys.exit(130)
    """)
    main = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own process group
    assert main.stdout.readline() == "running\n"
    started = _descendants(main.pid)
    assert len(started) >= 3, started  # the forkserver and two workers (and multiprocessing's resource tracker)
    if ending == "exception":
        main.stdin.write("\n")
        main.stdin.flush()
    elif ending == "ctrl-c":
        os.killpg(main.pid, signal.SIGINT)
    else:
        os.kill(main.pid, signal.SIGKILL)
    _, err = main.communicate(timeout=30)
    assert main.returncode == {"exception": 1, "ctrl-c": 130, "killed": -signal.SIGKILL}[ending], err
    assert not re.search(r"^Process .*:$", err, re.M) and err.count("Traceback") == (ending == "exception"), err
    deadline = time.time() + 10
    while any(_alive(p) for p in started) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in started), [p for p in started if _alive(p)]


@pytest.mark.quick
def test_workers_flag_defaults_to_the_cores_of_each_process(monkeypatch):
    import argparse
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser()
    data.add_workers_flag(parser)
    assert parser.parse_args([]).workers == cores and parser.parse_args(["--workers", "0"]).workers == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores: one each still
    assert data.cores_per_process() == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--workers", "-1"])


def test_input_benchmark_runs_in_quick_mode(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("imagenet_input", os.path.join(ROOT, "bench", "imagenet_input.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--folder", str(tmp_path)])
    out = capsys.readouterr().out
    for views in ("pretrain", "weak", "strong", "autoaug"):
        assert re.search(rf"^  {views} +\d+\.\d ", out, re.M), out
    assert re.search(r"max\(step, decode\) +step \+ decode", out) and "rRCM-B: 35.3 GFLOP" in out, out


def test_the_stages_on_imagenet_give_the_same_results_with_and_without_workers(tmp_path):
    """pretrain.py, finetune.py (its per-epoch evaluation too) and certify.py as a user runs them on a tiny ImageNet,
    with --workers 2 and with --workers 0: the same weights, evaluation and certificates."""
    import certify
    import finetune
    import pretrain
    from conftest import FAST
    from jobs import load_checkpoint
    write_jpegs(tmp_path, "train", classes=2, per_class=4)
    write_jpegs(tmp_path, "val", classes=2, per_class=2, seed=1)
    fast = [*FAST, "--data-dir", str(tmp_path)]
    outputs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        pretrain.main(["--dataset", "imagenet", "--preset", "tiny", "--steps", "2", "--batch", "4", "--warmup", "0",
                       "--workers", workers, "--out", str(out / "pre"), *fast])
        finetune.main(["--dataset", "imagenet", "--init", str(out / "pre" / "ckpt.pt"), "--epochs", "1", "--batch", "4",
                       "--eval-images", "3", "--workers", workers, "--out", str(out / "ft"), *fast])
        certify.main(["--checkpoint", str(out / "ft" / "ckpt.pt"), "--sigma", "0.5", "--n0", "10", "--n", "20", "--batch", "100",
                      "--num", "3", "--skip", "1", "--workers", workers, "--out", str(out / "c.tsv"), *fast])
        outputs[workers] = dict(pre=load_checkpoint(str(out / "pre" / "ckpt.pt"), "pretrain")["model"],
                                ft=load_checkpoint(str(out / "ft" / "ckpt.pt"), "finetune")["model"],
                                tsv=["\t".join(line.split("\t")[:5]) for line in (out / "c.tsv").read_text().splitlines()],
                                log=[line for line in (out / "ft" / "log.txt").read_text().splitlines() if line.startswith("epoch")])
    for stage in ("pre", "ft"):
        assert all(torch.equal(outputs["0"][stage][k], outputs["2"][stage][k]) for k in outputs["0"][stage]), stage
    assert outputs["0"]["tsv"] == outputs["2"]["tsv"] and len(outputs["0"]["tsv"]) == 4
    assert outputs["0"]["log"] == outputs["2"]["log"] and len(outputs["0"]["log"]) == 1
    assert "data wait" in (tmp_path / "w2" / "pre" / "log.txt").read_text()
