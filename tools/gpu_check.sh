#!/usr/bin/env bash
# The check for a first GPU run (issues 14 and 18): one script, under 8 minutes on one H100, one JSON.
#
#   bash tools/gpu_check.sh                      # writes $OUT/gpu_check.json (OUT unset: gpu_check/gpu_check.json)
#   GPU_CHECK_DRY_RUN=1 bash tools/gpu_check.sh  # the same steps on the CPU with a tiny model (tests/test_gpu_check.py)
#
# Steps, each under a time limit (the limits add up to 7.5 minutes; a step that fails or runs out of time is
# recorded with its log tail and the next one still runs; a benchmark writes its JSON after each part, so one
# stopped by its limit keeps the parts it finished):
#   1. the CUDA tests: tests/test_cuda.py and test_fast_path.py's host-sync test (CUDA sync debug mode);
#      they skip without a GPU
#   2. tools/benchmark.py for each bundle in float32 and bf16, with MFU and peak memory (the step's own and
#      the card's total): the MAE step at the configs' batch (24 crops; 256 images for cxr14) beside MONAI's,
#      the fine-tuning step at the configs' micro_batch_size, and (btcv, brats) sliding-window inference of a
#      whole CT / MR volume at the configs' sw_batch_size, 4x that, and a smaller overlap
#   3. gpu_check.json: the device (nvidia-smi), each step's command, exit code, seconds and log tail, the
#      pytest outcome of each test, and every benchmark's own JSON
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
DRY=${GPU_CHECK_DRY_RUN:-0}
DEST=${OUT:-$REPO/gpu_check}
PARTS=$DEST/gpu_check_parts
mkdir -p "$PARTS"
rm -f "$PARTS"/*   # nothing from an earlier run may end up in this one's JSON
cd "$REPO"

if [ "$DRY" = 1 ]; then
    # shapes and sizes only: a 2-block ViT of width 48 on 32^3 crops, one timed round, on the CPU
    SIZE="--device cpu --threads 1 --roi_size 32 --hidden_size 48 --num_layers 2 --num_heads 2 --decoder_hidden_size 48
          --decoder_num_layers 1 --decoder_num_heads 2 --feature_size 4 --repeats 1 --warmup 0 --sw_repeats 1"
    BATCH_BTCV="--batch 2 --finetune_batch 2" BATCH_BRATS="--batch 2 --finetune_batch 1" BATCH_CXR14="--batch 4 --finetune_batch 2"
else
    SIZE="--repeats 5 --warmup 2 --sw_repeats 2"   # sliding window: one untimed pass, then 2
    BATCH_BTCV="--batch 24 --finetune_batch 6" BATCH_BRATS="--batch 24 --finetune_batch 3" BATCH_CXR14="--batch 256 --finetune_batch 64"
fi

# step NAME SECONDS COMMAND...: run it with its output in $PARTS/NAME.log, record exit code and seconds
step() {
    local name=$1 limit=$2 start end rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" >"$PARTS/$name.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$start" "$end" "$*" >>"$PARTS/steps.tsv"
    echo "   exit $rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$PARTS/nvidia_smi.csv" 2>&1 || true

step pytest 90 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_fast_path.py -k cuda \
    --junitxml="$PARTS/pytest.xml"
# the bundles' own mask ratios (0.125 for the 3-D bundles, 0.75 for chest X-rays); fine-tuning at micro_batch_size
# shellcheck disable=SC2086  # SIZE and BATCH_* are lists of arguments
step benchmark_btcv 150 "$PYTHON" tools/benchmark.py --preset btcv --parts mae,finetune,sw --mask_ratios 0.125 \
    $BATCH_BTCV $SIZE --out "$PARTS/benchmark_btcv.json"
# shellcheck disable=SC2086
step benchmark_brats 130 "$PYTHON" tools/benchmark.py --preset brats --parts mae,finetune,sw --mask_ratios 0.125 \
    $BATCH_BRATS $SIZE --out "$PARTS/benchmark_brats.json"
# shellcheck disable=SC2086
step benchmark_cxr14 80 "$PYTHON" tools/benchmark.py --preset cxr14 --parts mae,finetune --mask_ratios 0.75 \
    $BATCH_CXR14 $SIZE --out "$PARTS/benchmark_cxr14.json"

"$PYTHON" - "$PARTS" "$DEST/gpu_check.json" "$DRY" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

parts, dest, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
steps = []
for line in (parts / "steps.tsv").read_text().splitlines():
    name, rc, start, end, command = line.split("\t", 4)
    seconds = float(end) - float(start)
    log = (parts / f"{name}.log").read_text(errors="replace")
    steps.append(dict(name=name, exit_code=int(rc), timed_out=int(rc) in (124, 137), seconds=round(seconds, 1),
                      command=command, log_tail=log[-3000:]))
tests = []
if (parts / "pytest.xml").exists():
    for case in ET.parse(parts / "pytest.xml").iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        detail = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
        tests.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome, detail=detail[:500]))
benchmarks = {}
for f in sorted(parts.glob("benchmark_*.json")):
    benchmarks[f.stem.removeprefix("benchmark_")] = json.loads(f.read_text())
smi = parts / "nvidia_smi.csv"
report = dict(dry_run=dry, nvidia_smi=smi.read_text().strip() if smi.exists() else None, steps=steps, tests=tests,
              benchmarks=benchmarks, ok=all(s["exit_code"] == 0 for s in steps))
dest.write_text(json.dumps(report, indent=1, default=str))
print(f"wrote {dest}: " + ", ".join(f"{s['name']} {'ok' if s['exit_code'] == 0 else 'exit ' + str(s['exit_code'])} "
                                     f"({s['seconds']:.0f}s)" for s in steps))
EOF
