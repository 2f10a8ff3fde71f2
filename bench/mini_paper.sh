#!/usr/bin/env bash
# A measured small-scale reproduction of the paper's CIFAR-10 comparison on a 2-core CPU (about an hour):
# rRCM (pre-train -> fine-tune at sigma 0.25) against the Gaussian and Consistency baselines fine-tuned from
# scratch with the same number of optimizer steps x batch (390 x 128 + 390 x 128 = 780 x 128 images), all
# with the tiny preset, certified on the same 100 test images with N = 1,000, n0 = 100, alpha = 0.001.
# Everything not set here is the default recipe (pretrain.py / finetune.py for CIFAR-10: the paper-time code
# and the authors' logs): the warm-up + cosine pre-training lr, one contrastive direction at 1 : 1 with the
# consistency loss, the fine-tuning lr 2e-4 unscaled by the batch (constant here: --warmup-epochs 0), no
# fine-tuning augmentation, the raw class token. One departure, as in the README's laptop tutorial: rRCM's
# head is trained (--train-head), as the baselines' are; the recipe's frozen near-zero head needs ~100
# epochs for the encoder to align with it and does not get there at this budget (bench/README.md).
# Note: an rRCM pre-training step costs about 1.3 fine-tuning steps (8 vs 6 forward-equivalents per image),
# so rRCM gets more compute than the baselines at equal steps x batch.
#
#   bash bench/mini_paper.sh                  # DATA=../shared/data OUT=out/mini_paper by default
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/mini_paper}
RUNS=${RUNS:-"rrcm gaussian consistency"}  # e.g. RUNS=rrcm for the rRCM pipeline alone
COMMON=(--data-dir "$DATA" --no-compile --kernels torch)
FT=(--sigma 0.25 --batch 128 --warmup-epochs 0 --eval-images 1000 --log-every 100)
CERT=(--data-dir "$DATA" --sigma 0.25 --n 1000 --n0 100 --alpha 0.001 --num 100 --skip 100 --batch 500 --no-compile --kernels torch)
mkdir -p "$OUT"
stage() {  # stage NAME command...: run, log, and record the wall time
  local name=$1; shift
  local start=$(date +%s)
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
}
: > "$OUT/times.txt"
has() { [[ " $RUNS " == *" $1 "* ]]; }
if has rrcm; then
  stage rrcm_pretrain python pretrain.py "${COMMON[@]}" --preset tiny --steps 390 --batch 128 --warmup 40 --log-every 50 --out "$OUT/rrcm_pretrain"
  stage rrcm_probe python linear_probe.py --checkpoint "$OUT/rrcm_pretrain/ckpt.pt" --data-dir "$DATA" --train-images 10000 --test-images 1000 --kernels torch
  stage rrcm_finetune python finetune.py "${COMMON[@]}" --init "$OUT/rrcm_pretrain/ckpt.pt" --epochs 1 --train-head "${FT[@]}" --out "$OUT/rrcm_finetune"
fi
has gaussian && stage gaussian_finetune python finetune.py "${COMMON[@]}" --init scratch --preset tiny --epochs 2 --eta1 0 --eta2 0 "${FT[@]}" --out "$OUT/gaussian_finetune"
has consistency && stage consistency_finetune python finetune.py "${COMMON[@]}" --init scratch --preset tiny --epochs 2 "${FT[@]}" --out "$OUT/consistency_finetune"
for run in $RUNS; do
  stage ${run}_certify python certify.py "${CERT[@]}" --checkpoint "$OUT/${run}_finetune/ckpt.pt" --out "$OUT/$run.tsv"
done
python report.py $(for run in $RUNS; do echo "$OUT/$run.tsv"; done) | tee "$OUT/table.txt"
