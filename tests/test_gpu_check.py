"""bench/gpu_check.py, the one command that validates a GPU, run end to end in its CPU mode (toy shapes,
interpreter, tiny preset) so a change to a script it drives cannot break it unnoticed; and its parsers of
certify.py's TSV and pretrain.py's log lines."""
import importlib.util
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def gpu_check_command(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--cpu-tiny", *argv],
                          capture_output=True, text=True, timeout=300)


def test_cpu_tiny_runs_every_section_and_each_command_adds_to_one_report(tmp_path, capsys):
    out = tmp_path / "report.md"
    # In this process (its sections still run the scripts as commands): one interpreter start less than a
    # subprocess; the command line itself is run by the next test.
    assert gpu_check.main(["--cpu-tiny", "--only", "tests,kernels,certify,pretrain", "--out", str(out)]) == 0, capsys.readouterr().out
    report = out.read_text()
    assert "Result: passed (4 of 5 sections run; not run yet: e2e)" in report  # written before the last section
    for section in ("tests", "kernels", "certify", "pretrain"):  # each one's own file, and its raw output
        assert (tmp_path / "report" / f"{section}.md").exists() and (tmp_path / "report" / f"{section}.log").stat().st_size > 0
    assert gpu_check.main(["--cpu-tiny", "--only", "e2e", "--out", str(out)]) == 0, capsys.readouterr().out
    report = out.read_text()
    assert "Result: passed (5 of 5 sections run)" in report and "FAILED" not in report
    assert [line for line in report.splitlines() if line.startswith("## ")] == ["## tests", "## kernels", "## certify",
                                                                                "## pretrain", "## e2e"]
    assert "12 passed" in report                            # the kernel tests it ran, with the interpreter
    assert "| B=4 C=1000 |" in report                       # a kernel benchmark row
    assert " s per image** (" in report and " images/s**" in report
    assert "kernels triton (" in report and "kernels torch (" in report  # e2e: both tables side by side


def test_a_failing_section_is_reported_and_the_others_are_kept(tmp_path):
    out = tmp_path / "report.md"
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "kernels.md").write_text("## kernels\n\nmeasured earlier\n")
    result = gpu_check_command("--only", "e2e", "--data-dir", str(tmp_path / "nothing"), "--out", str(out))
    assert result.returncode != 0 and "e2e needs real CIFAR-10" in result.stderr.strip().splitlines()[-1]
    bad = gpu_check_command("--only", "tests,speed", "--out", str(out))
    assert bad.returncode != 0 and bad.stderr.strip() == ("gpu_check.py: error: --only takes sections from tests, kernels, "
                                                          "certify, pretrain, e2e; got 'tests,speed'")
    assert (tmp_path / "report" / "kernels.md").read_text() == "## kernels\n\nmeasured earlier\n"


def test_a_command_past_its_time_is_killed_with_its_children_even_when_silent(tmp_path):
    """A section's budget holds against a hang that prints nothing and against children in sessions of their
    own that keep the output pipe open (as torchrun starts its ranks): all sleep 20 s, the budget is 1 s."""
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(20)']"
    child = (f"import subprocess, sys, time; subprocess.Popen({sleeper}); subprocess.Popen({sleeper}, start_new_session=True); "
             "time.sleep(20)")
    start = time.perf_counter()
    ok, out, _ = gpu_check.run([sys.executable, "-c", child], 1.0, str(tmp_path / "log"))
    assert not ok and out.endswith("timed out after 1 s\n") and time.perf_counter() - start < 10
    ok, out, _ = gpu_check.run([sys.executable, "-c", "print('done')"], 60.0, str(tmp_path / "log"))
    assert ok and out == "done\n"


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


def test_window_mfu_counts_the_encoder_forwards_of_a_step(monkeypatch):
    """rRCM-B on CIFAR-10: 11.38 GFLOP per forward (24 L W^2 + 4 L^2 W per block, L = 66, W = 768, 12 blocks, plus
    the patch embedding), times pretrain.py's forward-equivalents per image, against an H100's 989 TFLOP/s bf16."""
    import pretrain
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    L, W = 66, 768
    gflop = (12 * (24 * L * W * W + 4 * L * L * W) + 2 * 64 * 48 * W) / 1e9
    assert abs(gflop - 11.38) < 0.01
    full_speed = 989e12 / (gflop * 1e9 * pretrain.forwards_per_image(symmetric=False))  # images/s at 100 % MFU
    assert 99.9 < gpu_check.window_mfu(full_speed, "B") < 100.1
    assert 99.9 < gpu_check.mfu(989e12 / (gflop * 1e9), "B") < 100.1  # one forward per noisy sample
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "NVIDIA GeForce RTX 4090")
    assert gpu_check.window_mfu(7240, "B") is None  # no peak known: no guess
