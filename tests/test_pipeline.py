"""The three stages end to end on a tiny data set, reproducibility, resume, and bad input."""
import os

import pytest
import torch

import certify
import finetune
import model
import pretrain
from conftest import FAST, refusal
from jobs import load_checkpoint, model_from_checkpoint

TINY = ["--preset", "tiny", "--batch", "20", "--warmup", "2", "--log-every", "1", *FAST]


def run_pretrain(cifar_dir, out, steps=3, extra=()):
    pretrain.main(["--data-dir", cifar_dir, "--out", str(out), "--steps", str(steps), *TINY, *extra])
    return load_checkpoint(os.path.join(out, "ckpt.pt"), "pretrain")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.quick
def test_pretrain_finetune_certify_end_to_end(cifar_dir, tmp_path, capsys):
    """The stages chained as a user runs them, each at its smallest (reproducibility and resume are tested below)."""
    run_pretrain(cifar_dir, tmp_path / "pre", steps=1)
    finetune.main(["--init", str(tmp_path / "pre" / "ckpt.pt"), "--data-dir", cifar_dir, "--out", str(tmp_path / "ft"),
                   "--epochs", "1", "--warmup-epochs", "0", "--batch", "20", "--train-images", "40", *FAST])
    assert load_checkpoint(str(tmp_path / "ft" / "ckpt.pt"), "finetune")["step"] == 2  # 40 of the 60 images: 2 steps
    tsv = tmp_path / "c.tsv"
    certify.main(["--checkpoint", str(tmp_path / "ft" / "ckpt.pt"), "--data-dir", cifar_dir, "--out", str(tsv), "--sigma", "0.25",
                  "--n0", "20", "--n", "200", "--num", "3", "--skip", "5", "--batch", "100", *FAST])
    lines = tsv.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and [l.split("\t")[0] for l in lines[1:]] == ["0", "5", "10"]
    for line in lines[1:]:
        idx, label, pred, radius, correct, _ = line.split("\t")
        assert int(correct) == (pred == label) and (float(radius) > 0) == (pred != "-1")
    rows = [line.split("\t") for line in lines[1:]]
    at_zero = 100 * sum(r[4] == "1" for r in rows) / 3
    acr = sum(float(r[3]) * int(r[4]) for r in rows) / 3
    summary_row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("c.tsv")).split()
    assert float(summary_row[1]) == pytest.approx(at_zero, abs=0.05) and float(summary_row[-2]) == pytest.approx(acr, abs=5e-4)


def test_finetune_loss_decreases_on_a_set_it_can_overfit(confident):
    log = open(os.path.join(os.path.dirname(confident), "log.txt")).read()
    losses = [float(l.split("| ce ")[1].split()[0]) for l in log.splitlines() if "| ce " in l]
    assert len(losses) == 24 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_pretraining_is_reproducible_and_checkpoints_reload(cifar_dir, tmp_path):
    """Two runs with one seed agree bit for bit, another seed does not; a reloaded checkpoint computes what the
    run's weights compute (checked against the weights of the *other* run, so a broken save or load shows)."""
    a, b = run_pretrain(cifar_dir, tmp_path / "a"), run_pretrain(cifar_dir, tmp_path / "b")
    assert same_weights(a["model"], b["model"]) and same_weights(a["target"], b["target"])
    c = run_pretrain(cifar_dir, tmp_path / "c", extra=("--seed", "1"))
    assert not same_weights(a["model"], c["model"])
    x = torch.randn(2, 3, 32, 32)
    reference = model.ViT(model.ViTConfig(**b["model_args"])).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(b["model"][name])
        reloaded = model_from_checkpoint(load_checkpoint(str(tmp_path / "a" / "ckpt.pt"), "pretrain")).eval()
        assert torch.equal(reloaded.features(x, 0.5), reference.features(x, 0.5))
        other = model_from_checkpoint(c).eval()
        assert not torch.allclose(other.features(x, 0.5), reference.features(x, 0.5))


def test_resumed_pretraining_matches_an_uninterrupted_run(cifar_dir, tmp_path, monkeypatch):
    full = run_pretrain(cifar_dir, tmp_path / "full", steps=4)
    real_update, calls = pretrain.update_target, []

    def crash_on_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # pre-empted after the step-2 checkpoint
        real_update(*args)

    monkeypatch.setattr(pretrain, "update_target", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cifar_dir, tmp_path / "cut", steps=4, extra=("--save-every", "2"))
    monkeypatch.setattr(pretrain, "update_target", real_update)
    assert load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"), "pretrain")["step"] == 2
    resumed = run_pretrain(cifar_dir, tmp_path / "cut", steps=4, extra=("--save-every", "2"))  # the same command
    assert resumed["step"] == 4
    assert same_weights(full["model"], resumed["model"]) and same_weights(full["target"], resumed["target"])


