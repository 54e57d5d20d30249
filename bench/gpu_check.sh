#!/usr/bin/env bash
# GPU check for flowkern on one CUDA machine without network, sized for a lease of 15 minutes of GPU time in all
# (machine start included) and at most 10 minutes per command: one run of about 8 minutes (TOTAL_BUDGET_S=480)
# that measures the headline first and writes every result the moment it exists, so a run killed at its limit
# still returns what it measured.
#
#   bash bench/gpu_check.sh --dry-run      # print the plan (phases, order, budgets, commands); needs no GPU
#   bash bench/gpu_check.sh                # run it; files in bench/results/<date>-<gpu>/
#   OUT=/some/dir bash bench/gpu_check.sh  # files written into $OUT as they grow (and copied to bench/results/
#                                          # <date>-<gpu>/ after each phase)
#   bash bench/gpu_check.sh --quick        # iterating: `flowkern bench --quick` only (its 60 s case budget)
#
# The phases, in order (--dry-run prints them with their budgets and commands): preflight (device, versions; the
# CUDA extension starts building in the background, for this GPU's arch only); warm (the headline's Triton kernels
# and torch.compile graphs compiled in parallel processes, untimed, so the timed phase is not spent compiling one
# kernel at a time); glow (the headline: the whole BERT-flow Glow in every variant); models (BertFlow.fit and
# embedding throughput against sentence-transformers); cuda (the whole Glow on the CUDA kernels, once the build is
# done); tests-first (the fused-Glow and TrainStep GPU tests); tests-rest (every other GPU test); ops (host
# overhead, each op and layer). Each phase must end by the sum of the budgets up to it: time a phase leaves unused
# goes to the phases after it, an overrun comes out of them. TOTAL_BUDGET_S scales every budget.
#
# Files (6; a device run returns at most 8 from $OUT): gpu_check.log (this script's output), build.log,
# warm.log, bench.jsonl (one JSON line per timing, appended as measured), bench.md (every table so far, rewritten
# after each case), tests.log (both pytest runs, streamed; -rfE names each failure and error).
#
# Carried along (the GPU machine has no network): the STS data in ./sts-data (or $FLOWKERN_DATA) and an encoder in
# ./minilm-fp16 (written by `python bench/pack_encoder.py minilm-fp16`: the embedded all-MiniLM-L6-v2 in fp16,
# 44 MiB; or $FLOWKERN_ENCODER). Without them the fit and embedding rows are left out, and the report says why.
#
# Exit status: 0 all good; bit 1 = GPU tests failed, timed out or did not run, or the extension build failed;
# bit 2 = a benchmark case raised or a benchmark phase crashed; 4 = no usable CUDA device. Cases cut by a budget
# are not failures: the report lists them.
set -u -o pipefail

DRY_RUN=0
QUICK=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --quick) QUICK=1 ;;
        *) echo "gpu_check: unknown argument '$arg'; usage: bash bench/gpu_check.sh [--dry-run] [--quick]" >&2
           exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}

TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-480}
case "$TOTAL_BUDGET_S" in
    ''|*[!0-9]*) echo "gpu_check: TOTAL_BUDGET_S must be a whole number of seconds, got '$TOTAL_BUDGET_S'" >&2
                 exit 2 ;;
esac
[ "$TOTAL_BUDGET_S" -ge 120 ] || { echo "gpu_check: TOTAL_BUDGET_S=$TOTAL_BUDGET_S is under 120 s" >&2; exit 2; }
GRACE_S=30                                # a benchmark phase starts no case this close to its deadline
BUILD_CAP_S=${BUILD_CAP_S:-300}           # the background extension build is stopped after this long
BUILD_JOBS=${MAX_JOBS:-8}                 # half of a 16-core machine: the warm phase compiles at the same time
WARM_WORKERS=${WARM_WORKERS:-8}
TEST_WORKERS=${TEST_WORKERS:-8}           # pytest-xdist processes on the one GPU
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-60}      # per test (pytest-timeout), a cold Triton cache's compilations included
FIRST_TESTS=(tests/ops/test_glow.py tests/nn/test_train_step.py)

