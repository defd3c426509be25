#!/usr/bin/env bash
# The GPU check: the full-size granite-docling architecture (random init) trained in bf16 on one GPU, under 8 minutes
# on an H100. For batch 1, 2, 4, 8, with the vision encoder trained and frozen, one JSON line per configuration:
# samples/s, tokens/s, MFU, peak memory, data-wait share (benchmarks/gpu_step.py explains every number).
#
#   benchmarks/gpu_check.sh                        # needs a CUDA build of torch (make setup: TORCH_SPEC=torch)
#   benchmarks/gpu_check.sh --batch-sizes 2,4      # any gpu_step.py option passes through
#   PEAK_TFLOPS=756 benchmarks/gpu_check.sh        # MFU against another peak (H100 PCIe); default 989 (H100 SXM)
#   benchmarks/gpu_check.sh --cpu-smoke            # the same path on CPU: tiny preset, batch 1, 1 step (tests)
#
# With $OUT set (the device machine's output folder), the lines are also written to $OUT/gpu_check.jsonl.
# A batch that does not fit prints {"error": "out of memory ..."} and the check goes on; configurations that would
# start after the time budget print {"skipped": "time budget"}; the whole check is killed at GPU_CHECK_LIMIT_S.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python
fi
LIMIT=${GPU_CHECK_LIMIT_S:-460}     # hard stop, seconds (7 min 40 s)
BUDGET=$((LIMIT - 120))             # no configuration starts after this (one takes well under 2 minutes)

if [[ " $* " != *" --cpu-smoke "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >&2
fi

run() { timeout --signal=TERM "$LIMIT" "$PYTHON" benchmarks/gpu_step.py --time-budget "$BUDGET" "$@"; }
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  run "$@" | tee "$OUT/gpu_check.jsonl"
else
  run "$@"
fi
