#!/usr/bin/env bash
# Everything that needs a GPU, in one run of a few minutes on one CUDA device (CI has none, so these run by
# hand on a machine that has one):
#   1. the CUDA tests: CUDA-graph sampling equals the eager loop (greedy and seeded), bf16 autocast training
#      tracks fp32, PPO's graphed rollouts equal the eager loop's, and the "torchrun equals one process" tests of
#      SFT, RM, DPO and PPO again on the GPUs with NCCL (one rank per GPU, up to two; a single GPU still runs the
#      process group and FSDP2, over a mesh of one); -k cuda also picks a few CPU tests with "cuda" in their name;
#   2. bench/bench_model.py on the GPU: nanoalign's eager and CUDA-graph sampler against transformers'
#      generate (bf16 and fp32), batch-1 decoding against the weight-streaming floor, and the bf16 training
#      step's MFU on a ~1.1B LLaMA (TinyLlama's shape).
#
#     bash bench/cuda_checks.sh [LOG_DIR]      # logs and the benchmarks' JSON in LOG_DIR (default cuda_checks/)
#
# Runs from a checkout without installing (PYTHONPATH); needs torch with CUDA, transformers, pytest, and the
# runtime dependencies. Each part runs even when an earlier one failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=$(mkdir -p "${1:-cuda_checks}" && cd "${1:-cuda_checks}" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
part() {  # part NAME COMMAND...: run one part, its output to the screen and LOG/NAME.txt
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$LOG/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'GPUs', torch.cuda.device_count())"

part tests python -m pytest -q -p no:cacheprovider -m "slow or not slow" -k cuda tests
part bench_bf16 python bench/bench_model.py --device cuda --dtype bfloat16 --json "$LOG/bench_bf16.json"
part bench_fp32 python bench/bench_model.py --device cuda --skip-train --json "$LOG/bench_fp32.json"
part bench_1b python bench/bench_model.py --device cuda --dtype bfloat16 --config 1b --batch 8 --seq 1024 \
    --steps 5 --json "$LOG/bench_1b.json"
echo "all parts passed: $([ $status -eq 0 ] && echo yes || echo NO)"
exit $status
