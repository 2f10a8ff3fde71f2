"""Pre-training's ablation flags (paper App. F, G), each checked for what it changes, and exact micro-batching
(GradCache) with its memory check before the first step."""
import argparse
import os

import pytest
import torch

import jobs
import pretrain
import trainer
from conftest import FAST, refusal, update_difference
from jobs import load_checkpoint
from model import SIGMA_MAX, SIGMA_MIN, edm_sigmas

TINY = ["--preset", "tiny", "--batch", "16", "--warmup", "0", "--log-every", "1", *FAST]


def flags(*argv) -> argparse.Namespace:
    return pretrain.parse_args(["--preset", "tiny", "--steps", "300", *argv])


def run(cifar_dir, out, *extra, steps=1) -> dict:
    pretrain.main(["--data-dir", cifar_dir, "--out", str(out), "--steps", str(steps), *TINY, *extra])
    return load_checkpoint(os.path.join(out, "ckpt.pt"), "pretrain")


def logged(out) -> list[str]:
    return [line for line in open(os.path.join(out, "log.txt")).read().splitlines() if line.startswith("step ")]


@pytest.mark.quick
def test_default_times_are_adjacent_points_of_the_curriculum_grid():
    args = flags()
    for step in (0, 1, 150, 299):
        t_n, t_key, sigmas = pretrain.consistency_times(step, args)
        assert sigmas == edm_sigmas(pretrain.num_scales(step, 300)).tolist() and sigmas[0] == SIGMA_MAX
        n = sigmas.index(t_n)
        assert n < len(sigmas) - 1 and t_key == sigmas[n + 1]


@pytest.mark.quick
def test_sigma_max_1_keeps_every_time_at_most_1():
    args = flags("--sigma-max", "1")
    for step in range(0, 300, 7):
        t_n, t_key, sigmas = pretrain.consistency_times(step, args)
        assert max(sigmas) == pytest.approx(1.0) and t_n <= 1.0 + 1e-12 and t_key <= 1.0 + 1e-12


def test_aligning_with_the_initial_point_keys_every_query_to_sigma_min():
    for extra, allowed in ((["--align", "initial"], None), (["--align", "initial", "--query-times", "0.5,1,2"], {0.5, 1.0, 2.0}),
                           (["--align", "initial", "--query-times", "0.5:2"], (0.5, 2.0))):
        args, seen = flags(*extra), set()
        for step in range(60):
            t_n, t_key, sigmas = pretrain.consistency_times(step, args)
            assert t_key == SIGMA_MIN
            if allowed is None:
                assert t_n in sigmas[:-1]
            elif isinstance(allowed, set):
                assert t_n in allowed
            else:
                assert allowed[0] <= t_n <= allowed[1]
            seen.add(round(t_n, 6))
        assert len(seen) >= (3 if allowed else 10)  # drawn, not fixed
    assert "needs --align initial" in refusal("pretrain.py", ["--query-times", "0.5,1"])


