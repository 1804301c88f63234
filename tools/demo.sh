#!/usr/bin/env bash
# The end-to-end demo behind `./run.sh`: bundled real data -> tokenizer -> the three preprocessors ->
# DeepSpeed pretraining (2 CPU ranks, or the GPUs present) -> evaluation -> a summary table.
#   DEMO_DIR (default runs/demo), DEMO_STEPS (default from configs/demo.yaml), DEMO_LIMIT (digits to use),
#   DEMO_MICRO_BATCH (per rank, default 32), DEMO_OVERRIDES (extra --section.key=value run-config overrides)
set -euo pipefail
read -r -a DEMO_ARGS <<< "${DEMO_OVERRIDES:-}"
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${DEMO_DIR:-runs/demo}
RAW=$OUT/raw
SHARDS=$OUT/shards
rm -rf "$OUT"  # every demo run starts fresh (the tools themselves resume; the demo shows a whole run)
mkdir -p "$OUT"
step() { echo; echo "==> $*"; }

step "1/7 demo data from installed packages (scikit-learn digits, Python docs) -> $RAW"
$PY tools/make_demo_data.py --output "$RAW" ${DEMO_LIMIT:+--limit "$DEMO_LIMIT"}

step "2/7 WordPiece tokenizer -> $OUT/tokenizer.json"
$PY tools/train_tokenizer.py --type wordpiece --vocab-size 2048 --input "$RAW/tokenizer_corpus.jsonl" \
  --output "$OUT/tokenizer.json"

step "3/7 preprocessing: image-text pairs, image folders, text corpus (dVAE tokens precomputed)"
COMMON=(--tokenizer "$OUT/tokenizer.json" --codebook random:0:tiny --image-size 80 --workers 2)
for split in train heldout; do
  $PY -m preprocess.pairs --input "$RAW/pairs_$split.jsonl" --image-root "$RAW" --output "$SHARDS/pairs_$split" \
    "${COMMON[@]}" --shard-size 512
  $PY -m preprocess.images --input "$RAW/classes_$split" --output "$SHARDS/images_$split" \
    --codebook random:0:tiny --image-size 80 --workers 2 --shard-size 512
done
for split in train heldout; do
  $PY -m preprocess.text --input "$RAW/text_$split.jsonl" --output "$SHARDS/text_$split" \
    --tokenizer "$OUT/tokenizer.json" --workers 2
done

step "4/7 pretraining with DeepSpeed ZeRO-2"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NGPU=$(nvidia-smi -L | wc -l); PRECISION=(); DEVICE="$NGPU GPU(s), bf16"
else
  NGPU=2; PRECISION=(--deepspeed.bf16.enabled false); DEVICE="2 CPU ranks, fp32"
fi
echo "    on $DEVICE"
$PY -m deepspeed.launcher.runner --num_gpus "$NGPU" flava_ds/pretrain.py \
  --deepspeed_config ds_configs/zero2.json --config configs/demo.yaml "${PRECISION[@]}" \
  --deepspeed.train_micro_batch_size_per_gpu "${DEMO_MICRO_BATCH:-32}" \
  --save "$OUT/checkpoints" --tensorboard-dir "$OUT/tensorboard" --logging.metrics_file "$OUT/metrics.jsonl" \
  --data.tokenizer "$OUT/tokenizer.json" \
  --data.image_text.paths "[$SHARDS/pairs_train]" --data.image.paths "[$SHARDS/images_train]" \
  --data.text.paths "[$SHARDS/text_train]" \
  --eval.image_text "[$SHARDS/pairs_heldout]" --eval.classification "[$SHARDS/images_heldout]" \
  --eval.text "[$SHARDS/text_heldout]" \
  ${DEMO_STEPS:+--train-steps "$DEMO_STEPS"} "${DEMO_ARGS[@]}" 2>&1 | tee "$OUT/train.log" \
  | grep --line-buffered -v "FutureWarning\|return func\|warnings.warn" || true
# DeepSpeed on CPU can abort a rank at exit after it finished; success = every rank's completion marker
if [ "$(grep -c "flava_ds: training complete" "$OUT/train.log")" -ne "$NGPU" ]; then
  echo "training did not complete on every rank: see $OUT/train.log" >&2
  exit 1
fi

step "5/7 export: consolidated fp32 safetensors + a transformers directory"
$PY tools/convert_checkpoint.py from-deepspeed --input "$OUT/checkpoints" --output "$OUT/export"
$PY tools/convert_checkpoint.py to-hf --input "$OUT/export" --output "$OUT/export_hf" --metrics "$OUT/metrics.jsonl"

step "6/7 summary"
$PY tools/demo_summary.py --metrics "$OUT/metrics.jsonl" --out-dir "$OUT"

step "7/7 evaluation of the export (tools/evaluate.py, the in-training evaluation's settings)"
$PY tools/evaluate.py --model "$OUT/export" \
  --run-config "$OUT/checkpoints/$(cat "$OUT/checkpoints/latest")/run_config.json" \
  --zero-shot "$SHARDS/images_heldout" --retrieval "$SHARDS/pairs_heldout" --text "$SHARDS/text_heldout" \
  --probe-train "$SHARDS/images_train" --probe-val "$SHARDS/images_heldout" \
  --json "$OUT/eval.json" --tensorboard-dir "$OUT/tensorboard" --step "$(cat "$OUT/checkpoints/latest" | tr -dc 0-9)"
