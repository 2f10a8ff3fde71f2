#!/usr/bin/env bash
# The paper's appendix experiments at CPU scale, to its own protocol (App. E, F, G) scaled down only in preset,
# steps, images and N. bench/ablations.md holds the plan, its time per stage, the standard errors it costs and the
# paper's numbers beside ours.
#
#   pre-training, tiny preset, STEPS steps at batch 256 each (App. F and G: rRCM-B, 300k steps at 256):
#     rrcm           the method (Algorithm 1)
#     moco-noise     App. F, Fig. 9: MoCo v3 with Gaussian noise augmentation, no consistency term
#     ema2-0.99      App. G, Fig. 10: the consistency key from an EMA copy at rate 0.99 (default EMA2 = 0)
#     tau-0.1        App. G, Fig. 10: temperature 0.1 for both losses (default 0.2)
#     T1             App. G, Fig. 11: the trajectory ends at T = 1 (default 80)
#     initial-0.5, initial-1, initial-2   App. G, Fig. 11: x_{t_n} aligned with the initial point, one t_n each
#     initial-all    App. G, Fig. 11: the same with t_n drawn from {0.5, 1, 2} each step
#   fine-tuning at sigma 1.0 (App. F and G fine-tune there only) with the default recipe (Eq. 12, eta1 20) for
#     FT_EPOCHS epochs of FT_IMAGES images, and the Gaussian baseline (Cohen et al.) from scratch at rRCM's compute;
#   certification at sigma 1.0: N samples, n0 100, alpha 0.001, NUM test images (every 10,000 / NUM-th), the
#     same images for every model;
#   the linear probe of every arm (App. E, Table 6): a head on PROBE_TRAIN clean training images, accuracy on
#     PROBE_TEST test images at sigma 0, 0.25, 0.5, 1.0, and RFD between x_{t_N} (t_N = 80) and x_{t_0};
#   report.py --compare of every model against rRCM (exact McNemar per radius, Holm), the probe figure.
# One precision for every arm and stage (fp32, eager, PyTorch kernels), so a study resumed on another CPU stays
# one experiment.
#
#   bash bench/ablations.sh                     # every stage in order; re-running skips what finished
#   bash bench/ablations.sh pretrain probe      # stages, in the order given: pretrain, probe, finetune, certify, report
#   SCALE=smoke bash bench/ablations.sh         # the whole pipeline at toy scale, in minutes (a check, not a result)
#   DRY_RUN=1 bash bench/ablations.sh finetune  # print the commands a stage would run, run nothing
#
# Outputs under OUT (checkpoints, logs, TSVs); the small text results (the tables, the wall times) in RESULTS,
# the probe figure in FIGURE, the certified accuracies against radius in CERTIFIED_FIGURE.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
ARMS=${ARMS:-"rrcm moco-noise ema2-0.99 tau-0.1 T1 initial-0.5 initial-1 initial-2 initial-all"}
if [ "${SCALE:-full}" = smoke ]; then
  OUT=${OUT:-out/ablations_smoke}; RESULTS=${RESULTS:-$OUT/results}; FIGURE=${FIGURE:-$OUT/probe.png}
  CERTIFIED_FIGURE=${CERTIFIED_FIGURE:-$OUT/certified.png}
  STEPS=2; BATCH=16; TRAIN=(--train-images 64); FT_IMAGES=64; FT_EPOCHS=1; FT_BATCH=16
  EVAL=20; N=100; NUM=4; PROBE_TRAIN=64; PROBE_TEST=32; PROBE_EPOCHS=2
else
  OUT=${OUT:-out/ablations}; RESULTS=${RESULTS:-bench/ablations}; FIGURE=${FIGURE:-docs/ablations_probe.png}
  CERTIFIED_FIGURE=${CERTIFIED_FIGURE:-docs/ablations_certified.png}
  STEPS=${STEPS:-100}; BATCH=256; TRAIN=(); FT_IMAGES=${FT_IMAGES:-20000}; FT_EPOCHS=1; FT_BATCH=128
  EVAL=1000; N=${N:-500}; NUM=${NUM:-250}; PROBE_TRAIN=${PROBE_TRAIN:-10000}; PROBE_TEST=${PROBE_TEST:-10000}; PROBE_EPOCHS=30
fi
COMMON=(--data-dir "$DATA" --no-compile --kernels torch --precision fp32)
mkdir -p "$OUT/logs" "$OUT/done" "$RESULTS"

flags() {  # the pre-training flags of an arm
  case $1 in
    rrcm) ;;
    moco-noise) echo --objective moco-noise ;;
    ema2-*) echo --consistency-ema "${1#ema2-}" ;;
    tau-*) echo --tau "${1#tau-}" ;;
    T1) echo --sigma-max 1 ;;
    initial-all) echo --align initial --query-times 0.5,1,2 ;;
    initial-*) echo --align initial --query-times "${1#initial-}" ;;
  esac
}

