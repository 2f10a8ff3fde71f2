"""bench/gpu_check.py, the one command that validates a GPU, run end to end in its CPU mode (toy shapes,
interpreter, tiny preset): the same sections in the same order, the same budget, caps and report, so a change to a
script it drives, or to the command itself, cannot break the GPU call unnoticed; and its readers of pytest's,
certify.py's and pretrain.py's output, finished or cut off."""
import ast
import importlib.util
import os
import signal
import sys
import threading
import time

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def headings(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("## ")]


def test_cpu_tiny_runs_every_section_in_order_into_one_report(tmp_path, capsys):
    """The GPU call's path at toy size, in this process (one interpreter start less; its sections still run the
    scripts as commands), e2e on the GPU machine's data layout: data_batch_1 and test_batch only."""
    data, out = tmp_path / "data", tmp_path / "out"
    gpu_check.write_cifar(str(data), n_train=8, n_test=4, train_files=1)
    code = gpu_check.main(["--cpu-tiny", "--budget", "400", "--data-dir", str(data), "--out", str(out)])
    report = (out / "report.md").read_text()
    assert code == 0, report + capsys.readouterr().out
    assert "Result: passed (5 of 5 sections run)" in report and "FAILED" not in report
    assert [h.split(" (")[0] for h in headings(report)] == ["## tests", "## kernels", "## certify", "## pretrain", "## e2e"]
    # what the device tool returns: at most 8 files, no sub-folders
    assert sorted(os.listdir(out)) == sorted(["report.md"] + [f"{s}.log" for s in gpu_check.SECTIONS])
    assert all((out / f"{s}.log").stat().st_size > 0 for s in gpu_check.SECTIONS)
    assert "**12 passed** of 12 collected" in report          # the kernel tests it ran, with the interpreter
    assert "| B=4 C=1000 |" in report                          # a kernel benchmark row
    assert " s per image**" in report and "At the paper's n = 100,000 by proportion" in report
    assert " images/s** over the log window ending at step 2" in report
    assert "on 8 training images (data_batch_1)" in report     # the four missing training files count for nothing
    assert "kernels triton (" in report and "kernels torch (" in report  # both tables side by side


def test_a_section_past_its_cap_is_cut_off_with_its_partial_output_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    """A test run that hangs after one test: cut off at its 2 s cap with the count so far and the test it was
    in; the 2 s then left of a 4 s budget are too few for any further section, so none starts."""
    fake = tmp_path / "test_fake.py"
    fake.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(60)\n")
    monkeypatch.setitem(gpu_check.TINY_PLAN, "tests", [str(fake)])
    out = tmp_path / "out"
    start = time.perf_counter()
    assert gpu_check.main(["--cpu-tiny", "--budget", "4", "--cap", "tests=2", "--out", str(out)]) == 1
    assert time.perf_counter() - start < 15
    report = (out / "report.md").read_text()
    assert "Result: tests cut off (1 of 5 sections run; not run: kernels, certify, pretrain, e2e)" in report
    assert "**1 passed** of 2 collected" in report and "; cut off while running `" in report and "test_fake.py::test_hangs`" in report
    assert report.count("s of the budget left; the section needs at least 3 s") == 4
    log = (out / "tests.log").read_text()
    assert "test_fake.py::test_quick PASSED" in log and log.endswith("cut off after 2 s\n")
    assert sorted(os.listdir(out)) == ["report.md", "tests.log"]


def test_sigterm_stops_the_running_section_and_leaves_a_report(tmp_path, monkeypatch):
    """As when the device tool's own limit strikes first: the hanging test's process tree is killed, the report
    says which section was stopped, and the command ends at once with 130."""
    fake = tmp_path / "test_fake.py"
    fake.write_text("import time\n\ndef test_hangs():\n    time.sleep(60)\n")
    monkeypatch.setitem(gpu_check.TINY_PLAN, "tests", [str(fake)])
    out = tmp_path / "out"
    before = set(gpu_check.process_tree(os.getpid()))  # e.g. Inductor's compile workers of earlier tests
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.perf_counter()
    assert gpu_check.main(["--cpu-tiny", "--budget", "60", "--out", str(out)]) == 130
    left = [open(f"/proc/{p}/cmdline").read() for p in set(gpu_check.process_tree(os.getpid())) - before]
    assert time.perf_counter() - start < 10 and left == [], left  # nothing left running
    report = (out / "report.md").read_text()
    assert "| tests | cut off |" in report and "stopped by a signal" in report and "| kernels | not run yet |" in report


def refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        gpu_check.main(argv)
    return str(exited.value.code)