# The plan: phase names in order and their budgets at TOTAL_BUDGET_S=480; "ops" gets the rest.
PHASES=(preflight warm glow models cuda tests-first tests-rest ops)
declare -A BASE_BUDGET=([preflight]=20 [warm]=60 [glow]=140 [models]=60 [cuda]=25 [tests-first]=60 [tests-rest]=85)
declare -A WHAT=(
    [preflight]="device, versions, compute capability; starts the extension build (below) in the background"
    [warm]="compiles the glow phase's Triton kernels and torch.compile graphs in $WARM_WORKERS processes, untimed"
    [glow]="HEADLINE: whole Glow (C=768; additive+reverse, affine+LU) eager, torch.compile default/reduce-overhead, \
per-op Triton, fused, fused+TrainStep; B=64, 65536, then 4096; fp32, bf16; inference, train step"
    [models]="BertFlow.fit (fast first, fast warm, reference); embedding throughput vs sentence-transformers fp32/fp16"
    [cuda]="waits for the build; the whole Glow on the compiled CUDA kernels (per op), B=64/65536/4096, fp32/bf16"
    [tests-first]="GPU tests of the fused Glow and TrainStep: ${FIRST_TESTS[*]}"
    [tests-rest]="every other GPU test (pytest -m gpu)"
    [ops]="host overhead (100 calls), each op family and nn layer, every backend (cuda included once built)"
)
declare -A BUDGET END_AT
elapsed_plan=0
for phase in "${PHASES[@]}"; do
    if [ "$phase" = ops ]; then
        BUDGET[$phase]=$(( TOTAL_BUDGET_S - elapsed_plan ))
    else
        BUDGET[$phase]=$(( BASE_BUDGET[$phase] * TOTAL_BUDGET_S / 480 ))
    fi
    elapsed_plan=$(( elapsed_plan + BUDGET[$phase] ))
    END_AT[$phase]=$elapsed_plan
done

# The STS data and the encoder for the models phase (a copy carried to a machine without ../shared).
DATA_ARGS=()
for candidate in "${FLOWKERN_DATA:-}" "$REPO/../shared/data/sts" "$REPO/sts-data"; do
    if [ -n "$candidate" ] && [ -f "$candidate/stsb-test.tsv.gz" ]; then DATA_ARGS=(--data-dir "$candidate"); break; fi
done
ENCODER_ARGS=()
if [ -z "${FLOWKERN_ENCODER:-}" ] && [ -f "$REPO/minilm-fp16/config.json" ]; then
    ENCODER_ARGS=(--encoder "$REPO/minilm-fp16")
fi

FILES="gpu_check.log build.log warm.log bench.jsonl bench.md tests.log"
PYTEST_COMMON=(-m gpu -p no:cacheprovider -rfE -v --durations=10)
if [ "$DRY_RUN" = 1 ] || "$PYTHON" -c "import xdist, pytest_timeout" 2>/dev/null; then
    PYTEST_COMMON+=(-n "$TEST_WORKERS" --timeout "$TEST_TIMEOUT_S" --timeout-method=thread)
    PYTEST_NOTE=""
else
    PYTEST_NOTE="pytest-xdist or pytest-timeout is missing: the GPU tests run in one process, no per-test timeout"
fi

# ------------------------------------------------------------------------------------------------- commands
show() {   # a command as one line, arguments with spaces quoted
    local shown="" arg
    for arg in "$@"; do
        case "$arg" in *[[:space:]]*|'') shown+=" '$arg'" ;; *) shown+=" $arg" ;; esac
    done
    echo "${shown# }"
}

# Each phase's command, from its soft budget (when to stop starting cases) and hard limit (when it is stopped).
phase_command() {
    local phase=$1 soft=$2
    local bench=("$PYTHON" -m flowkern bench --jsonl "$RUN/bench.jsonl")
    case "$phase" in
        warm) CMD=("$PYTHON" -m flowkern bench --suite glow --warm-workers "$WARM_WORKERS" --budget-s "$soft") ;;
        glow) CMD=("${bench[@]}" --suite glow --budget-s "$soft"
                   --note "gpu_check: caches warmed by its warm phase; the extension build runs meanwhile") ;;
        models) CMD=("${bench[@]}" --suite models --budget-s "$soft" "${DATA_ARGS[@]}" "${ENCODER_ARGS[@]}") ;;
        cuda) CMD=("${bench[@]}" --suite cuda --budget-s "$soft") ;;
        tests-first) CMD=("$PYTHON" -m pytest "${FIRST_TESTS[@]}" "${PYTEST_COMMON[@]}") ;;
        tests-rest) CMD=("$PYTHON" -m pytest tests "${FIRST_TESTS[@]/#/--ignore=}" "${PYTEST_COMMON[@]}") ;;
        ops) CMD=("${bench[@]}" --suite ops --budget-s "$soft") ;;
        *) CMD=() ;;
    esac
}

