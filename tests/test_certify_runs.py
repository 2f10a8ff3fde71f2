"""certify.py as a user runs it: killed and resumed, interrupted, two processes, one writer, the noise and time
it feeds the model, refusing to mix results, nothing written before the inputs are known good, several sigmas in
one command, bf16 reproducible, adaptive against fixed n on a trained checkpoint. Every run states its precision
(fp32 unless bf16 is the point): `auto` means bf16 on CPUs with AVX512-BF16 or AMX and fp32 elsewhere."""
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import certify
import jobs
import report
import results
import smoothing
from conftest import FAST, ROOT, torchrun_runs
from data import Images
from jobs import load_checkpoint, model_from_checkpoint


def rows_without_time(path) -> list:
    """Every field but the time (column 6)."""
    return [line.split("\t")[:5] + line.split("\t")[6:] for line in open(path).read().splitlines()]


def certify_args(ckpt, cifar_dir, out, *extra):
    return ["--checkpoint", ckpt, "--data-dir", cifar_dir, "--out", str(out), "--sigma", "0.25", "--n", "300", "--n0", "100",
            "--num", "5", "--skip", "3", "--batch", "200", *FAST, "--precision", "fp32", *extra]


# looks at 100 and 300 samples; radii 0 and 0.25 of the paper's (0.25 Phi^-1(0.00099^(1/300)) = 0.49979 < 0.5)
ADAPTIVE = ["--adaptive", "--stages", "100"]


def run_quietly(argv) -> str:
    """certify.main, returning what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        certify.main(argv)
    return printed.getvalue()


@pytest.fixture(scope="module")
def fixed_run(finetuned, cifar_dir, tmp_path_factory):
    """One uninterrupted fixed-n run: the reference the other runs must reproduce. (TSV path, printed output)"""
    out = tmp_path_factory.mktemp("fixed") / "c.tsv"
    return out, run_quietly(certify_args(finetuned, cifar_dir, out))


@pytest.fixture(scope="module")
def adaptive_run(finetuned, cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive") / "c.tsv"
    return out, run_quietly(certify_args(finetuned, cifar_dir, out, *ADAPTIVE, "--batch", "100"))


def test_two_process_certify_equals_one_process(adaptive_run, finetuned, cifar_dir, tmp_path):
    """Adaptive, so that images stop at different stages: rank 0 still writes them in image order. (Fixed n runs
    the same rounds and gather; one torchrun is what the time budget of the suite allows.)"""
    two = tmp_path / "two.tsv"
    torchrun_runs([("certify.py", certify_args(finetuned, cifar_dir, two, *ADAPTIVE))], tmp_path / "logs")
    one = adaptive_run[0]
    if torch.cuda.is_available():  # the two processes ran on the CPU (conftest.torchrun_runs: gloo on the CPU), and CPU noise is not CUDA noise
        one = tmp_path / "one.tsv"
        subprocess.run([sys.executable, "certify.py", *certify_args(finetuned, cifar_dir, one, *ADAPTIVE, "--batch", "100")],
                       cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, check=True, capture_output=True)
    one = rows_without_time(one)
    assert len(one) == 6 and one == rows_without_time(two)  # header + 5 images, same order, predictions, radii, samples


def wait_for_rows(path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until the TSV holds `count` whole data rows."""
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path) and open(path).read().count("\n") >= count + 1:
            return
        assert process.poll() is None, f"certify.py ended early: {process.stderr.read()}"
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {count} rows in {timeout} s")


