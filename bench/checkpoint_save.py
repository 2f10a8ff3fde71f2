"""Time a checkpoint save of rRCM-B as pre-training writes it (model, target, AdamW state), with
jobs.save_checkpoint (synced file, rename, synced directory), beside a plain torch.save, and its load. The time a
preempted job needs between SIGTERM and its kill is one step plus this save (docs/clusters.md).

    python bench/checkpoint_save.py --out /path/on/the/storage/of/--out/ckpt.pt
"""
import argparse
import os
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs import load_checkpoint, save_checkpoint  # noqa: E402
from model import ViT, vit_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where to write the checkpoint (removed afterwards)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "imagenet"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = ViT(vit_config("B", args.dataset))
    model.head.requires_grad_(False)
    target = ViT(model.cfg).requires_grad_(False)
    target.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for w in model.parameters():
        if w.requires_grad:
            w.grad = torch.zeros_like(w)
    opt.step()  # AdamW's two moments exist from the first step on
    ckpt = dict(kind="pretrain", model_args=asdict(model.cfg), model=model.state_dict(), target=target.state_dict(),
                optimizer=opt.state_dict(), step=1, config={})
    for _ in range(args.repeats):
        start = time.time()
        save_checkpoint(args.out, ckpt)
        durable = time.time() - start
        start = time.time()
        torch.save(ckpt, args.out + ".plain")
        plain = time.time() - start
        print(f"save_checkpoint {durable:.1f} s | torch.save alone (not synced) {plain:.1f} s | "
              f"{os.path.getsize(args.out) / 1e9:.2f} GB", flush=True)
    start = time.time()
    load_checkpoint(args.out, "pretrain")
    print(f"load_checkpoint {time.time() - start:.1f} s")
    os.remove(args.out)
    os.remove(args.out + ".plain")


if __name__ == "__main__":
    main()
