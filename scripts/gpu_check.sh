#!/usr/bin/env bash
# The one prepared command for a machine with a GPU (at most ~8 minutes on one GPU):
#   bash scripts/gpu_check.sh [REPORT_DIR]
# installs the project if needed, runs every GPU-marked test, then a short GPU benchmark
# (full-batch Newton on device-resident data; streaming rows to the GPU against a pinned copy;
# sparse FTRL on CSR batches moved to the GPU against the H2D copy of the same bytes),
# and writes REPORT_DIR/gpu_report.md (default: $OUT if set, else outputs/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
report_dir=${1:-${OUT:-outputs/gpu-check}}
mkdir -p "$report_dir"
python -c "import largeml, hydra, tensorboard" 2>/dev/null || pip install -q -e ".[test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$report_dir/gpu.txt" 2>&1
timeout 300 python -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py \
  > "$report_dir/gpu_tests.txt" 2>&1
tests=$?
timeout 240 python scripts/bench_gpu.py --rows 1000000 --stream-rows 2000000 --sparse-rows 500000 \
  --out "$report_dir/gpu_bench.md" > "$report_dir/gpu_bench.txt" 2>&1
bench=$?
{
  echo "# largeml GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo; cat "$report_dir/gpu.txt"; echo
  echo "## GPU tests (exit $tests)"; echo; echo '```'; tail -n 40 "$report_dir/gpu_tests.txt"; echo '```'
  echo; echo "## Benchmark (exit $bench)"; echo
  if [ -f "$report_dir/gpu_bench.md" ]; then cat "$report_dir/gpu_bench.md"; else tail -n 30 "$report_dir/gpu_bench.txt"; fi
} > "$report_dir/gpu_report.md"
cat "$report_dir/gpu_report.md"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
