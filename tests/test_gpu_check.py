"""bench/gpu_check.py, the one command that validates a GPU, run end to end in its CPU mode (toy shapes,
interpreter, tiny preset) so a change to a script it drives cannot break it unnoticed; and its parsers of
certify.py's TSV and pretrain.py's log lines."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_cpu_tiny_runs_every_step(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--cpu-tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = out.read_text()
    assert "Result: all steps passed" in report and "FAILED" not in report
    for title in ("## Test suite", "## Kernel benchmarks", "## Certification", "## Pre-training"):
        assert title in report
    assert "12 passed" in report                            # the kernel tests it ran, with the interpreter
    assert "| B=4 C=1000 |" in report                       # a kernel benchmark row
    assert " s per image** (" in report and " images/s**" in report


def test_certify_seconds_reads_the_time_column(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.41\t1\t12.500\n20\t1\t-1\t0.0\t0\t1.250\n")
    assert gpu_check.certify_seconds(str(tsv)) == [12.5, 1.25]


def test_pretrain_rates_reads_the_last_log_line():
    log = ("step 1/60 | consistency 1.0 | 10.0 img/s | elapsed 0:01 | mfu 1.0%\n"
           "some other line\n"
           "step 60/60 | consistency 0.5 | 2345.6 img/s | elapsed 1:00 | eta 0:00 | mfu 41.3%\n")
    assert gpu_check.pretrain_rates(log) == (2345.6, 41.3)
    assert gpu_check.pretrain_rates("step 2/2 | 8.5 img/s | elapsed 0:02") == (8.5, None)  # no peak known: no mfu
    with pytest.raises(ValueError):
        gpu_check.pretrain_rates("Traceback ...")


def test_window_mfu_counts_twelve_forwards_of_the_encoder(monkeypatch):
    """rRCM-B on CIFAR-10: 11.38 GFLOP per forward x 12 per image, so an H100 (989 TFLOP/s bf16) at
    100 % MFU pre-trains about 7,240 images/s."""
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert 99.0 < gpu_check.window_mfu(7240, "B") < 101.0
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "NVIDIA GeForce RTX 4090")
    assert gpu_check.window_mfu(7240, "B") is None  # no peak known: no guess
