"""What a GPU runs by default, certification: the compiled noise loop with the Triton kernels in bf16, in one process
and in two, against the reference path (tests/test_gpu_path.py says how, and runs training the same way)."""
import certify
from conftest import torchrun_runs
from test_gpu_path import GPU_DEFAULTS, REFERENCE, one_thread, two_process_env


def rows(tsv) -> list[list[str]]:
    """The TSV's rows without the time column."""
    return [line.split("\t")[:5] for line in open(tsv).read().splitlines()[1:]]


def test_certification_on_the_gpu_path_matches_the_reference_in_one_and_two_processes(confident, cifar_dir, tmp_path):
    """Certify two images with 4 + 4 samples each at alpha 0.1 (the interpreter runs each attention program in
    Python, so the samples are what this test costs): the GPU path gives the same certificates as the reference,
    and two processes give the same file as one."""
    argv = ["--checkpoint", confident, "--data-dir", cifar_dir, "--n0", "4", "--n", "4", "--alpha", "0.1", "--num", "2",
            "--skip", "7", "--batch", "100", "--sigma", "0.12"]
    certify.main([*argv, "--out", str(tmp_path / "ref.tsv"), *REFERENCE])
    with one_thread():
        certify.main([*argv, "--out", str(tmp_path / "gpu1.tsv"), *GPU_DEFAULTS])
    torchrun_runs([("certify.py", [*argv, "--out", str(tmp_path / "gpu2.tsv"), *GPU_DEFAULTS])], tmp_path / "logs", two_process_env())
    ref, gpu1, gpu2 = (rows(tmp_path / f"{name}.tsv") for name in ("ref", "gpu1", "gpu2"))
    assert gpu2 == gpu1
    assert [r[:3] for r in gpu1] == [r[:3] for r in ref] and all(r[2] != "-1" for r in ref), (ref, gpu1)
    # 4 of 4 samples agreeing certify sigma Phi^-1(0.1^(1/4)) = 0.019; one flipped sample would abstain.
    assert all(abs(float(a[3]) - float(b[3])) < 1e-3 for a, b in zip(gpu1, ref)), (ref, gpu1)
