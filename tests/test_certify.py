"""certify.py, the script: the radius it writes, the images it certifies, its flags and results-file rules.
(The statistics are tested in test_smoothing.py and test_adaptive.py.)"""
import fcntl
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm

import certify
import results
import smoothing
from conftest import ROOT
from data import Images
from test_smoothing import clopper_pearson_lower


@pytest.mark.quick
def test_radius_is_rounded_down_to_4_decimals():
    """By hand: 0.24996 must not become 0.2500 (that would count at r = 0.25)."""
    assert results.floor_radius(0.24996) == "0.2499"
    assert results.floor_radius(0.25) == "0.2500" and results.floor_radius(0.0) == "0.0000"
    assert results.floor_radius(0.61649) == "0.6164" and results.floor_radius(1.99999999) == "1.9999"
    # a certificate from counts: 9996 of 10000 at alpha 0.001, sigma 0.5 gives 1.486074...: written 1.4860, where
    # rounding to nearest would write 1.4861
    _, radius = smoothing.certify_from_counts(np.array([0, 100]), np.array([4, 9996]), 10000, 0.001, 0.5)
    expected = 0.5 * norm.ppf(clopper_pearson_lower(9996, 10000, 0.001))
    assert abs(radius - expected) < 1e-9 and f"{expected:.4f}" == "1.4861" and results.floor_radius(radius) == "1.4860"


def test_imagenet_default_subset_takes_one_image_from_every_other_class(tmp_path):
    """Carlini et al.'s subset, every 100th of ImageNet's 50,000 validation images, is one image from each of 500
    classes only if the loader orders the images class by class, 50 each. A val/ folder of 40 classes x 50 files
    (the real per-class count; names interleaved across classes as the official ILSVRC2012_val_* numbering is, so
    a loader that sorted by file name would mix the classes), read by data.Images as certify.py reads it: the
    default subset has 20 images from 20 distinct classes, every other one."""
    classes = 40
    for c in range(classes):
        folder = tmp_path / "val" / f"n{1440764 + 17 * c:08d}"
        folder.mkdir(parents=True)
        for i in range(50):
            (folder / f"ILSVRC2012_val_{i * classes + c + 1:08d}.JPEG").touch()
    test = Images("imagenet", str(tmp_path), "test", torch.device("cpu"))
    chosen = certify.certified_indices(len(test), certify.DEFAULT_SKIP["imagenet"], 500)
    labels = test.labels[chosen].tolist()
    assert len(test) == 2000 and labels == list(range(0, classes, 2))
    assert certify.DEFAULT_SKIP["imagenet"] * 500 == 50_000 and certify.DEFAULT_SKIP["cifar10"] * 500 == 10_000


@pytest.mark.quick
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "0.25,inf"])
def test_sigma_must_be_finite(value):
    with pytest.raises(SystemExit, match="--sigma must be > 0 and finite"):
        certify.parse_args([f"--sigma={value}"])


def test_sigma_default_is_the_released_grid_one_file_each(tmp_path):
    """The released certify.py (as of Dec 2024) certified sigma 0.25, 0.5 and 1.0 by default, one file each."""
    assert certify.parse_args([]).sigma == [0.25, 0.5, 1.0]
    assert certify.parse_args(["--sigma", "0.5"]).sigma == [0.5]
    args = certify.parse_args(["--checkpoint", "runs/ft/ckpt.pt", "--adaptive"])
    assert [certify.out_path(args, s) for s in args.sigma] == [f"out/certify/ft_sigma{s}_adaptive.tsv" for s in ("0.25", "0.5", "1")]
    args = certify.parse_args(["--out", "r/c.tsv", "--sigma", "0.25,1"])
    assert [certify.out_path(args, s) for s in args.sigma] == ["r/c_sigma0.25.tsv", "r/c_sigma1.tsv"]
    args = certify.parse_args(["--out", "r/c.tsv", "--sigma", "0.5"])
    assert certify.out_path(args, 0.5) == "r/c.tsv"  # one sigma: --out as given
    (tmp_path / "c_sigma0.5").mkdir()
    for argv, message in ((["--sigma", "0.5,0.5"], "--sigma must list each value once"),
                          (["--sigma", "abc"], "--sigma: invalid float value: 'abc'"),
                          (["--sigma", "0.5", "--out", str(tmp_path)], f"--out {tmp_path} is a directory; give a file name"),
                          (["--out", str(tmp_path / "c")], f"--out {tmp_path}/c_sigma0.5 is a directory")):
        with pytest.raises(SystemExit) as exited:
            certify.parse_args(argv)
        said = str(exited.value.code)
        assert said.startswith("certify.py: error: ") and message in said and "\n" not in said, said


