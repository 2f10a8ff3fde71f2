#!/usr/bin/env bash
# Table 2's classical comparators against rRCM on one backbone at CPU scale (issue 34; plan, estimates and the paper's
# rows: bench/comparators.md). Every method trains the tiny preset's ViT with the same optimizer, lr and data, and is
# certified on the same test images with the same noise at one N; each is compared with rRCM by an exact McNemar test
# over those images at each radius (report.py --compare). Two arms, at each sigma (0.25, 1.0):
#   compute: every method spends rRCM's forward-equivalents (pre-training PRE_STEPS x BATCH images at 8 each, plus one
#            fine-tuning epoch of IMAGES at 6): Gaussian and Consistency 6 per image, SmoothAdv 92 (46 at sigma 1.0),
#            MACER 48, SmoothMix 28 (comparators.passes, at the papers' CIFAR-10 settings) -- so more epochs for the
#            cheap ones, a smaller subset for the dear ones;
#   epochs:  every method one epoch of the same IMAGES, as rRCM's fine-tuning (rRCM's pre-training on top).
# Boosting (Horvath et al.) is an ensemble of MEMBERS Consistency models (seeds 0, 1, 2), each trained as the arm's
# Consistency run: MEMBERS times its training and its certification, as in their paper.
# All runs: --precision fp32, eager, torch kernels, constant lr (--warmup-epochs 0), the comparators' adversarial
# warm-ups off (--adv-warmup-epochs 1: the papers warm up over the first 10 of 150 epochs); rRCM's head trained
# (--train-head, as bench/mini_paper.sh). Each stage is resumable: run the same command again after a kill and it
# continues the unfinished run and skips what finished. Wall times go to $OUT/times.txt.
#
#   bash bench/comparators.sh 1                 # stage 1: pre-training, then everything at sigma 0.25
#   bash bench/comparators.sh 2                 # stage 2: everything at sigma 1.0 (needs stage 1's pre-training)
#   bash bench/comparators.sh 1 train           # stage 1's training only (about 2 h on 2 cores): the same command
#                                               # without `train` then certifies (about 1 h), so no part passes 2.5 h
#   SCALE=toy OUT=/tmp/c bash bench/comparators.sh 1   # the whole path at toy size, in minutes
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash bench/comparators.sh 1|2 [train]   (stage 1: sigma 0.25 with the pre-training; stage 2: sigma 1.0; train: stop before certifying)" >&2; exit 2; }
case ${1:-} in
  1) SIGMA=0.25 ;;
  2) SIGMA=1.0 ;;
  *) usage ;;
esac
PART=${2:-all}
case $PART in all | train) ;; *) usage ;; esac
[ $# -le 2 ] || usage
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/comparators}
if [ "${SCALE:-full}" = toy ]; then
  PRE_STEPS=4 BATCH=8 IMAGES=16 MEMBERS=2 NUM=2 SKIP=1000 N=100 N0=100 EVAL=8
else
  PRE_STEPS=${PRE_STEPS:-120} BATCH=${BATCH:-128} IMAGES=${IMAGES:-4000} MEMBERS=${MEMBERS:-3}
  NUM=${NUM:-100} SKIP=${SKIP:-100} N=${N:-500} N0=${N0:-100} EVAL=${EVAL:-500}