build_command() {
    CMD=(env TORCH_CUDA_ARCH_LIST="$1" MAX_JOBS="$BUILD_JOBS" timeout -k 10 "$BUILD_CAP_S" nice -n 10
         "$PYTHON" setup.py build_ext --inplace --build-temp "$SCRATCH/build")
}

soft_budget() {   # a benchmark phase's time for starting cases, given the seconds to its deadline
    local left=$1
    case "$2" in
        warm) echo $(( left - 5 )) ;;   # it stops its own workers at the end of its budget
        *) echo $(( left > 2 * GRACE_S ? left - GRACE_S : left / 2 )) ;;
    esac
}

# ------------------------------------------------------------------------------------------------- dry run
if [ "$DRY_RUN" = 1 ]; then
    RUN='$OUT'
    SCRATCH='$TMPDIR'
    echo "gpu_check plan (dry run, nothing is started): total budget ${TOTAL_BUDGET_S} s; the last phase is stopped"
    echo "at ${TOTAL_BUDGET_S} s and the script ends within $(( TOTAL_BUDGET_S + 20 )) s (a device command may run 600 s)"
    echo "python: $PYTHON (python3 first, then python; PYTHON= overrides)"
    echo "results: \$OUT when set, each file written as it grows (copied to bench/results/<date>-<gpu>/ after each"
    echo "         phase); else bench/results/<date>-<gpu>/"
    echo "files: $FILES ($(wc -w <<< "$FILES") files; a device run returns at most 8)"
    echo "STS data: ${DATA_ARGS[1]:-not found here (looked at \$FLOWKERN_DATA, ../shared/data/sts, ./sts-data)}"
    echo "encoder: ${FLOWKERN_ENCODER:-${ENCODER_ARGS[1]:-the embedded all-MiniLM-L6-v2 if installed}} (carry" \
         "./minilm-fp16, or set FLOWKERN_ENCODER)"
    [ -z "$PYTEST_NOTE" ] || echo "note: $PYTEST_NOTE"
    echo
    if [ "$QUICK" = 1 ]; then
        echo "  1  quick      60 s    60 s  $PYTHON -m flowkern bench --quick --budget-s 60 --jsonl \$OUT/bench.jsonl"
        exit 0
    fi
    printf '%5s  %-12s %6s  %7s  %s\n' order phase budget "ends by" what
    order=0
    for phase in "${PHASES[@]}"; do
        order=$(( order + 1 ))
        printf '%5s  %-12s %4s s  %5s s  %s\n' "$order" "$phase" "${BUDGET[$phase]}" "${END_AT[$phase]}" \
            "${WHAT[$phase]}"
        if [ "$phase" = preflight ]; then
            build_command "<major.minor of torch.cuda.get_device_capability()>"
            printf '%5s  %-12s %6s  %7s  %s\n' - build background "<=$BUILD_CAP_S s" "flowkern._C for this GPU's \
arch only, nice'd, $BUILD_JOBS jobs, build time reported; the cuda phase (and so the tests) waits for it"
            echo "        \$ $(show "${CMD[@]}") > \$OUT/build.log"
            continue
        fi
        phase_command "$phase" "$(soft_budget "${BUDGET[$phase]}" "$phase")"
        echo "        \$ timeout ${BUDGET[$phase]} $(show "${CMD[@]}")"
    done
    exit 0
fi

# ------------------------------------------------------------------------------------------------- the run
STARTED=$(date +%s)
SCRATCH=$(mktemp -d)
gpu=$("$PYTHON" - <<'EOF'
import re, sys
import torch
if not torch.cuda.is_available():
    print(f"no CUDA device visible to torch {torch.__version__}")
    sys.exit(1)
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))
EOF
) || { echo "gpu_check: ${gpu:-could not import torch with $PYTHON}" >&2; rm -rf "$SCRATCH"; exit 4; }
RESULTS_DIR=$REPO/bench/results/$(date +%Y-%m-%d-%H%M)-$gpu
RUN=${OUT:-$RESULTS_DIR}
mkdir -p "$RUN" "$RESULTS_DIR"
exec > >(tee -a "$RUN/gpu_check.log") 2>&1

