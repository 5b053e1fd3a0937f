#!/usr/bin/env bash
# Every GPU check of issues 11, 12 and 13 in one call, within 8 minutes on one GPU (an H200).
#
#   bash examples/benchmarks/gpu_check.sh           # on the lent GPU machine, repository root
#
# Stages run in order of priority, each under its own cap, cut to what is left of
# GPU_CHECK_BUDGET (450 s by default), and none starts with under 30 s left, so that the call
# ends in time whatever happens; a stage that did not run is listed as skipped. Outputs: each stage's log and the CUDA Markdown fragments (written by the
# benchmarks' --markdown with exactly the commands on docs/performance.md, then copied) under
# $OUT (the device tool's output folder; ./gpu_check_out elsewhere), and summary.txt with one
# line per stage. The machine's own python3 is used (it holds torch and Triton); the package
# runs from this checkout (PYTHONPATH), nothing is installed. Copy $OUT/fragments/*.md into
# docs/performance/ and add a `--8<--` line for each to docs/performance.md.
#
# Separate commands (each needs more than one call's time; CIFAR-10 staged into /tmp/cifar as
# ../shared/data/README.md says):
#   python3 examples/benchmarks/train_step.py --device cuda --batch-size 64 --steps 10 --repeats 2 \
#       --modes "bf16 + channels_last + compile,bf16 + channels_last + compile + triton DLM" \
#       --markdown docs/performance/train_step-cuda-full-compile.md
#   python3 examples/benchmarks/train_step.py --device cuda --steps 10 --repeats 2 \
#       --modes "bf16 + channels_last + regional compile" --markdown docs/performance/train_step-cuda-b128.md
#   The 20-minute run (about 22 minutes of device time with compilation and the final pass):
#   setsid nohup python3 examples/train_cifar10.py --data /tmp/cifar --recipe gpu-20min \
#       --out /tmp/run20 --no-progress --compile-cache-dir /tmp/discretelik-inductor >/tmp/run20.log 2>&1 &
#   python3 examples/benchmarks/metrics_to_markdown.py /tmp/run20 \
#       --markdown docs/performance/cifar10-20min-cuda.md      # target: <= 3.10 test bits/dim
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT/logs" "$OUT/fragments"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Inductor's and Triton's caches shared by the stages' subprocesses: a graph compiled by one
# stage is reused by the next instead of compiled again.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/discretelik-inductor}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/discretelik-triton}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

stage() {  # stage NAME CAP_S COMMAND...: run it for at most CAP_S or what is left, log, summarise
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 30)); then
        echo "$name: skipped ($left s left of the ${BUDGET} s budget)" | tee -a "$SUMMARY"
        return
    fi
    local limit=$((cap < left ? cap : left)) t0 rc
    t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc in $(($(date +%s) - t0)) s$( ((rc == 124)) && echo " (stopped at its $limit s limit)")" | tee -a "$SUMMARY"
    tail -n 12 "$OUT/logs/$name.log"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    git log -1 --format='commit %h %s' 2>/dev/null
} >"$OUT/logs/environment.log" 2>&1
cat "$OUT/logs/environment.log"

# 1. Issue 11 and 13.4: the Triton DLM kernels compiled and run on the GPU, every variant,
#    against float64 (the whole file, no -x), and the head contract's Triton rows. Must pass,
#    test_cuda_kernels_are_accurate included.
stage triton_tests 140 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_dlm.py \
    tests/test_head_contract.py -k "triton or cuda" -rfs

# 2. Issue 13.1: the CUDA-graph sampling step draws exactly what the eager step draws, with no
#    capture-failure warning.
stage sampling_tests 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_sampling.py -k cuda -rfs

# 3. Issue 13.4: time and memory of the DLM log-likelihood, B = 64, K = 10 (every kernel
#    variant, the eager graph, the port-style baseline) and the roofline notes. Target: a
#    triton row <= 0.1 ms and <= 30 MiB.
stage likelihood 90 "$PY" examples/benchmarks/likelihood.py --device cuda --repeats 3 \
    --markdown docs/performance/likelihood-cuda.md

# 4. Issue 13.1-2: 16 paper-model images, naive and cached (CUDA graphs): `cached s` <= 0.5,
#    `max abs param diff` at float32 rounding, bits/dim of the draws.
stage sampling 90 "$PY" examples/benchmarks/sampling.py --device cuda --repeats 1 \
    --markdown docs/performance/sampling-cuda.md

# 5. Issue 12.3: the test pass, float32 against TF32 and bf16 backbones (paper model, the 250
#    bundled test images: a full 10,000-image pass scales by 40). bf16 - float32 <= 1e-3.
stage evaluation 45 "$PY" examples/benchmarks/evaluation.py --device cuda \
    --markdown docs/performance/evaluation-cuda.md

# 6. Issue 12.1-2: the training step at the target's batch of 64, eager fp32 (the base),
#    bf16, and bf16 + channels_last + regional compile, with launch to first step (the full
#    compile, ~110 s alone, does not fit this call: run it separately, see the header).
stage train_step_b64 200 "$PY" examples/benchmarks/train_step.py --device cuda --batch-size 64 \
    --steps 10 --repeats 2 --modes "bf16 autocast,bf16 + channels_last + regional compile" \
    --markdown docs/performance/train_step-cuda.md

for f in docs/performance/*-cuda*.md; do
    [ -e "$f" ] && cp "$f" "$OUT/fragments/"
done
echo "total $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
cat "$SUMMARY"
