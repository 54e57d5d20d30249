#!/usr/bin/env bash
# GPU check for flowkern on a CUDA machine (no network needed): the gpu-marked tests, then the benchmarks.
#
#   bash bench/gpu_check.sh                  # from anywhere; results in bench/results/
#   bash bench/gpu_check.sh --quick          # iterating: no tests, `flowkern bench --quick` (about a minute)
#   OUT=/some/dir bash bench/gpu_check.sh    # also copies the results there
#
# Writes bench/results/<date>-<gpu>.json and .md (`python -m flowkern bench`, flowkern/bench.py) plus
# <date>-<gpu>-tests.log and -bench.log.
# Runs from the source tree (PYTHONPATH=repo root), so no install is needed. Budget: about 8 minutes on an H100
# (tests capped at TEST_TIMEOUT_S, the benchmark gets what is left of TOTAL_BUDGET_S and stops starting new cases
# when it runs out). Exit status: 0 all good; bit 1 = GPU tests failed, timed out or could not run; bit 2 = a
# benchmark case raised; 4 = no usable CUDA device. Skipped-for-time benchmark cases are not failures.
set -u -o pipefail
QUICK=0
case "${1:-}" in
    --quick) QUICK=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_check.sh [--quick]" >&2; exit 2 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-460}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-240}
RESULTS=$REPO/bench/results
mkdir -p "$RESULTS"
started=$(date +%s)
marker=$(mktemp)
trap 'rm -f "$marker"' EXIT

gpu=$("$PYTHON" - <<'EOF'
import re, sys
import torch
if not torch.cuda.is_available():
    print(f"no CUDA device visible to torch {torch.__version__}")
    sys.exit(1)
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))
EOF
) || { echo "gpu_check: ${gpu:-could not import torch}" >&2; exit 4; }
stem="$RESULTS/$(date +%Y-%m-%d-%H%M)-$gpu"

"$PYTHON" - <<'EOF'
import torch, triton, platform
print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"triton {triton.__version__} | python {platform.python_version()}")
EOF
git -C "$REPO" rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' || true

# The compiled extension (the "cuda" backend): built in place unless it loads already or FLOWKERN_BUILD_EXTENSION=0.
# Its build time is reported; a failed build leaves the other backends to run and sets bit 1.
status=0
if [ "${FLOWKERN_BUILD_EXTENSION:-1}" != "0" ] && ! "$PYTHON" -c "import flowkern.kernels.compiled" 2>/dev/null; then
    echo "== building flowkern._C (CUDA kernels for ${TORCH_CUDA_ARCH_LIST:-8.0;9.0}) =="
    build_started=$(date +%s)
    if MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" setup.py build_ext --inplace > "$stem-build.log" 2>&1; then
        echo "built flowkern._C in $(( $(date +%s) - build_started ))s"
    else
        echo "gpu_check: building flowkern._C failed after $(( $(date +%s) - build_started ))s; see $stem-build.log"
        tail -20 "$stem-build.log"
        status=$((status | 1))
    fi
fi

echo "== GPU tests (python -m pytest tests -m gpu), at most ${TEST_TIMEOUT_S}s =="
if [ "$QUICK" = 1 ]; then
    echo "gpu_check --quick: GPU tests NOT run" | tee "$stem-tests.log"
elif "$PYTHON" -c "import pytest" 2>/dev/null; then
    timeout "$TEST_TIMEOUT_S" "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$stem-tests.log"
    tests_rc=${PIPESTATUS[0]}
    if [ "$tests_rc" -eq 124 ]; then
        echo "gpu_check: GPU tests timed out after ${TEST_TIMEOUT_S}s" | tee -a "$stem-tests.log"
    fi
    [ "$tests_rc" -eq 0 ] || status=$((status | 1))
else
    echo "gpu_check: pytest is not installed here; the GPU tests did NOT run" | tee "$stem-tests.log"
    status=$((status | 1))
fi

elapsed=$(( $(date +%s) - started ))
bench_budget=$(( TOTAL_BUDGET_S - elapsed - 60 ))
[ "$bench_budget" -ge 60 ] || bench_budget=60
[ "$QUICK" = 1 ] && bench_budget=60
echo "== benchmarks (python -m flowkern bench), starting new cases for ${bench_budget}s =="
# The hard limit leaves room for the case running when the budget ends; the report is rewritten after every case.
# The fit and embedding rows need the STS data: $FLOWKERN_DATA, else ../shared/data/sts or ./sts-data (a copy
# carried to a machine without ../shared); without it those rows are left out.
data_args=()
for candidate in "${FLOWKERN_DATA:-}" "$REPO/../shared/data/sts" "$REPO/sts-data"; do
    if [ -n "$candidate" ] && [ -f "$candidate/stsb-test.tsv.gz" ]; then data_args=(--data-dir "$candidate"); break; fi
done
quick_args=()
[ "$QUICK" = 1 ] && quick_args=(--quick)
timeout $(( bench_budget + 90 )) "$PYTHON" -m flowkern bench "${quick_args[@]}" --budget-s "$bench_budget" \
    --out-dir "$RESULTS" "${data_args[@]}" 2>&1 | tee "$stem-bench.log"
bench_rc=${PIPESTATUS[0]}
case "$bench_rc" in
    0) ;;
    1) status=$((status | 2)) ;;
    124) echo "gpu_check: benchmark cut off by the hard time limit; its partial report is kept" ;;
    *) echo "gpu_check: flowkern bench crashed (exit $bench_rc)"; status=$((status | 2)) ;;
esac

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    find "$RESULTS" -maxdepth 1 -type f -newer "$marker" -exec cp {} "$OUT"/ \;
    echo "copied this run's results to $OUT"
fi
echo "gpu_check: done in $(( $(date +%s) - started ))s, exit status $status"
exit "$status"