BUILD_STATE=none   # none | off | present | running | built | failed
cleanup() {
    if [ "$BUILD_STATE" = running ] && [ -s "$SCRATCH/build.pid" ]; then
        kill -TERM "$(cat "$SCRATCH/build.pid")" 2>/dev/null   # timeout passes it on to the whole build
    fi
    rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 143' TERM   # so that cleanup runs
trap 'exit 130' INT

publish() {   # with OUT set, bench/results gets a copy of what exists so far
    [ "$RUN" = "$RESULTS_DIR" ] || cp -f "$RUN"/* "$RESULTS_DIR"/ 2>/dev/null || true
}

cuda_backend_usable() {
    "$PYTHON" -c "import sys, torch; from flowkern import backend
sys.exit(0 if backend.usable_on('cuda', torch.device('cuda')) else 1)" 2>/dev/null
}

start_build() {
    if [ "${FLOWKERN_BUILD_EXTENSION:-1}" = 0 ]; then
        BUILD_STATE=off; echo "extension build: off (FLOWKERN_BUILD_EXTENSION=0); no cuda rows or tests"; return
    fi
    if cuda_backend_usable; then
        BUILD_STATE=present
        echo "extension build: not needed, flowkern._C loads with CUDA; the cuda rows run with the others"
        return
    fi
    local arch
    arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    build_command "$arch"
    echo "extension build: started in the background for sm_${arch/./} only: $(show "${CMD[@]}")"
    BUILD_STARTED=$(date +%s)
    BUILD_STATE=running
    ( "${CMD[@]}" & echo $! > "$SCRATCH/build.pid"; wait $!; echo "$? $(date +%s)" > "$SCRATCH/build.done" ) \
        > "$RUN/build.log" 2>&1 &
}

await_build() {
    [ "$BUILD_STATE" = running ] || return 0
    [ -s "$SCRATCH/build.done" ] ||
        echo "waiting for the extension build (started $(( $(date +%s) - BUILD_STARTED )) s ago)"
    while [ ! -s "$SCRATCH/build.done" ]; do sleep 1; done   # its own timeout ends it by BUILD_CAP_S
    local rc ended
    read -r rc ended < "$SCRATCH/build.done"
    if [ "$rc" = 0 ] && cuda_backend_usable; then
        BUILD_STATE=built
        echo "extension build: flowkern._C built in $(( ended - BUILD_STARTED )) s"
    else
        BUILD_STATE=failed
        [ "$rc" = 124 ] && echo "extension build: stopped after BUILD_CAP_S=$BUILD_CAP_S s" \
            || echo "extension build: failed (exit $rc) after $(( ended - BUILD_STARTED )) s; the end of build.log:"
        tail -15 "$RUN/build.log"
        status=$(( status | 1 ))
    fi
}

status=0
declare -A USED OUTCOME
run_phase() {
    local phase=$1 left
    left=$(( STARTED + END_AT[$phase] - $(date +%s) ))
    echo
    echo "== $phase: ${WHAT[$phase]}"
    if [ "$phase" = cuda ]; then
        await_build
        left=$(( STARTED + END_AT[$phase] - $(date +%s) ))
        case "$BUILD_STATE" in
            built) ;;
            present) OUTCOME[$phase]="not needed: the glow phase had the cuda rows" ;;
            *) OUTCOME[$phase]="left out: extension build $BUILD_STATE" ;;
        esac
        [ "$BUILD_STATE" = built ] || { echo "${OUTCOME[$phase]}"; return; }
    fi
    if [ "$left" -lt 10 ]; then
        OUTCOME[$phase]="left out: ${left} s to its deadline"; echo "${OUTCOME[$phase]}"; return
    fi
    phase_command "$phase" "$(soft_budget "$left" "$phase")"
    echo "   (until $(( END_AT[$phase] )) s, ${left} s from now) \$ $(show "${CMD[@]}")"
    local began rc
    began=$(date +%s)
    case "$phase" in
        tests-*)
            [ -z "$PYTEST_NOTE" ] || echo "$PYTEST_NOTE" | tee -a "$RUN/tests.log"
            echo "== $phase \$ $(show "${CMD[@]}")" >> "$RUN/tests.log"
            # A cuda test fails (not skips) when the extension that was built does not serve it.
            case "$BUILD_STATE" in built|present) export FLOWKERN_REQUIRE_EXTENSION=1 ;;
                                   *) export FLOWKERN_REQUIRE_EXTENSION=0 ;; esac
            # SIGINT at the deadline: pytest stops and still prints its summary (-rfE) of what ran.
            timeout -s INT -k 15 "$left" "${CMD[@]}" 2>&1 | tee -a "$RUN/tests.log"
            rc=${PIPESTATUS[0]} ;;
        warm)
            timeout -k 10 "$left" "${CMD[@]}" > "$RUN/warm.log" 2>&1
            rc=$?
            tail -1 "$RUN/warm.log" ;;
        *)
            timeout -s INT -k 10 "$left" "${CMD[@]}" 2>&1
            rc=$? ;;
    esac
    USED[$phase]=$(( $(date +%s) - began ))
    case "$phase:$rc" in
        *:0) OUTCOME[$phase]="ok" ;;
        *:124|*:137) OUTCOME[$phase]="stopped at its deadline"
                     case "$phase" in tests-*) status=$(( status | 1 )) ;; esac ;;
        tests-*:*) OUTCOME[$phase]="failed (pytest exit $rc)"; status=$(( status | 1 )) ;;
        *:1) OUTCOME[$phase]="some cases raised (see bench.md, Errors)"; status=$(( status | 2 )) ;;
        *) OUTCOME[$phase]="crashed (exit $rc)"; status=$(( status | 2 )) ;;
    esac
    echo "== $phase: ${OUTCOME[$phase]} after ${USED[$phase]} s"
    publish
}

echo "gpu_check: total budget ${TOTAL_BUDGET_S} s; results in $RUN$([ "$RUN" = "$RESULTS_DIR" ] || echo " (copied to $RESULTS_DIR)")"
echo "== preflight: ${WHAT[preflight]}"
"$PYTHON" - <<'EOF'
import os, platform
import torch, triton
props = torch.cuda.get_device_properties(0)
versions = {}
for name in ("transformers", "sentence_transformers", "xdist", "pytest_timeout"):
    try:
        versions[name] = __import__(name).__version__
    except (ImportError, AttributeError):
        versions[name] = "missing"
print(f"device {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
      f"{props.total_memory / 2**30:.0f} GiB) | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"triton {triton.__version__} | python {platform.python_version()} | {os.cpu_count()} CPUs | "
      + " | ".join(f"{k} {v}" for k, v in versions.items()))
EOF
git -C "$REPO" rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' || true
echo "STS data: ${DATA_ARGS[1]:-not found (\$FLOWKERN_DATA, ../shared/data/sts, ./sts-data): no fit or embedding rows}"
echo "encoder: ${FLOWKERN_ENCODER:-${ENCODER_ARGS[1]:-none carried: the embedded all-MiniLM-L6-v2 if installed}}"

if [ "$QUICK" = 1 ]; then
    timeout -s INT -k 10 120 "$PYTHON" -m flowkern bench --quick --budget-s 60 --jsonl "$RUN/bench.jsonl"
    rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 124 ] || status=$(( status | 2 ))
    publish
    echo "gpu_check --quick: done in $(( $(date +%s) - STARTED )) s, exit status $status (GPU tests not run)"
    exit "$status"
fi

start_build
USED[preflight]=$(( $(date +%s) - STARTED ))
OUTCOME[preflight]=ok
publish
for phase in "${PHASES[@]:1}"; do
    run_phase "$phase"
done

echo
echo "== summary: extension build $BUILD_STATE"
printf '%-12s %6s %6s  %s\n' phase budget used outcome
for phase in "${PHASES[@]}"; do
    printf '%-12s %5ss %5ss  %s\n' "$phase" "${BUDGET[$phase]}" "${USED[$phase]:--}" "${OUTCOME[$phase]:-}"
done
echo "gpu_check: done in $(( $(date +%s) - STARTED )) s, exit status $status; files in $RUN"
publish
exit "$status"