@pytest.mark.quick
def test_moco_noise_gives_each_view_its_own_noise_and_times_from_the_grid():
    v1, v2, eps = torch.zeros(4, 3, 2, 2), torch.ones(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    default = pretrain.contrastive_views(v1, v2, eps, None, [80.0, 1.0, 0.002])
    sigma_min = torch.full((4,), SIGMA_MIN, dtype=torch.float32)  # App. C: at sigma_min, one time per image
    assert all(torch.equal(t, sigma_min) and e is eps for _, t, e in default)
    u, e = torch.tensor([[0.0, 0.4, 0.7, 0.99], [0.5, 0.1, 0.9, 0.34]]), torch.randn(2, 4, 3, 2, 2)
    views = pretrain.contrastive_views(v1, v2, eps, (u, e), [80.0, 1.0, 0.002])
    assert views[0][1].tolist() == pytest.approx([80.0, 1.0, 0.002, 0.002]) and views[1][1].tolist() == pytest.approx([1.0, 80.0, 0.002, 1.0])
    assert torch.equal(views[0][2], e[0]) and torch.equal(views[1][2], e[1])
    x, t = pretrain.noisy(views)
    assert torch.equal(x[:4], v1 + views[0][1][:, None, None, None] * e[0]) and torch.equal(t, torch.cat([views[0][1], views[1][1]]))


@pytest.mark.quick
def test_positive_pairs_follow_the_objective():
    """Each --objective keeps the views of the terms it names: consistency's query x_{t_n} and key x_{t_{n+1}} on one
    trajectory (the same eps), contrastive's view 1 against view 2's key (both ways under --symmetric)."""
    x0, v1, v2, eps = (torch.randn(3, 3, 2, 2) for _ in range(4))
    for objective, consistency, contrastive in (("rrcm", 1, 1), ("consistency-only", 1, 0), ("contrastive-only", 0, 1)):
        for symmetric in (False, True):
            args = flags("--objective", objective, *(["--symmetric"] if symmetric else []))
            query, key, query_views, key_views = pretrain.positive_pairs(args, x0, v1, v2, eps, None, 2.0, 1.5, [2.0, 1.5])
            assert len(query) == len(key) == consistency and len(query_views) == len(key_views) == contrastive * (1 + symmetric)
            if consistency:
                (xq, tq, eq), (xk, tk, ek) = query[0], key[0]
                assert xq is x0 and xk is x0 and eq is eps and ek is eps and tq.tolist() == [2.0] * 3 and tk.tolist() == [1.5] * 3
            if contrastive:
                assert query_views[0][0] is v1 and key_views[0][0] is v2
                assert not symmetric or (query_views[1][0] is v2 and key_views[1][0] is v1)


def test_each_objective_trains_the_terms_it_names(cifar_dir, tmp_path):
    """consistency-only leaves the projector untouched (no contrastive gradient), contrastive-only and moco-noise
    log no consistency loss; all of them train the encoder."""
    torch.manual_seed(0)
    start = pretrain.ViT(pretrain.vit_config("tiny", "cifar10")).state_dict()
    for objective in ("consistency-only", "contrastive-only", "moco-noise"):
        ckpt = run(cifar_dir, tmp_path / objective, "--objective", objective)
        line = logged(tmp_path / objective)[-1]
        projector_moved = any(not torch.equal(ckpt["model"][k], start[k]) for k in start if k.startswith("projector"))
        assert projector_moved == (objective != "consistency-only"), objective
        assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
        assert ("consistency 0.0000" in line) == (objective != "consistency-only") and ("contrastive 0.0000" in line) == (objective == "consistency-only")


def test_consistency_ema_keys_from_an_ema_copy(cifar_dir, tmp_path, monkeypatch):
    """EMA2 > 0: the consistency key comes from a copy of the encoder that follows it at that rate (saved in the
    checkpoint); 0 (the default): from the online model itself."""
    keyed_by, online = [], []
    real_encode, real_passes = pretrain.encode, pretrain.OnlinePasses

    class Spy(real_passes):
        def __init__(self, model, tau):
            online.append(model)
            super().__init__(model, tau)
    monkeypatch.setattr(pretrain, "OnlinePasses", Spy)
    monkeypatch.setattr(pretrain, "encode", lambda model, views, micro: keyed_by.append(model) or real_encode(model, views, micro))
    run(cifar_dir, tmp_path / "plain")
    assert keyed_by[0] is online[0]  # the step's first encoding is the consistency key's
    keyed_by.clear(), online.clear()
    torch.manual_seed(0)
    start = pretrain.ViT(pretrain.vit_config("tiny", "cifar10")).state_dict()
    ema = run(cifar_dir, tmp_path / "ema", "--consistency-ema", "0.5")
    assert keyed_by[0] is not online[0] and keyed_by[0] is not keyed_by[1]  # neither the online model nor the target
    assert "consistency_target" in ema and ema["config"]["consistency_ema"] == 0.5
    for k in start:  # after one step: parameters 0.5 * start + 0.5 * the online weights, buffers copied
        want = ema["model"][k] if "running" in k or "num_batches" in k else 0.5 * start[k] + 0.5 * ema["model"][k]
        assert torch.allclose(ema["consistency_target"][k].double(), want.double(), atol=1e-6), k


def test_micro_batches_give_the_whole_batchs_step(cifar_dir, tmp_path):
    """One step in fp32, in micro-batches of 4 and of 2 (1/4 and 1/8 of the batch of 16): the losses, every
    gradient (AdamW's first moment after one step is 0.1 g), the BatchNorm running statistics and the weights
    after the step are the whole batch's, to float rounding."""
    whole = run(cifar_dir, tmp_path / "whole", "--symmetric")
    torch.manual_seed(0)  # the initial weights: the step's update is the difference
    start = pretrain.ViT(pretrain.vit_config("tiny", "cifar10")).state_dict()
    running = [k for k in whole["model"] if "running_mean" in k or "running_var" in k]
    assert running
    for micro in ("4", "2"):
        part = run(cifar_dir, tmp_path / f"micro{micro}", "--symmetric", "--micro-batch", micro)
        assert f"micro-batches of {micro} of the 16 images" in open(tmp_path / f"micro{micro}" / "log.txt").read()
        a, b = (logged(tmp_path / d)[0].split("| lr")[0] for d in ("whole", f"micro{micro}"))
        assert a == b, (micro, a, b)  # the losses to 4 decimals
        assert update_difference(part["model"], whole["model"], start) < 1e-5, micro  # measured 6e-7: float rounding
        for i, s in whole["optimizer"]["state"].items():
            g_whole, g_part = s["exp_avg"], part["optimizer"]["state"][i]["exp_avg"]
            assert torch.allclose(g_whole, g_part, rtol=1e-4, atol=1e-9 * max(1.0, g_whole.abs().max().item())), (micro, i)
        assert all(torch.allclose(whole["model"][k], part["model"][k], rtol=1e-5, atol=1e-7) for k in running), micro


def test_the_memory_check_picks_a_micro_batch_or_refuses_in_one_line(cifar_dir, tmp_path, monkeypatch):
    """Before the first step: the whole batch when it fits, else the largest micro-batch dividing the share that
    does, else one line saying what to change; never an out-of-memory kill."""
    model = pretrain.ViT(pretrain.vit_config("tiny", "cifar10"))
    per_image = trainer.activation_bytes(model.cfg, "fp32")
    monkeypatch.setattr(trainer, "free_memory", lambda device: int(3e9))
    run(cifar_dir, tmp_path / "fits", "--batch", "16")
    assert "the whole batch share of 16 images needs about" in open(tmp_path / "fits" / "log.txt").read()
    # room for the fixed part and about 5 images of one pass: the largest divisor of 16 below is 4
    params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.head.parameters())
    fixed = 12 * params + 16 * (6 * 3 * 32 * 32 * 4 + 16 * 66 * 192)
    monkeypatch.setattr(trainer, "free_memory", lambda device: int((fixed + 5 * per_image) / 0.9) + 1)
    run(cifar_dir, tmp_path / "micro", "--batch", "16")
    assert "micro-batches of 4 of the 16 images" in open(tmp_path / "micro" / "log.txt").read()
    monkeypatch.setattr(trainer, "free_memory", lambda device: int(fixed / 0.9))
    said = refusal("pretrain.py", ["--data-dir", cifar_dir, "--out", str(tmp_path / "none"), "--steps", "1", *TINY])
    assert "\n" not in said and "per image of a micro-batch" in said and "use more processes" in said, said
    said = refusal("pretrain.py", ["--data-dir", cifar_dir, "--out", str(tmp_path / "forced"), "--steps", "1", "--micro-batch", "16", *TINY])
    assert "--micro-batch 16 needs about" in said and "the largest that fits is none" in said, said