@pytest.mark.quick
def test_bad_input_is_refused_in_one_line_before_anything_runs(tmp_path):
    out = str(tmp_path / "out")
    assert refusal(["--cpu-tiny", "--only", "tests,speed", "--out", out]) == (
        "gpu_check.py: error: --only takes sections from tests, kernels, certify, pretrain, e2e; got 'tests,speed'")
    assert refusal(["--cpu-tiny", "--data-dir", str(tmp_path), "--out", out]) == (
        f"gpu_check.py: error: --data-dir: {tmp_path}/cifar-10-batches-py has no data_batch_1 or test_batch "
        "(e2e needs real CIFAR-10)")
    assert refusal(["--cpu-tiny", "--cap", "tests=0", "--out", out]).startswith("gpu_check.py: error: --cap takes section=seconds")
    assert refusal(["--cpu-tiny", "--cap", "speed=9", "--out", out]).startswith("gpu_check.py: error: --cap takes section=seconds")
    assert refusal(["--cpu-tiny", "--budget", "0", "--out", out]) == "gpu_check.py: error: --budget must be > 0 seconds, got 0"
    assert not os.path.exists(out)


@pytest.mark.quick
def test_e2e_without_data_is_reported_not_run(tmp_path):
    section = gpu_check.Section(gpu_check.GPU_PLAN, True, str(tmp_path / "log"), str(tmp_path), time.perf_counter() + 9, None)
    assert gpu_check.section_e2e(section)[0] == "not run"