def start_certify(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "certify.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_certify_resumes_after_sigkill_without_duplicates(fixed_run, finetuned, cifar_dir, tmp_path):
    """A real process killed mid-run (SIGKILL: no handler runs, the lock is dropped by the kernel), then the
    same command: the file equals an uninterrupted run's."""
    out = tmp_path / "c.tsv"
    process = start_certify(certify_args(finetuned, cifar_dir, out))
    wait_for_rows(out, 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and open(out).read().count("\n") < 6  # it really was cut short
    run_quietly(certify_args(finetuned, cifar_dir, out))
    assert rows_without_time(out) == rows_without_time(fixed_run[0])


def test_sigint_keeps_whole_lines_and_a_second_writer_is_refused(adaptive_run, finetuned, cifar_dir, tmp_path):
    """While an adaptive run writes, a second certify on the same TSV refuses at once; Ctrl-C then stops the
    first with one line and whole lines only; the same command resumes (with another --batch) to the result of
    an uninterrupted run."""
    out = tmp_path / "c.tsv"
    argv = certify_args(finetuned, cifar_dir, out, *ADAPTIVE)
    process = start_certify(argv)
    wait_for_rows(out, 1, process)
    with pytest.raises(jobs.UsageError, match="being written by another certify.py run"):
        certify.main(argv)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and len(stderr.strip().splitlines()) == 1, stderr
    assert "interrupted by SIGINT" in stderr and "run the same command to continue" in stderr
    text = open(out).read()
    assert text.endswith("\n") and results.check_rows(str(out), text.encode(), results.ADAPTIVE_HEADER)
    run_quietly(argv[:-len(ADAPTIVE)] + ["--batch", "300", *ADAPTIVE])
    assert rows_without_time(out) == rows_without_time(adaptive_run[0])


def test_certify_refuses_to_mix_configurations(fixed_run, finetuned, cifar_dir, tmp_path):
    out = tmp_path / "c.tsv"
    for suffix in ("", ".json"):
        shutil.copy(str(fixed_run[0]) + suffix, str(out) + suffix)
    before = out.read_bytes()
    for extra, changed in ((["--alpha", "0.01"], "alpha"), (ADAPTIVE, "mode"), (["--precision", "bf16"], "precision")):
        with pytest.raises(jobs.UsageError, match=f"different configuration \\({changed}"):
            certify.main(certify_args(finetuned, cifar_dir, out, *extra))
    assert out.read_bytes() == before


def test_a_garbage_line_is_refused_and_the_file_left_alone(fixed_run, finetuned, cifar_dir, tmp_path):
    out = tmp_path / "c.tsv"
    for suffix in ("", ".json"):
        shutil.copy(str(fixed_run[0]) + suffix, str(out) + suffix)
    with open(out, "a") as f:
        f.write("garbage line\n")
    before = out.read_bytes()
    with pytest.raises(jobs.UsageError, match="c.tsv, line 7: 1 columns, expected 6; not appending"):
        certify.main(certify_args(finetuned, cifar_dir, out))
    assert out.read_bytes() == before


class Spy(torch.nn.Module):
    """The fine-tuned model, recording what certify feeds it: the time t and the spread of the noisy inputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.seen = model, model.cfg, []

    def forward(self, x_t, t):
        # x_t is (x + sigma eps - 0.5) / 0.5 for one image x: its std over the batch is 2 sigma per pixel
        self.seen.append((t, x_t.std(0).mean().item(), len(x_t)))
        return self.model(x_t, t)


def test_certify_at_another_sigma_feeds_that_noise_and_the_snapped_time(finetuned, cifar_dir, tmp_path, monkeypatch):
    """Paper Table 9: a model fine-tuned at sigma 0.25 certified at sigma 0.5. The noise applied must have std 0.5
    in pixel space (1.0 in model space), and the time input is 2 sigma = 1.0 snapped to the nearest point of the
    81-point EDM grid of pre-training, 0.9654 (t_i = (80^(1/7) + i/80 (0.002^(1/7) - 80^(1/7)))^7 at i = 48;
    its neighbours 1.0963 and 0.8482 are farther from 1.0)."""
    spies = []
    real = certify.model_from_checkpoint
    monkeypatch.setattr(certify, "model_from_checkpoint", lambda ckpt: spies.append(Spy(real(ckpt))) or spies[-1])
    out = tmp_path / "c.tsv"
    printed = run_quietly(certify_args(finetuned, cifar_dir, out, "--sigma", "0.5", "--num", "2", "--n", "200"))
    assert "sigma 0.5 (fine-tuned at 0.25)" in printed
    grid_point = (80 ** (1 / 7) + 48 / 80 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert abs(grid_point - 0.9654) < 1e-4
    seen = spies[0].seen
    assert len(seen) == 2 * (1 + 1)  # per image one selection batch (100) and one estimation batch (200)
    for t, spread, size in seen:
        assert float(t) == pytest.approx(grid_point, abs=1e-9)
        assert spread == pytest.approx(2 * 0.5, abs=4 / size ** 0.5)  # sample std of `size` normals: error ~ 1/sqrt(2 size)
    largest = 0.5 * np.sqrt(2) * float(torch.special.erfinv(torch.tensor(2 * 0.001 ** (1 / 200) - 1, dtype=torch.float64)))
    radii = [float(line.split("\t")[3]) for line in out.read_text().splitlines()[1:]]
    assert len(radii) == 2 and max(radii) <= largest  # every one of the n = 200 samples correct at most


def test_bf16_certification_is_reproducible(finetuned, cifar_dir, tmp_path):
    """bf16 autocast is another deterministic base classifier: the same command gives the same TSV. (One image,
    n0 = n = 20: bf16 is emulated, and slow, on CPUs without AMX or AVX512-BF16.)"""
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    argv = lambda out: certify_args(finetuned, cifar_dir, out, "--precision", "bf16", "--num", "1", "--n0", "20", "--n", "20",
                                    "--batch", "100")
    printed = run_quietly(argv(a))
    run_quietly(argv(b))
    assert "precision bf16" in printed and rows_without_time(a) == rows_without_time(b)
    assert '"precision": "bf16"' in open(str(a) + ".json").read()


def test_adaptive_decisions_are_certify_on_the_samples_drawn(fixed_run, adaptive_run, finetuned, cifar_dir, tmp_path):
    """Same images, same noise: each adaptive row is CERTIFY's decision on the first `samples` estimation samples of
    the fixed run at that look's alpha (recomputed here from the same counts), and where it went to n = 300 its
    prediction is the fixed run's. (The first three images: on this checkpoint one goes to 300, two stop at 100.)"""
    fixed, adaptive = rows_without_time(fixed_run[0])[1:4], rows_without_time(adaptive_run[0])[1:4]
    first = adaptive_run[1].splitlines()[0]  # the paper's radii 0.5, 0.75, 1.0 are beyond what 300 samples certify
    assert first.startswith("CERTIFY-ADAPTIVE sigma 0.25") and first.endswith(
        "looks [100, 300] at alpha 1e-05 each, the last at 0.00099; radii [0.0, 0.25]; 0.5, 0.75, 1 beyond reach: "
        "n = 300 samples at sigma 0.25 certify at most 0.4997 at alpha 0.00099")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where certify.py ran: the same noise
    model = model_from_checkpoint(load_checkpoint(finetuned, "finetune")).to(device).eval()
    smooth = smoothing.Smooth(certify.RRCMClassifier(model, 0.25), model.cfg.num_classes, 0.25, batch=100)
    test = Images("cifar10", cifar_dir, "test", device)
    for (idx, label, pred, radius, correct, samples), fixed_row in zip(adaptive, fixed):
        x = test.batch(torch.tensor([int(idx)]))[0][0]
        counts0 = smooth.counts(x, 100, key=int(idx), phase=smoothing.SELECT)
        counts = smooth.counts(x, int(samples), key=int(idx))
        alpha_k = {100: 1e-5, 300: 0.001 - 1e-5}[int(samples)]  # 1 % of alpha at the early look
        expected = smoothing.certify_from_counts(counts0, counts, int(samples), alpha_k, 0.25)
        assert (int(pred), radius) == (expected[0], results.floor_radius(expected[1]))
        assert idx == fixed_row[0] and (int(samples) == 100 or pred == fixed_row[2])


def test_progress_names_device_precision_and_eta(fixed_run, finetuned, cifar_dir, tmp_path, monkeypatch):
    printed = fixed_run[1]
    where = f"on {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "on CPU"  # RRCM_TEST_GPU=1 runs on the GPU
    assert where in printed and "precision fp32" in printed
    lines = [line for line in printed.splitlines() if line.startswith("image ")]
    assert [line.split(" |")[0] for line in lines] == [f"image {k} / 5" for k in range(1, 6)]
    assert all("samples/s" in line and "elapsed 0:00:" in line and "ETA " in line for line in lines)
    monkeypatch.setattr(jobs, "PROGRESS_EVERY", 0.0)  # a line after every batch, as every 30 s on a slow machine
    printed = run_quietly(certify_args(finetuned, cifar_dir, tmp_path / "c.tsv", "--num", "1", "--n", "200", "--batch", "100"))
    assert "image 1 / 1: 100 of 300 samples" in printed and "image 1 / 1: 300 of 300 samples" in printed


def test_nothing_is_written_before_the_inputs_are_known_good(finetuned, cifar_dir, tmp_path):
    """A bad --data-dir is refused before any file exists (no TSV, .json or lock); the corrected command, here with
    another --n, then runs. A header-only file left by an older version is started afresh, not refused."""
    out = tmp_path / "res" / "c.tsv"
    empty = tmp_path / "no_cifar"
    (empty / "cifar-10-batches-py").mkdir(parents=True)  # the folder without its files: refused, not downloaded
    with pytest.raises(jobs.UsageError, match="CIFAR-10 file .*test_batch is missing"):
        certify.main(certify_args(finetuned, str(empty), out))
    assert not (tmp_path / "res").exists()
    out.parent.mkdir()
    out.write_text(results.HEADER + "\n")
    (tmp_path / "res" / "c.tsv.json").write_text('{"n": 300}')
    run_quietly(certify_args(finetuned, cifar_dir, out, "--n", "200", "--num", "1"))
    assert len(rows_without_time(out)) == 2 and '"n": 200' in open(str(out) + ".json").read()


def test_several_sigmas_in_one_command(fixed_run, finetuned, cifar_dir, tmp_path):
    """--sigma 0.25,0.5: one TSV per sigma, each with its own .json; sigma 0.25's rows are those of the
    single-sigma run (the same noise), and the summary ends with the best-over-sigma row."""
    printed = run_quietly(certify_args(finetuned, cifar_dir, tmp_path / "c.tsv", "--sigma", "0.25,0.5", "--num", "1"))
    assert rows_without_time(tmp_path / "c_sigma0.25.tsv") == rows_without_time(fixed_run[0])[:2]
    assert '"sigma": 0.5' in open(tmp_path / "c_sigma0.5.tsv.json").read() and len(rows_without_time(tmp_path / "c_sigma0.5.tsv")) == 2
    assert "CERTIFY sigma 0.5 (fine-tuned at 0.25)" in printed and "best of above" in printed.splitlines()[-1]


def test_adaptive_with_no_radius_within_reach_is_refused_before_anything_is_written(finetuned, cifar_dir, tmp_path):
    """--radii 0.5,1 at sigma 0.25 with n = 300 (at most 0.4997): the run used [0.0] without a word before."""
    out = tmp_path / "res" / "c.tsv"
    with pytest.raises(jobs.UsageError) as refused:
        certify.main(certify_args(finetuned, cifar_dir, out, *ADAPTIVE, "--radii", "0.5,1"))
    assert str(refused.value) == ("--adaptive at sigma 0.25: no radius of [0.5, 1.0] is within reach: n = 300 samples at sigma "
                                  "0.25 certify at most 0.4997 at alpha 0.00099")
    assert not (tmp_path / "res").exists()


def test_the_best_over_sigma_row_only_over_the_same_images(fixed_run, finetuned, cifar_dir, tmp_path):
    """A sigma file continued from a run with another --num holds other images than its sibling: certify.py prints
    the table without the best-over-sigma row, and says why (report.py --envelope refuses such runs)."""
    for suffix in ("", ".json"):
        shutil.copy(str(fixed_run[0]) + suffix, str(tmp_path / "c_sigma0.25.tsv") + suffix)  # 5 images at sigma 0.25
    printed = run_quietly(certify_args(finetuned, cifar_dir, tmp_path / "c.tsv", "--sigma", "0.25,0.5", "--num", "1"))
    assert "best of above" not in printed and printed.splitlines()[-1] == (
        "no best-over-sigma row: c_sigma0.25.tsv and c_sigma0.5.tsv cover different test images (5 and 1, 4 in only one): "
        "the best over them would mix test sets")