def test_finetuning_in_micro_batches_gives_the_whole_batchs_step(cifar_dir, tmp_path):
    """Fine-tuning accumulates the micro-batches' gradients weighted by their share of the images (Eq. 12 is a mean
    over images): one step in fp32 equals the whole batch's, with mixup/cutmix mixing across micro-batches."""
    import finetune
    from conftest import finetune_args
    ckpts = {}
    for name, extra in (("whole", []), ("micro", ["--micro-batch", "6"])):  # 20 images: 6, 6, 6, 2
        finetune.main(finetune_args(cifar_dir, tmp_path / name, "--train-images", "20", "--mixup", "0.8", "--cutmix", "1.0",
                                    "--label-smoothing", "0.1", "--lr", "1e-3", *extra))
        ckpts[name] = load_checkpoint(str(tmp_path / name / "ckpt.pt"), "finetune")
    whole, micro = ckpts["whole"], ckpts["micro"]
    assert "micro-batches of 6 of the 20 images" in open(tmp_path / "micro" / "log.txt").read()
    torch.manual_seed(0)
    start = finetune.ViT(finetune.vit_config("tiny", "cifar10")).state_dict()
    assert update_difference(micro["model"], whole["model"], {k: v for k, v in start.items() if not torch.equal(v, whole["model"][k])}) < 1e-5
    for i, s in whole["optimizer"]["state"].items():
        assert torch.allclose(s["exp_avg"], micro["optimizer"]["state"][i]["exp_avg"], rtol=1e-4, atol=1e-10), i
    lines = [open(tmp_path / d / "log.txt").read().split("step 1/1 |")[1].split("| lr")[0] for d in ("whole", "micro")]
    assert lines[0] == lines[1], lines