@pytest.mark.quick
def test_the_gpu_test_list_names_tests_that_exist():
    """A renamed test would make the GPU call's pytest stop at 'not found'; this CPU can say so first (read from
    the test files' syntax: importing test_gpu_path alone takes seconds)."""
    for node in gpu_check.GPU_TESTS:
        path, _, name = node.partition("::")
        assert os.path.isfile(os.path.join(ROOT, path)), node
        function, _, param = name.partition("[")
        if function:
            tree = ast.parse(open(os.path.join(ROOT, path)).read())
            found = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == function]
            assert found, node
            ids = [str(ast.literal_eval(value)) for d in found[0].decorator_list
                   if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize" for value in d.args[1].elts]
            assert param == "" or param.rstrip("]") in ids, node


def test_the_gpu_plan_command_lines_pass_the_scripts_parsers(tmp_path):
    """The GPU plan's own values (rRCM-B, bf16, --batch 10,000, the e2e sizes) through the scripts' parsers: a
    flag renamed or a value refused would otherwise show first on the GPU, where the toy run's values differ."""
    import certify
    import finetune
    import pretrain
    parsers = {"pretrain.py": pretrain.parse_args, "finetune.py": finetune.parse_args, "certify.py": certify.parse_args}
    plan, work = gpu_check.GPU_PLAN, str(tmp_path)
    commands = [gpu_check.certify_command(plan, work), gpu_check.pretrain_command(plan, work)]
    commands += [cmd for kernels in ("triton", "torch") for cmd in gpu_check.e2e_commands(plan, work, kernels)]
    assert [cmd[1] for cmd in commands] == ["certify.py", "pretrain.py"] + ["pretrain.py", "finetune.py", "certify.py"] * 2
    for cmd in commands:
        parsers[cmd[1]](cmd[2:])  # exits with argparse's one line on a refusal
    # on the GPU each e2e pipeline trains and certifies with its kernels; the toy run trains with PyTorch's
    for plan, train in ((gpu_check.GPU_PLAN, None), (gpu_check.TINY_PLAN, "torch")):
        for kernels in ("triton", "torch"):
            assert [cmd[-1] for cmd in gpu_check.e2e_commands(plan, work, kernels)] == [train or kernels] * 2 + [kernels]


@pytest.mark.quick
def test_a_section_that_breaks_gpu_check_itself_is_reported_and_the_next_ones_run(tmp_path, monkeypatch):
    def broken(section):
        raise KeyError("oops")
    monkeypatch.setitem(gpu_check.RUNNERS, "tests", broken)
    monkeypatch.setitem(gpu_check.RUNNERS, "kernels", lambda section: ("passed", "measured"))
    out = tmp_path / "out"
    assert gpu_check.main(["--cpu-tiny", "--only", "tests,kernels", "--out", str(out)]) == 1
    report = (out / "report.md").read_text()
    assert "| tests | FAILED |" in report and "KeyError: 'oops'" in report and "| kernels | passed |" in report


def test_a_command_past_its_time_is_killed_with_its_children_even_when_silent(tmp_path):
    """A section's cap holds against a hang that prints nothing and against children in sessions of their
    own that keep the output pipe open (as torchrun starts its ranks): all sleep 20 s, the cap is 1 s."""
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(20)']"
    child = (f"import subprocess, sys, time; subprocess.Popen({sleeper}); subprocess.Popen({sleeper}, start_new_session=True); "
             "print('begun', end='', flush=True); time.sleep(20)")
    start = time.perf_counter()
    ran = gpu_check.run([sys.executable, "-c", child], 1.0, str(tmp_path / "log"))
    assert not ran.ok and ran.timed_out and time.perf_counter() - start < 10
    assert ran.output == "begun\ncut off after 1 s\n"  # the note on a line of its own
    ran = gpu_check.run([sys.executable, "-c", "print('done')"], 60.0, str(tmp_path / "log"))
    assert ran.ok and not ran.timed_out and ran.output == "done\n"


@pytest.mark.quick
def test_pytest_progress_reads_finished_and_cut_off_runs():
    finished = ("collected 5 items / 2 deselected / 3 selected\n\n"
                "tests/a.py::test_x[1-dtype0] PASSED                [ 33%]\n"
                "tests/a.py::test_x[2-dtype0] FAILED                [ 66%]\n"
                "tests/a.py::test_y SKIPPED (no GPU)                [100%]\n\n"
                "=================================== FAILURES ===================================\n"
                "________________________________ test_x[2-dtype0] ________________________________\n"
                "tests/a.py:9: in test_x\n    assert 1 == 2\nE   assert 1 == 2\n"
                "=========================== short test summary info ============================\n")
    counts, collected, first, running = gpu_check.pytest_progress(finished)
    assert (dict(counts), collected, first, running) == ({"PASSED": 1, "FAILED": 1, "SKIPPED": 1}, 3, "tests/a.py::test_x[2-dtype0]", None)
    assert "E   assert 1 == 2" in gpu_check.first_traceback(finished) and "short test summary" not in gpu_check.first_traceback(finished)
    cut = "collected 2 items\n\ntests/a.py::test_x PASSED [ 50%]\ntests/a.py::test_slow \ncut off after 5 s\n"
    assert gpu_check.pytest_progress(cut)[1:] == (2, None, "tests/a.py::test_slow")


@pytest.mark.quick
def test_certify_seconds_reads_the_time_column_of_whole_rows(tmp_path):
    tsv = tmp_path / "c.tsv"
    assert gpu_check.certify_seconds(str(tsv)) == []  # cut off before the first image
    tsv.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.41\t1\t12.500\n20\t1\t-1\t0.0\t0\t1.250\n")
    assert gpu_check.certify_seconds(str(tsv)) == [12.5, 1.25]


@pytest.mark.quick
def test_pretrain_rates_reads_the_last_log_line():
    log = ("step 1/60 | consistency 1.0 | 10.0 img/s | elapsed 0:01 | mfu 1.0%\n"
           "some other line\n"
           "step 60/60 | consistency 0.5 | 2345.6 img/s | elapsed 1:00 | eta 0:00 | mfu 41.3%\n")
    assert gpu_check.pretrain_rates(log) == (2345.6, 41.3, 60)
    assert gpu_check.pretrain_rates("step 2/2 | 8.5 img/s | elapsed 0:02") == (8.5, None, 2)  # no peak known: no mfu
    with pytest.raises(ValueError):
        gpu_check.pretrain_rates("Traceback ...")


@pytest.mark.quick
def test_window_mfu_counts_the_encoder_forwards_of_a_step(monkeypatch):
    """rRCM-B on CIFAR-10: 11.38 GFLOP per forward (24 L W^2 + 4 L^2 W per block, L = 66, W = 768, 12 blocks, plus
    the patch embedding), times pretrain.py's forward-equivalents per image, against an H100's 989 TFLOP/s bf16."""
    import pretrain
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    L, W = 66, 768
    gflop = (12 * (24 * L * W * W + 4 * L * L * W) + 2 * 64 * 48 * W) / 1e9
    assert abs(gflop - 11.38) < 0.01
    full_speed = 989e12 / (gflop * 1e9 * pretrain.forwards_per_image(pretrain.parse_args([])))  # images/s at 100 % MFU
    assert 99.9 < gpu_check.window_mfu(full_speed, "B") < 100.1
    assert 99.9 < gpu_check.mfu(989e12 / (gflop * 1e9), "B") < 100.1  # one forward per noisy sample
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda: "NVIDIA GeForce RTX 4090")
    assert gpu_check.window_mfu(7240, "B") is None  # no peak known: no guess