fi
COMMON=(--data-dir "$DATA" --no-compile --kernels torch --precision fp32)
FT=(--init scratch --preset tiny --sigma "$SIGMA" --batch "$BATCH" --warmup-epochs 0 --eval-images "$EVAL" --log-every 20)
CERT=(--sigma "$SIGMA" --n "$N" --n0 "$N0" --alpha 0.001 --num "$NUM" --skip "$SKIP" --batch 500)
HERE=$OUT/sigma$SIGMA
mkdir -p "$HERE/compute" "$HERE/epochs"
stage() {  # stage NAME command...: run, log, and record the wall time
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed: see $OUT/$name.log" >&2; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
}
train() {  # train SCRIPT DIR flags...: fresh, continued (--resume) after an interruption, or skipped once finished
  local script=$1 dir=$2; shift 2
  [ -f "$dir/finished" ] && return 0
  local resume=(); [ -f "$dir/ckpt.pt" ] && resume=(--resume)
  stage "$(echo "${dir#$OUT/}" | tr / _)" python "$script" "${COMMON[@]}" "$@" --out "$dir" "${resume[@]}"
  touch "$dir/finished"
}
flags() {  # the fine-tuning flags of a method
  case $1 in
    gaussian) echo --eta1 0 --eta2 0 ;;
    consistency) ;;
    smoothadv | smoothmix) echo --objective "$1" --adv-warmup-epochs 1 ;;
    macer) echo --objective macer ;;
  esac
}
forwards() {  # forward-equivalents per image and step of finetune.py with these flags (finetune.py's own count)
  python -c "import sys, finetune, comparators
a = finetune.parse_args(sys.argv[1:])
print(comparators.passes(a)[0] if a.objective != 'rrcm' else 2 * 3)" --init scratch --preset tiny --sigma "$SIGMA" "$@"
}
# rRCM: pre-training once (stage 1), fine-tuning one epoch of IMAGES at this sigma
train pretrain.py "$OUT/pretrain" --preset tiny --steps "$PRE_STEPS" --batch "$BATCH" --warmup $(( PRE_STEPS / 10 )) --log-every 20
train finetune.py "$HERE/rrcm" --init "$OUT/pretrain/ckpt.pt" --sigma "$SIGMA" --batch "$BATCH" --warmup-epochs 0 \
  --eval-images "$EVAL" --log-every 20 --train-head --train-images "$IMAGES" --epochs 1
# rRCM's forward-equivalents: pre-training 8 per image, fine-tuning 6 (an epoch is its whole batches: the rest is dropped)
BUDGET=$(( PRE_STEPS * BATCH * 8 + IMAGES / BATCH * BATCH * 6 ))
echo "method images epochs forwards/image forward-equivalents (rRCM: $BUDGET)" > "$HERE/compute/budget.txt"
METHODS="gaussian consistency smoothadv macer smoothmix"
for method in $METHODS; do
  per=$(forwards $(flags $method))
  # compute: as many images as rRCM's budget buys (epochs of IMAGES while they fit, else one epoch of a subset)
  images=$(( BUDGET / per )) epochs=1
  if [ $images -ge $(( 2 * IMAGES )) ]; then epochs=$(( (images + IMAGES / 2) / IMAGES )) images=$IMAGES; fi
  [ $images -ge "$BATCH" ] || images=$BATCH  # at least one step (only the toy scale's budget buys less)
  echo "$method $images $epochs $per $(( images / BATCH * BATCH * epochs * per ))" >> "$HERE/compute/budget.txt"
  for arm in compute epochs; do
    [ $arm = epochs ] && images=$IMAGES epochs=1
    train finetune.py "$HERE/$arm/$method" "${FT[@]}" $(flags $method) --train-images "$images" --epochs "$epochs"
    if [ $method = consistency ]; then  # Boosting's other members: the same run with other seeds
      for seed in $(seq 1 $(( MEMBERS - 1 ))); do
        train finetune.py "$HERE/$arm/consistency_seed$seed" "${FT[@]}" --train-images "$images" --epochs "$epochs" --seed "$seed"
      done
    fi
  done
done
[ "$PART" = train ] && { echo "sigma $SIGMA: every training run finished; bash bench/comparators.sh ${1} certifies them"; exit 0; }
certify() {  # certify NAME checkpoint...: one TSV per run, continued where it stopped
  stage "certify_$(echo "${1#$OUT/}" | tr / _)" python certify.py "${COMMON[@]}" "${CERT[@]}" --checkpoint "${@:2}" --out "$1.tsv"
}
certify "$HERE/rrcm" "$HERE/rrcm/ckpt.pt"
for arm in compute epochs; do
  for method in $METHODS; do
    certify "$HERE/$arm/$method" "$HERE/$arm/$method/ckpt.pt"
  done
  certify "$HERE/$arm/boosting" "$HERE/$arm/consistency/ckpt.pt" $(for seed in $(seq 1 $(( MEMBERS - 1 ))); do
    echo "$HERE/$arm/consistency_seed$seed/ckpt.pt"; done)
  runs=("$HERE/rrcm.tsv" $(for m in $METHODS boosting; do echo "$HERE/$arm/$m.tsv"; done))
  { python report.py "${runs[@]}"; echo; python report.py "${runs[@]}" --compare; } | tee "$HERE/$arm.txt"
done