@pytest.mark.quick
@pytest.mark.parametrize("argv,message", [
    (["--adaptive", "--stages", "150"], "--stages must be multiples of 100"),
    (["--adaptive", "--stages", "1k"], "--stages must be comma-separated integers"),
    (["--adaptive", "--n", "1050"], "--adaptive needs --n to be a multiple of 100"),
    (["--adaptive", "--radii", "0,0.12345"], "at most 4 decimals"),
    (["--adaptive", "--radii", "0,-1"], "--radii must be finite, >= 0"),
    (["--adaptive", "--radii", "0,x"], "--radii must be numbers"),
    (["--radii", "0,0.5"], "--stages and --radii need --adaptive"),
])
def test_adaptive_flags_are_checked(argv, message):
    with pytest.raises(SystemExit, match=message):
        certify.parse_args(argv)


def test_adaptive_flags_parse():
    args = certify.parse_args(["--adaptive", "--n", "500", "--stages", "100,200,900", "--radii", "0.5,0,0.25"])
    assert certify.looks(args) == [100, 200, 500] and args.radii == [0.0, 0.25, 0.5]  # looks at or above n are n itself
    assert args.stages == [100, 200, 900]  # the flag as given: parsing changes no flag
    assert certify.looks(certify.parse_args(["--adaptive", "--n", "10000"])) == [100, 200, 400, 800, 1600, 3200, 6400, 10_000]


@pytest.mark.quick
@pytest.mark.parametrize("out,reason", [("/proc/x", "cannot write /proc/x"), ("/etc/passwd/x", "/etc/passwd is not a directory")])
def test_unwritable_out_is_one_line(out, reason):
    with pytest.raises(results.ResultsError, match=reason):
        results.lock_results(out)


@pytest.mark.quick
def test_one_writer_per_results_file(tmp_path):
    """A second writer is refused at once; once the first is gone (closed, or its process killed) the lock is free."""
    path = str(tmp_path / "c.tsv")
    first = results.lock_results(path)
    with pytest.raises(results.ResultsError, match="being written by another certify.py run"):
        results.lock_results(path)
    first.close()
    results.lock_results(path).close()
    with open(path + ".lock") as other:  # an independent flock from outside certify.py
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(results.ResultsError, match="being written"):
            results.lock_results(path)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        certify.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    blocks = text.split("\n  --")[1:]
    assert len(flags) == len(blocks) >= 15
    missing = [block.split()[0] for block in blocks if "(default:" not in " ".join(block.split())]
    assert not missing, f"flags without a default in --help: {missing}"


def test_triton_kernels_on_a_cpu_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it, not under the interpreter
    result = subprocess.run([sys.executable, "certify.py", "--kernels", "triton", "--checkpoint", "nowhere.pt"], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    expected = "nowhere.pt does not exist" if torch.cuda.is_available() else "--kernels triton needs a CUDA GPU"
    assert expected in result.stderr and result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_the_rrcm_wrapper_takes_the_models_mode():
    """Smooth refuses a classifier in training mode; the wrapper has no mode of its own, so a model put in eval mode
    certifies, and one in train mode is refused by name."""
    from model import ViT, vit_config
    model = ViT(vit_config("tiny", "cifar10"))
    x = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match=r"training mode \(RRCMClassifier.training is True\).*call .eval\(\) on it first"):
        smoothing.Smooth(certify.RRCMClassifier(model.train(), 0.25), 10, 0.25, batch=100).counts(x, 100, key=0)
    assert smoothing.Smooth(certify.RRCMClassifier(model.eval(), 0.25), 10, 0.25, batch=100).counts(x, 100, key=0).sum() == 100
