"""Shared test set-up. TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here."""
import fcntl
import os
import pickle
import subprocess
import sys
import types

os.environ["TRITON_INTERPRET"] = "0" if os.environ.get("RRCM_TEST_GPU") == "1" else "1"  # 1: no GPU; see bench/gpu_check.py
# Inductor's C++ for a CPU without vector intrinsics: half the compile time of the tests that compile (on a GPU
# Inductor writes Triton, not C++, so nothing the GPU path depends on changes). Read when torch is imported.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# The interpreter multiplies tile-sized numpy arrays (128 x 128 at most): BLAS threads gain nothing there and,
# beside torch's own thread pool, spin and contend for the 2 cores (the GPU-path tests ran 2-4x slower with them).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Under pytest-xdist (-n) the workers share the cores: one torch thread each, or their thread pools spin against
# each other (a tiny training test ran 4x slower with 2 workers x 2 threads on 2 cores). Scripts the tests start
# inherit it, as torchrun's ranks get it anyway.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: the fast tier (python -m pytest -q -m quick tests): each module of the "
                                       "project in at most 90 s on 2 cores; the full suite runs everything")
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: hand out whole files in collection order
        config.option.loadscopereorder = False


# The slowest files, slowest first: under `-n auto --dist loadfile` the workers take whole files in collection order,
# so these start at once rather than last (xdist's own order, most tests first, left test_gpu_path.py, 2 tests and
# the longest file, to run alone at the end).
SLOWEST_FIRST = ("test_gpu_path.py", "test_gpu_path_certify.py", "test_cluster.py", "test_gpu_compile.py",
                 "test_gpu_check.py", "test_faults.py", "test_certify_runs.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: SLOWEST_FIRST.index(item.path.name) if item.path.name in SLOWEST_FIRST else len(SLOWEST_FIRST))


def write_cifar(folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> None:
    """A tiny CIFAR-10 in the official pickle layout. Class c is a solid colour pattern plus noise, so a
    model can learn it in a few steps."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "cifar-10-batches-py"), exist_ok=True)
    palette = rng.integers(0, 256, size=(10, 3))

    def batch(n):
        labels = rng.integers(0, 10, size=n)
        images = palette[labels][:, :, None].repeat(1024, axis=2) + rng.normal(0, 20, size=(n, 3, 1024))
        return {b"data": np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels.tolist()}

    files = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in files.items():
        with open(os.path.join(folder, "cifar-10-batches-py", name), "wb") as f:
            pickle.dump(batch(n), f, protocol=4)


def built_once(tmp_path_factory, name: str, build) -> str:
    """The folder `name` made by build(folder) once per test run: under pytest-xdist the first worker that asks
    builds it, the others wait for it and reuse it (the confident classifier takes 10 s to train)."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root  # the workers' folders share a parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "built").exists():
            folder.mkdir(exist_ok=True)
            build(str(folder))
            (folder / "built").touch()
    return str(folder)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> str:
    return built_once(tmp_path_factory, "cifar", write_cifar)


@pytest.fixture
def torch_kernels():
    kernels.use("torch")
    yield
    kernels.use("torch")


@pytest.fixture
def triton_kernels():
    kernels.use("triton")
    yield
    kernels.use("torch")


@pytest.fixture
def stand_in_matplotlib(monkeypatch) -> types.SimpleNamespace:
    """matplotlib (optional, and not installed in CI) replaced by a recorder: what was drawn (`lines`: x, y, style,
    label), set on the axes (`axes`: xlabel, ylim, ...) and saved (`saved`: paths)."""
    drawn = types.SimpleNamespace(lines=[], saved=[], axes={})

    class Axes:
        def plot(self, x, y, style="-", **kw):
            drawn.lines.append((list(np.asarray(x)), list(np.asarray(y)), style, kw.get("label")))

        def set(self, **kw): drawn.axes.update(kw)

        def legend(self, **kw): pass

    class Figure:
        def tight_layout(self): pass

        def savefig(self, path, **kw): drawn.saved.append(path)

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda **kw: (Figure(), Axes())
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.use, matplotlib.pyplot = (lambda backend: None), pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    return drawn


# The quick path most script tests take: eager PyTorch in fp32. `--precision auto` would mean bf16 on CPUs with
# AVX512-BF16 or AMX and fp32 on others, so a test that leaves it out would test different things on different
# hosts; tests of bf16, compile and the Triton kernels say so themselves (tests/test_gpu_path.py).
FAST = ["--no-compile", "--kernels", "torch", "--precision", "fp32"]


def finetune_args(cifar_dir, out, *extra):
    return ["--init", "scratch", "--preset", "tiny", "--data-dir", cifar_dir, "--out", str(out), "--epochs", "1",
            "--warmup-epochs", "0", "--batch", "20", *FAST, *extra]


@pytest.fixture(scope="session")
def confident(cifar_dir, tmp_path_factory) -> str:
    """A tiny classifier trained until it gets the synthetic classes right under noise sigma 0.12 (eager fp32,
    8 epochs of 3 steps, each logged): test_pipeline reads its losses, test_gpu_path_certify certifies with it."""
    import finetune
    build = lambda out: finetune.main(["--init", "scratch", "--preset", "tiny", "--data-dir", cifar_dir, "--out", out,
                                       "--sigma", "0.12", "--eta1", "0", "--eta2", "0", "--epochs", "8", "--warmup-epochs", "1",
                                       "--batch", "20", "--lr", "1e-3", "--log-every", "1", *FAST])
    return os.path.join(built_once(tmp_path_factory, "confident", build), "ckpt.pt")


@pytest.fixture(scope="session")
def finetuned(cifar_dir, tmp_path_factory) -> str:
    """A tiny fine-tuned checkpoint (one epoch from scratch) shared by the certification tests."""
    import finetune
    return os.path.join(built_once(tmp_path_factory, "ft", lambda out: finetune.main(finetune_args(cifar_dir, out))), "ckpt.pt")


# One torchrun for several runs: starting the launcher and two ranks costs ~8 s on 2 cores, and a process cannot
# set gloo up twice, so the runs share one process group (each script's own join and leave become no-ops).
RUN_END = "--- end of run ---"  # rank 0 prints it after each run
RUNS_DRIVER = """import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import jobs, trainer
join, joined, leave = jobs.init_distributed, [], jobs.close_processes
jobs.init_distributed = lambda *a: joined[0] if joined else joined.append(join(*a)) or joined[0]
jobs.close_processes = trainer.close_processes = dist.barrier
for script, argv in {runs!r}:
    __import__(script.removesuffix(".py")).main(argv)
    print({run_end!r}, flush=True) if joined[0][0] == 0 else None
leave()
"""


def torchrun_runs(runs: list[tuple[str, list]], log_dir, env: dict | None = None) -> list[str]:
    """Run each (script, argv) in turn in two processes under one torchrun, on the CPU (gloo) unless `env` says
    otherwise; what was printed in each run (rank 0's lines fall in their run's part; another rank's may fall in a
    neighbour's). On failure, the message holds each rank's own stderr (the launcher's summary cuts the cause)."""
    driver = os.path.join(str(log_dir), "driver.py")
    os.makedirs(str(log_dir), exist_ok=True)
    with open(driver, "w") as f:
        f.write(RUNS_DRIVER.format(root=ROOT, runs=runs, run_end=RUN_END))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
           os.path.join(str(log_dir), "ranks"), "--redirects", "2", "--tee", "1", driver]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, **(env if env is not None else {"CUDA_VISIBLE_DEVICES": ""})})
    if result.returncode != 0:
        errors = [open(os.path.join(d, f)).read()[-3000:] for d, _, files in os.walk(log_dir) for f in files if f == "stderr.log"]
        raise AssertionError(f"torchrun exited {result.returncode}\n" + "\n---\n".join(errors) + result.stderr[-2000:])
    out = "\n".join(line.split("]:", 1)[1] if line.startswith("[default") else line for line in result.stdout.splitlines())
    return out.split(RUN_END)[:len(runs)]


def refusal(script: str, argv: list) -> str:
    """Run a script's main() in this process the way its `__main__` block does, and return the message it
    exits with (a usage error, or argparse's one line); fails if it does not exit."""
    import importlib

    from jobs import UsageError
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exited:
        try:
            module.main(argv)
        except UsageError as e:
            sys.exit(f"{script}: error: {e}")
    return str(exited.value.code)


def update_difference(a: dict, b: dict, start: dict) -> float:
    """|| (a - start) - (b - start) || / || b - start || over the weights of `start`: how far apart two runs'
    updates from the same starting weights are, relative to the size of the update."""
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in start])
    update = torch.cat([(b[k].float() - start[k].float()).flatten() for k in start])
    return (diff.norm() / update.norm()).item()