@pytest.mark.quick
def test_the_studys_arms_are_the_papers():
    """bench/ablations.sh's arms, through its own flags(), parse to App. F's and G's settings: MoCo v3 + noise, EMA2
    and tau (Fig. 10), T = 1 and one model per t_n aligned with the initial point, and the three together (Fig. 11)."""
    import re
    import subprocess
    script = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "ablations.sh")).read()
    arms = re.search(r'ARMS=\$\{ARMS:-"([^"]+)"\}', script).group(1).split()
    flags_of = script[script.index("flags() {"):script.index("\n}\n", script.index("flags() {")) + 2]
    settings = {}
    for arm in arms:
        argv = subprocess.run(["bash", "-c", f"{flags_of}\nflags {arm}"], capture_output=True, text=True, check=True).stdout.split()
        a = pretrain.parse_args(["--preset", "tiny", *argv])
        settings[arm] = (a.objective, a.consistency_ema, a.tau, a.sigma_max, a.align, a.query_times)
    default = ("rrcm", 0.0, 0.2, SIGMA_MAX, "adjacent", None)
    assert settings == {"rrcm": default, "moco-noise": ("moco-noise", *default[1:]),
                        "ema2-0.99": ("rrcm", 0.99, *default[2:]), "tau-0.1": ("rrcm", 0.0, 0.1, *default[3:]),
                        "T1": ("rrcm", 0.0, 0.2, 1.0, "adjacent", None),
                        **{f"initial-{t}": ("rrcm", 0.0, 0.2, SIGMA_MAX, "initial", [float(t)]) for t in ("0.5", "1", "2")},
                        "initial-all": ("rrcm", 0.0, 0.2, SIGMA_MAX, "initial", [0.5, 1.0, 2.0])}


@pytest.mark.quick
def test_the_studys_gaussian_baseline_spends_rrcms_compute_on_cifar10s_images(tmp_path):
    """bench/ablations.sh's commands (DRY_RUN=1 prints them) pass the scripts' parsers, and the Gaussian baseline
    trains on at most CIFAR-10's 50,000 training images for rRCM's forward-equivalents: pre-training's
    (pretrain.forwards_per_image a step per image) and fine-tuning's (3 per noisy copy: forward and backward), to
    within one epoch's rounding."""
    import subprocess

    import finetune
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    printed = subprocess.run(["bash", "bench/ablations.sh", "pretrain", "finetune"], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)}, check=True).stdout.splitlines()
    pre = [pretrain.parse_args(line.split()[2:]) for line in printed if line.startswith("python pretrain.py ")]
    ft = [finetune.parse_args(line.split()[2:]) for line in printed if line.startswith("python finetune.py ")]
    assert len(pre) == 9 and len(ft) == 10
    rrcm_pre, rrcm_ft, gaussian = pre[0], ft[0], ft[-1]
    assert rrcm_ft.sigma == 1.0 and (gaussian.init, gaussian.eta1, gaussian.eta2, gaussian.sigma) == ("scratch", 0, 0, 1.0)
    per_image = 3 * finetune.COPIES
    rrcm = (pretrain.forwards_per_image(rrcm_pre) * rrcm_pre.steps * rrcm_pre.batch
            + per_image * rrcm_ft.epochs * rrcm_ft.train_images)
    spent = per_image * gaussian.epochs * gaussian.train_images
    assert gaussian.train_images <= 50_000 and rrcm - per_image * gaussian.epochs < spent <= rrcm, (gaussian, rrcm, spent)
