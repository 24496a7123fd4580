#!/usr/bin/env bash
# One GPU session's evidence in one go (≤ 8 minutes on an H100/H200, no network needed):
#   install (pip, editable, no deps; bitsandbytes from .whl/ when carried) → CUDA extension → sm_XX compile report →
#   lora_linear at the reference shape (frozen / naive / PEFT / torch / triton, dropout 0 and 0.1, peak memory) →
#   the same over an NF4 base (needs bitsandbytes) → GPU tests (quantized bases first, the other GPU-marked tests,
#   the ops' test files) → covariance and randomized-SVD benchmarks → null-space (whole-layer calibration)
#   benchmark → a short table.
# The GPU machine has no bitsandbytes and no network: carry its wheel (43 MB) in .whl/, ignored by git, made here
# with `echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version
# 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2`, and name .whl in carry.
# Writes CSVs, PNGs and gpu_session_<device>.log / .csv under $OUT (default benchmarks/results), named by device.
# Every step has a time limit and the session a deadline (SESSION_S, default 470 s): a step that would start past
# it is skipped and says so; a failed step does not stop the next.
#
#   bash benchmarks/gpu_session.sh             # on the GPU machine, from anywhere
#   bash benchmarks/gpu_session.sh --dry-run   # on a CPU: runs each step's check (same entry points, same flags)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results}"
SESSION_S="${SESSION_S:-470}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)

# Device name and compute capability from torch alone (the package may not be installed yet).
read -r SLUG ARCH < <("$PY" - <<'EOF'
import re, torch
if torch.cuda.is_available():
    name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    arch = 10 * major + minor
else:
    name, arch = "cpu", 90
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown", arch)
EOF
)
if [[ -z "${SLUG:-}" ]]; then echo "gpu_session: cannot import torch with $PY" >&2; exit 2; fi
if [[ $DRY == 0 && $SLUG == cpu ]]; then
  echo "gpu_session: no CUDA device visible to torch; use --dry-run on a CPU" >&2; exit 2
fi
TAG="gpu_session_${SLUG}$([[ $DRY == 1 ]] && echo _dry)"
LOG="$OUT/$TAG.log"
SUMMARY="$OUT/$TAG.csv"
: > "$LOG"
echo "step,status,seconds" > "$SUMMARY"
export LORANULL_RESULTS="$OUT"   # the benchmarks' default output directory
export TRITON_DEFAULT_FP_FUSION=1
echo "gpu_session: $(date -u +%FT%TZ) device=$SLUG arch=sm_$ARCH dry_run=$DRY out=$OUT commit=$(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$LOG"

# step NAME LIMIT_S GPU_COMMAND DRY_RUN_COMMAND: run one of them under a time limit, log it, record the outcome.
step() {
  local name=$1 limit=$2 cmd=$3 check=$4
  [[ $DRY == 1 ]] && cmd=$check
  local left=$(( SESSION_S - ($(date +%s) - START) ))
  if (( left < 15 )); then
    echo "== $name: skipped (session deadline)" | tee -a "$LOG"
    echo "$name,skipped,0" >> "$SUMMARY"
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $cmd" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$LOG" 2>&1
  local rc=$? status=ok
  (( rc == 124 || rc == 137 )) && status=timeout
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed(rc=$rc)"
  local dt=$(( $(date +%s) - t0 ))
  echo "== $name: $status in ${dt}s" | tee -a "$LOG"
  echo "$name,$status,$dt" >> "$SUMMARY"
}

# Parse-only check of a benchmark's command line (a module name, or a script's path): its own argparse parser sees
# the exact GPU arguments, then the run stops before any work (a renamed or removed flag fails here, on the CPU).
parse_only() {
  local run="runpy.run_module('$1', run_name='__main__')"
  [[ $1 == *.py ]] && run="runpy.run_path('$1', run_name='__main__')"
  echo "import argparse, runpy, sys
def parse(self, args=None, namespace=None):
    ns = argparse.ArgumentParser.parse_known_args(self, args, namespace)
    if ns[1]:
        self.error('unrecognized arguments: ' + ' '.join(ns[1]))
    print('parse-only ok:', sys.argv[0], vars(ns[0]))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse
sys.argv = ['$1'] + sys.argv[1:]
$run" > "$OUT/.parse_only.py"
  echo "$PY $OUT/.parse_only.py"
}

