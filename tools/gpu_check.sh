#!/usr/bin/env bash
# Every GPU check in one run on one H100/H200, under 8 minutes: Triton kernel correctness, the attention
# benchmark, FLAVA-full end-to-end training (ZeRO-2, bf16) vs transformers, the contrastive-gather fraction.
#
#   bash tools/gpu_check.sh                  # figures under $OUT (if set) else ./gpu_check_out
#   BATCH=256 WORKERS=12 PYTHON=/path/to/python bash tools/gpu_check.sh   # default python: .venv/bin/python
#
# Each part runs under `timeout`; a failing or overrunning part is recorded and the next one runs anyway.
# Output: <dir>/gpu_check.json (every figure + per-part status), per-part logs, and a summary on stdout.
set -u
cd "$(dirname "$0")/.."
DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$DIR"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python}"
START=$(date +%s)
declare -A STATUS SECONDS_USED

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible; nothing to check" | tee "$DIR/summary.txt"
  exit 1
fi
MEM_GIB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)")
# FLAVA-full bf16 image-text: roughly 0.25 GiB of activations per sample; keep a third of the GPU for
# transformers' model, its optimizer and the comparison. Override with BATCH=.
BATCH="${BATCH:-$(( MEM_GIB * 2 / 32 * 32 ))}"
WORKERS="${WORKERS:-8}"

part() {  # part NAME SECONDS CMD...: run CMD under a time limit, log it, record its status
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$DIR/$name.log" 2>&1
  local rc=$?
  SECONDS_USED[$name]=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="timeout after ${limit}s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  echo "    -> ${STATUS[$name]} in ${SECONDS_USED[$name]}s (log: $DIR/$name.log)"
  tail -n 15 "$DIR/$name.log" | sed 's/^/    | /'
}

# 1. Triton kernels against SDPA on the GPU (fp32, fp16, bf16 incl. the bf16 test skipped on CPU).
part kernels 110 "$PY" -m pytest -q -x tests/test_kernels.py -p no:cacheprovider

# 2. Attention kernels per sequence length, plus a FLAVA-full step per attn_impl (fewer iterations than the
#    default, which is meant for a run of its own).
part attention 140 "$PY" tools/bench_attention.py --model --warmup 3 --iters 10 --json "$DIR/attention.json"

# 3. FLAVA-full, ZeRO-2, bf16, one GPU, at a batch that fills it; every batch kind and the mix; the
#    contrastive all-gather timed against the image-text step. transformers runs the same loader batches at a
#    quarter of that batch (its eager attention and fp32 activations would not fit at ours). If our batch does
#    not fit, the part is rerun once at half the batch, within what is left of the 8 minutes.
train_cmd() {  # sets TRAIN to the command for batch $1
  TRAIN=("$PY" tools/bench_train.py --preset full --zero 2 --precision bf16 --batch "$1" --compare-batch $(( $1 / 4 ))
    --workers "$WORKERS" --pairs 1024 --steps 8 --compare-steps 4 --warmup 2 --gather
    --attn-impl "${ATTN_IMPL:-sdpa}" --json "$DIR/train.json")
}
train_cmd "$BATCH"
part train 200 "${TRAIN[@]}"
LEFT=$(( 470 - ($(date +%s) - START) ))
if [ "${STATUS[train]}" != ok ] && grep -qi "out of memory" "$DIR/train.log" && [ "$LEFT" -gt 60 ]; then
  BATCH=$(( BATCH / 2 ))
  train_cmd "$BATCH"
  part train_half "$LEFT" "${TRAIN[@]}"
fi

ELAPSED=$(( $(date +%s) - START ))
STATUS_JSON=$(for k in "${!STATUS[@]}"; do printf '%s\t%s\t%s\n' "$k" "${STATUS[$k]}" "${SECONDS_USED[$k]}"; done)
STATUS_JSON="$STATUS_JSON" "$PY" - "$DIR" "$ELAPSED" "$BATCH" <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

out, elapsed, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
parts = {}
for line in os.environ["STATUS_JSON"].splitlines():
    name, status, seconds = line.split("\t")
    parts[name] = {"status": status, "seconds": int(seconds)}
report = {"date": subprocess.run(["date", "-u", "+%F %T UTC"], capture_output=True, text=True).stdout.strip(),
          "elapsed_s": elapsed, "requested_batch": batch, "parts": parts}
try:
    import torch
    report["device"] = torch.cuda.get_device_name(0)
except Exception as err:  # the summary must still be written
    report["device"] = f"unknown ({err})"
for name in ("attention", "train"):
    path = out / f"{name}.json"
    if path.exists():
        report[name] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))

lines = [f"gpu_check on {report['device']}: {elapsed} s in all ({report['date']})"]
lines += [f"  {n:<11} {p['status']:<24} {p['seconds']:>4} s" for n, p in sorted(parts.items())]
train = report.get("train", {})
for kind, r in train.get("kinds", {}).items():
    t, c = r.get("train", {}), r.get("compare", {})
    mfu = f"{100 * t['mfu']:.1f}%" if t.get("mfu") is not None else "n/a"
    line = (f"  {kind:<10} batch {train.get('batch')}: {t.get('samples_per_s', 0):8.1f} samples/s "
            f"{t.get('tflops', 0):7.1f} TFLOP/s MFU {mfu:>6} data wait {100 * t.get('data_wait_fraction', 0):5.1f}% "
            f"peak {t.get('peak_mib', 0) / 1024:6.1f} GiB")
    if "time_ratio" in c:
        line += (f" | vs transformers at batch {train.get('compare_batch')}: time {c['time_ratio']:.3f}x, "
                 f"step memory {c.get('memory_ratio', float('nan')):.3f}x")
    elif "error" in c:
        line += f" | vs transformers: {c['error']}"
    lines.append(line)
gather = train.get("gather")
if gather:
    lines.append(f"  contrastive gather ({gather['world_size']} rank): {1e3 * gather['gather_fwd_bwd_s_median']:.3f} ms "
                 f"= {100 * (gather.get('fraction_of_image_text_step') or 0):.3f}% of the image-text step")
attention = report.get("attention", {})
for row in attention.get("triton_vs_best_sdpa", []):
    lines.append(f"  attention {json.dumps(row)}")
for row in attention.get("model_step", []):
    lines.append(f"  FLAVA-full step per attn_impl {json.dumps(row)}")
text = "\n".join(lines)
(out / "summary.txt").write_text(text + "\n")
print(text)
EOF
echo "figures: $DIR/gpu_check.json"