run() {  # run NAME command...: skipped once finished; its output appended to logs/NAME.log, its wall time to times.txt
  local name=$1; shift
  [ -f "$OUT/done/$name" ] && return 0
  if [ -n "${DRY_RUN:-}" ]; then echo "$*"; return 0; fi  # DRY_RUN=1: print what would run
  local start=$(date +%s)
  if ! "$@" >> "$OUT/logs/$name.log" 2>&1; then
    echo "$name failed; the end of $OUT/logs/$name.log:" >&2; tail -n 5 "$OUT/logs/$name.log" >&2; exit 1
  fi
  touch "$OUT/done/$name"
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$RESULTS/times.txt"
}

resume() {  # --resume where an interrupted run left a checkpoint (the trainers continue bit-identically)
  [ -f "$1/ckpt.pt" ] && echo --resume || true
}

pretrain() {
  for arm in $ARMS; do
    run "pretrain_$arm" python pretrain.py "${COMMON[@]}" "${TRAIN[@]}" --preset tiny --steps "$STEPS" --batch "$BATCH" \
      --warmup $(( STEPS / 10 )) --log-every 20 --out "$OUT/$arm" $(flags "$arm") $(resume "$OUT/$arm")
  done
}

finetune() {
  # the Gaussian baseline: rRCM's compute (8 forward-equivalents per pre-training image, 6 per fine-tuning image)
  # spent on fine-tuning alone, as the fewest epochs over at most CIFAR-10's 50,000 training images
  local passes=$(( (8 * STEPS * BATCH + 6 * FT_EPOCHS * FT_IMAGES) / 6 )) cifar_train=50000
  local gauss_epochs=$(( (passes + cifar_train - 1) / cifar_train ))
  local ft=(--sigma 1.0 --batch "$FT_BATCH" --warmup-epochs 0 --eval-images "$EVAL" --log-every 50)
  for arm in $ARMS; do
    run "finetune_$arm" python finetune.py "${COMMON[@]}" --init "$OUT/$arm/ckpt.pt" --train-images "$FT_IMAGES" \
      --epochs "$FT_EPOCHS" --train-head "${ft[@]}" --out "$OUT/${arm}_finetune" $(resume "$OUT/${arm}_finetune")
  done
  run finetune_gaussian python finetune.py "${COMMON[@]}" --init scratch --preset tiny --train-images $(( passes / gauss_epochs )) \
    --epochs "$gauss_epochs" --eta1 0 --eta2 0 "${ft[@]}" --out "$OUT/gaussian_finetune" $(resume "$OUT/gaussian_finetune")
}

certify() {  # an interrupted certification continues: certify.py skips the images its TSV holds
  mkdir -p "$OUT/certify"
  for model in $ARMS gaussian; do
    run "certify_$model" python certify.py "${COMMON[@]}" --checkpoint "$OUT/${model}_finetune/ckpt.pt" --sigma 1.0 \
      --n "$N" --n0 100 --num "$NUM" --skip $(( 10000 / NUM )) --batch 500 --out "$OUT/certify/$model.tsv"
  done
}

probe() {  # needs only the pre-trained encoders: its table and figure come before any fine-tuning
  run probe python linear_probe.py --data-dir "$DATA" --kernels torch --train-images "$PROBE_TRAIN" \
    --test-images "$PROBE_TEST" --epochs "$PROBE_EPOCHS" --plot "$FIGURE" \
    --checkpoint $(for arm in $ARMS; do echo "$OUT/$arm/ckpt.pt"; done)
  [ -n "${DRY_RUN:-}" ] && return 0
  sed -n '/^ *accuracy (%)/,$p' "$OUT/logs/probe.log" > "$RESULTS/probe.txt"
  cat "$RESULTS/probe.txt"
}

into() {  # into FILE command...: its output to FILE; under DRY_RUN=1 print the command line instead
  local file=$1; shift
  if [ -n "${DRY_RUN:-}" ]; then echo "$* > $file"; else "$@" > "$file"; fi
}

report() {
  local tsvs=$(for model in $ARMS gaussian; do echo "$OUT/certify/$model.tsv"; done)
  into "$RESULTS/certified.txt" python report.py $tsvs
  into /dev/null python report.py $tsvs --plot "$CERTIFIED_FIGURE"
  into "$RESULTS/compare.txt" python report.py --compare $tsvs  # the first, rRCM, against each of the others
  [ -n "${DRY_RUN:-}" ] || cat "$RESULTS/certified.txt" "$RESULTS/compare.txt"
}

for stage in ${@:-pretrain probe finetune certify report}; do
  case $stage in
    pretrain | probe | finetune | certify | report) "$stage" ;;
    *) echo "usage: bash bench/ablations.sh [pretrain|probe|finetune|certify|report ...]" >&2; exit 2 ;;
  esac
done
