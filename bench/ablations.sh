#!/usr/bin/env bash
# The paper's appendix experiments at CPU scale (issue 25): what each ingredient of rRCM's pre-training does to
# the representation, measured the same way for every arm, then fine-tuning and certification of three of them.
#
#   1. pre-training arms, tiny preset, the same budget each (STEPS x 128 images, about 10 minutes on 2 cores):
#      rrcm (consistency + contrastive), moco-noise (MoCo v3 with Gaussian noise on its views, App. F), contrastive
#      only (MoCo v3 at sigma_min), consistency only, aligned with the initial point (t_n in [0.5, 2], App. G),
#      and T = 1 (the trajectory ends at 1 instead of 80, App. G);
#   2. the linear probe of every arm (App. E, Table 6): a head fitted on the 50,000 clean training images,
#      accuracy on all 10,000 test images at sigma 0, 0.25, 0.5, 1.0 (standard error < 0.5 points), and RFD,
#      one table and one figure;
#   3. fine-tuning at sigma 0.25 and certification (N 1,000, n0 100, alpha 0.001, 500 images) of rrcm, moco-noise
#      and the Gaussian baseline (Cohen et al.) fine-tuned from scratch with the compute of pre-training +
#      fine-tuning (8 forward-equivalents per pre-training image, 6 per fine-tuning image).
# Everything not set here is the default recipe; --train-head as in bench/mini_paper.sh (the frozen near-zero
# head needs ~100 epochs). Each stage's wall time goes to $OUT/times.txt.
#
#   bash bench/ablations.sh                           # DATA=../shared/data OUT=out/ablations STEPS=240
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/ablations}
STEPS=${STEPS:-240}
BATCH=${BATCH:-128}
FT_IMAGES=${FT_IMAGES:-25000}      # fine-tuning after pre-training: one epoch of these
GAUSS_IMAGES=${GAUSS_IMAGES:-33000}  # the Gaussian baseline: two epochs of these (the same compute)
NUM=${NUM:-500}                    # certified test images (every 20th)
ARMS=${ARMS:-"rrcm moco-noise contrastive-only consistency-only initial-point T1"}
COMMON=(--data-dir "$DATA" --no-compile --kernels torch)
mkdir -p "$OUT"
stage() {  # stage NAME command...: run, log, and record the wall time
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
}
flags() {  # the pre-training flags of an arm
  case $1 in
    rrcm) ;;
    moco-noise | contrastive-only | consistency-only) echo --objective "$1" ;;
    initial-point) echo --align initial --query-times 0.5:2 ;;
    T1) echo --sigma-max 1 ;;
  esac
}
for arm in $ARMS; do
  [ -f "$OUT/$arm/ckpt.pt" ] || stage "pretrain_$arm" python pretrain.py "${COMMON[@]}" --preset tiny --steps "$STEPS" \
    --batch "$BATCH" --warmup $(( STEPS / 10 )) --log-every 40 --out "$OUT/$arm" $(flags "$arm")
done
stage probe python linear_probe.py --data-dir "$DATA" --kernels torch --plot "$OUT/probe.png" \
  --checkpoint $(for arm in $ARMS; do echo "$OUT/$arm/ckpt.pt"; done)
tail -n $(( $(echo $ARMS | wc -w) + 2 )) "$OUT/probe.log" | tee "$OUT/probe_table.txt"

# Fine-tuning and certification: 195 steps of 128 images (25,000 images, one epoch) after pre-training; the
# Gaussian baseline from scratch gets the same compute: 195 + STEPS x 8 / 6 steps (33,000 images, two epochs: 514)
FT=(--sigma 0.25 --batch "$BATCH" --warmup-epochs 0 --eval-images 1000 --log-every 50)
for arm in rrcm moco-noise; do
  stage "finetune_$arm" python finetune.py "${COMMON[@]}" --init "$OUT/$arm/ckpt.pt" --train-images "$FT_IMAGES" --epochs 1 \
    --train-head "${FT[@]}" --out "$OUT/${arm}_finetune"
done
stage finetune_gaussian python finetune.py "${COMMON[@]}" --init scratch --preset tiny --train-images "$GAUSS_IMAGES" --epochs 2 \
  --eta1 0 --eta2 0 "${FT[@]}" --out "$OUT/gaussian_finetune"
for run in rrcm moco-noise gaussian; do
  stage "certify_$run" python certify.py --data-dir "$DATA" --no-compile --kernels torch --checkpoint "$OUT/${run}_finetune/ckpt.pt" \
    --sigma 0.25 --n 1000 --n0 100 --num "$NUM" --batch 500 --out "$OUT/$run.tsv"
done
python report.py "$OUT/rrcm.tsv" "$OUT/moco-noise.tsv" "$OUT/gaussian.tsv" | tee "$OUT/table.txt"