@pytest.mark.parametrize("argv,message", [
    (["certify.py", "--sigma", "0"], "--sigma must be > 0"),
    (["certify.py", "--sigma", "-1"], "--sigma must be > 0"),
    (["certify.py", "--sigma", "abc"], "invalid float value"),
    (["certify.py", "--n", "0"], "--n must be >= 1"),
    (["certify.py", "--n0", "0"], "--n0 must be >= 1"),
    (["certify.py", "--alpha", "1.5"], "--alpha must be in (0, 1)"),
    (["certify.py", "--checkpoint", "nowhere.pt"], "nowhere.pt does not exist"),
    (["finetune.py", "--sigma", "nan"], "--sigma must be > 0"),
    (["finetune.py", "--batch", "0"], "--batch must be >= 1"),
    (["pretrain.py", "--preset", "huge", "--data-dir", "{data}"], "--preset: invalid choice: 'huge'"),
    (["pretrain.py", "--preset", "tiny", "--data-dir", "{empty}"], "data_batch_1 is missing"),
    (["certify.py", "--checkpoint", "{truncated}"], "truncated or not a checkpoint"),
    (["finetune.py", "--init", "{finetuned}", "--data-dir", "{data}"], "finetune checkpoint, but a pretrain checkpoint is needed"),
])
def test_bad_input_is_one_line_and_nonzero(argv, message, cifar_dir, finetuned, tmp_path):
    empty = tmp_path / "empty"
    (empty / "cifar-10-batches-py").mkdir(parents=True)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(open(finetuned, "rb").read()[:1000])
    argv = [a.format(data=cifar_dir, empty=empty, truncated=truncated, finetuned=finetuned) for a in argv]
    said = refusal(argv[0], [*argv[1:], "--kernels", "torch", "--out", str(tmp_path / "out")])
    assert said.startswith(f"{argv[0]}: error:") and "\n" not in said and message in said, said


def test_certify_refuses_a_pretrain_checkpoint(cifar_dir, tmp_path):
    run_pretrain(cifar_dir, tmp_path / "pre", steps=1)
    said = refusal("certify.py", ["--checkpoint", str(tmp_path / "pre" / "ckpt.pt"), "--kernels", "torch"])
    assert "pretrain checkpoint, but a finetune checkpoint is needed" in said, said


def test_resume_never_refuses_to_overwrite_a_run_and_must_refuses_to_start_one(cifar_dir, tmp_path, capsys):
    """--resume never: a fresh run or none; --resume must (or --resume alone): a continued run or none; the default
    continues a finished run to its end, which is where it is: nothing is written."""
    run_pretrain(cifar_dir, tmp_path / "pre", steps=1)
    before = (tmp_path / "pre" / "ckpt.pt").read_bytes()
    argv = ["--data-dir", cifar_dir, "--out", str(tmp_path / "pre"), "--steps", "1", *TINY]
    said = refusal("pretrain.py", [*argv, "--resume", "never"])
    assert said == f"pretrain.py: error: {tmp_path / 'pre' / 'ckpt.pt'} exists and --resume is never: choose another --out, or move it away"
    run_pretrain(cifar_dir, tmp_path / "pre", steps=1)
    assert f"resuming {tmp_path / 'pre' / 'ckpt.pt'} at step 1: the run is complete" in capsys.readouterr().out
    assert (tmp_path / "pre" / "ckpt.pt").read_bytes() == before
    for must in (["--resume", "must"], ["--resume"]):
        said = refusal("pretrain.py", [*argv[:3], str(tmp_path / "new"), *argv[4:], *must])
        assert said == f"pretrain.py: error: --resume must, but {tmp_path / 'new' / 'ckpt.pt'} does not exist", said


@pytest.mark.quick
@pytest.mark.parametrize("script", ["pretrain", "finetune", "certify", "linear_probe"])
def test_help_shows_every_default(script, capsys):
    """Every option of --help says its default (or, for the recipe's flags, both datasets' values)."""
    module = __import__(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    options = text.split("options:")[1]
    blocks = [b for b in options.split("\n  -") if b.strip().startswith("-") and not b.strip().startswith("h, --help")]
    assert len(blocks) >= 8
    missing = [b.split()[0] for b in blocks if "(default:" not in b]
    assert not missing, missing
