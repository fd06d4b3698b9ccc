#!/usr/bin/env bash
# The flagship NICE generators of EfficientNet-Lite0 (issue 19; docs/real_models.md): one run per
# target kept fraction, in parallel, each on unlabelled footage (the ImageNet sample classes of the
# training split, bench/imagenet_splits.py, plus every 5th frame of the CC-BY videos), L_D on the
# classifier's own predictions, nice_fast generator, b = 8, saliency warm start.
#
#   bench/train_flagship.sh SPLITS_DIR VIDEOS_DIR OUT_DIR
#   env: TARGETS ("0.15 0.3 0.5"), MINUTES (time cap per run, 5.5), EPOCHS (80), WARMUP (100 steps), WORKERS (4 per run),
#        BATCH (64), BLOCK (b, 8), DEVICE (auto), PYTHON (python3)
set -euo pipefail
splits=$1 videos=$2 out=$3
mkdir -p "$out"
for t in ${TARGETS:-0.15 0.3 0.5}; do
  "${PYTHON:-python3}" -m keepbits -q train nice --classifier efficientnet_lite0 \
    --footage "$splits/train" "$videos" --frame-step 5 --labels predicted \
    --generator nice_fast --block-size "${BLOCK:-8}" --target-fraction "$t" --warmup-steps "${WARMUP:-100}" \
    --epochs "${EPOCHS:-80}" --step-epochs 30 --max-minutes "${MINUTES:-5.5}" --batch-size "${BATCH:-64}" \
    --workers "${WORKERS:-4}" --device "${DEVICE:-auto}" --out "$out/lite0_nice_b${BLOCK:-8}_t$t" > "$out/lite0_nice_b${BLOCK:-8}_t$t.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
exit $status