REF_BENCH="--M 8192 --K 4096 --N 4096 --r 16 --dropout 0 0.1 --name reference --out-dir $OUT"
# lora_linear on nf4 / fp4 / int8 bases, its GPU-marked tests (bf16; the GPU tables' quantized tiles at odd shapes):
# run first and whatever the other GPU tests do (-x stops those at their first failure), the step failing if any
# fails. Its CPU-sized tests stay out: each would compile new kernel specialisations (minutes in all).
QUANT_GPU_TESTS="tests/ops/test_lora_linear_quantized.py"
GPU_TESTS="tests/ops/test_lora_linear.py tests/ops/test_strides_triton.py tests/ops/test_covariance.py tests/ops/test_rsvd.py tests/ops/test_null_space.py tests/methods/test_roselora.py tests/test_extension.py"

step install 240 \
  "$PY -m pip install --no-build-isolation --no-deps -e . && { ! ls .whl/bitsandbytes-*.whl >/dev/null 2>&1 || $PY -m pip install -q --no-index --no-deps .whl/bitsandbytes-*.whl; }" \
  "$PY -m pip install --dry-run --no-build-isolation --no-deps -e ."
step extension 180 \
  "$PY -c 'from loranull_kernels import _extension as e; m = e.load(); print(e.status()); assert m is not None, e.status()'" \
  "$PY -c 'from loranull_kernels import _extension as e; assert e.sources(), \"no csrc sources\"; print(e.status())'"
step compile_report 150 \
  "env -u TRITON_INTERPRET $PY -m loranull_kernels.triton.compile_check --arch $ARCH --report" \
  "env -u TRITON_INTERPRET $PY -m loranull_kernels.triton.compile_check --arch 90 --report --only rose_prune --match 16x16"
step bench_reference 150 \
  "$PY -m loranull_kernels.bench.lora_linear $REF_BENCH" \
  "$(parse_only loranull_kernels.bench.lora_linear) $REF_BENCH"
step bench_nf4 90 \
  "$PY -c 'import bitsandbytes' && $PY -m loranull_kernels.bench.lora_linear --base nf4 $REF_BENCH" \
  "$(parse_only loranull_kernels.bench.lora_linear) --base nf4 $REF_BENCH"
step gpu_tests 150 \
  "$PY -m pytest -q -m gpu $QUANT_GPU_TESTS; q=\$?; $PY -m pytest -q -x -m gpu tests --ignore=$QUANT_GPU_TESTS && $PY -m pytest -q -x $GPU_TESTS && exit \$q" \
  "$PY -m pytest -q --collect-only -m gpu $QUANT_GPU_TESTS | grep -c '::test_.*gpu' && $PY -m pytest -q --collect-only $GPU_TESTS | tail -1"
step bench_calibration 120 \
  "$PY benchmarks/bench_calibration.py --quick --out-dir $OUT" \
  "$(parse_only benchmarks/bench_calibration.py) --quick --out-dir $OUT"
step bench_nullspace 90 \
  "$PY benchmarks/bench_calibration_model.py --only layers --out-dir $OUT" \
  "$(parse_only benchmarks/bench_calibration_model.py) --only layers --out-dir $OUT"
rm -f "$OUT/.parse_only.py"

# The short table, last: every step's outcome, then the roofline's prediction for this device at the reference
# shape and what the benchmark measured (its CSV), side by side.
{
  echo
  echo "gpu_session summary ($SLUG, $(( $(date +%s) - START ))s):"
  column -t -s, "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
  "$PY" - "$SLUG" "$OUT/reference_${SLUG}.csv" <<'EOF' || true
import csv, os, sys
from loranull_kernels.bench import roofline
slug, path = sys.argv[1], sys.argv[2]
dev = roofline.device_for(slug) or roofline.H100
for p in (0.0, 0.1):
    pred = roofline.predict(8192, 4096, 4096, 16, "bf16", dropout=p, device=dev)
    print(f"roofline ({dev.name}) p={p}: fwd+bwd {pred.total_s * 1e6:.0f} us, frozen {pred.frozen_s * 1e6:.0f} us, "
          f"predicted ratio {pred.ratio:.3f}")
if os.path.exists(path):
    rows = [r for r in csv.DictReader(open(path)) if r.get("mode") == "full"]
    keys = [k for k in ("provider", "dropout", "median_ms", "ratio_to_frozen", "peak_mem_mb") if rows and k in rows[0]]
    print("measured (full = forward + backward):")
    for r in rows:
        print("  " + "  ".join(f"{k}={r[k]}" for k in keys))
EOF
} | tee -a "$LOG"
grep -q ',\(failed\|timeout\)' "$SUMMARY" && exit 1
exit 0
