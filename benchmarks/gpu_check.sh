#!/usr/bin/env bash
# The GPU check: the full-size granite-docling architecture (random init) on one GPU, in one go of under 8 minutes
# on an H100/H200 (GPU_CHECK_LIMIT_S, default 460 s). Three parts, one JSON line per result, each tagged "part":
#
#   step  benchmarks/gpu_step.py: optimizer steps on 2048 px pages (17 tiles) in bf16, batch 1, 4, 8 with the
#         vision encoder trained: samples/s, tokens/s, MFU, peak memory, data-wait share.
#   mix   benchmarks/token_budget.py: the seed's mix (documents of 1-3 pages beside ~9 formula crops per document),
#         one epoch at the seed's global batch 1 x 8, one sample per pass against data.batch_tokens, with
#         training.mixed_precision=auto: passes, samples/s, MFU, data wait, peak memory, for both.
#   trl   benchmarks/vs_trl.py --bf16: our loop against TRL's SFTTrainer on the same real pages, whole epochs,
#         bf16 autocast on both sides: samples/s, supervised tokens/s, peak GPU memory, losses.
#
#   benchmarks/gpu_check.sh                        # needs a CUDA build of torch
#   benchmarks/gpu_check.sh --batch-sizes 2,4      # any gpu_step.py option passes through to the step part
#   PEAK_TFLOPS=756 benchmarks/gpu_check.sh        # MFU against another peak (H100 PCIe); default 989 (H100 SXM)
#   benchmarks/gpu_check.sh --cpu-smoke            # every part on CPU at its smallest, tiny preset (tests)
#
# Packages: an image with torch, transformers, accelerate, peft, pyarrow and pandas also needs hydra-core,
# omegaconf, docling-core, datasets, trl and what they need. benchmarks/gpu_wheels.sh downloads them (about 10 MB)
# into .whl/ on a machine with the package registry; carry .whl/ and this script installs it into /tmp/site when
# hydra is missing (no network needed there).
#
# With $OUT set (the device machine's output folder), the lines are also written to $OUT/gpu_check.jsonl.
# A batch that does not fit prints {"error": "out of memory ..."} and the check goes on; step configurations that
# would start after that part's time budget print {"skipped": "time budget"}; a part that runs past its slice
# prints {"part": ..., "error": "timed out ..."}; nothing runs past GPU_CHECK_LIMIT_S.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi
if ! "$PYTHON" -c "import hydra" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LIMIT=${GPU_CHECK_LIMIT_S:-460}  # the whole check, seconds (7 min 40 s)
STEP_S=$((LIMIT * 35 / 100))     # each part's slice; the trl part gets what is left
MIX_S=$((LIMIT * 35 / 100))

SMOKE=false
[[ " $* " == *" --cpu-smoke "* ]] && SMOKE=true
if $SMOKE; then
  MIX=(--preset tiny --pages 2 --formulas 24 --warmup 1 --num-workers 0)  # one 2-page document, 24 crops
  TRL=(--preset tiny --override model.random_init=true --max-pages 1 --epochs 1 --batch-size 1 --warmup 0 --num-workers 0)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >&2
  set -- --batch-sizes 1,4,8 --freeze-vision false "$@"
  FULL=(--preset granite_docling_258m --override model.random_init=true)
  MIX=("${FULL[@]}" --override training.mixed_precision=auto --pages 45 --formulas 200 --warmup 2 --num-workers 6)
  TRL=("${FULL[@]}" --bf16 --epochs 3 --batch-size 2 --warmup 2 --num-workers 6)
fi

tagged() {  # PART SECONDS COMMAND...: run under a time limit; print its JSON lines with "part" added
  local part=$1 seconds=$2
  shift 2
  local code=0
  timeout --signal=TERM "$seconds" "$@" >"$WORK/$part.out" || code=$?
  "$PYTHON" - "$part" "$WORK/$part.out" "$code" "$seconds" <<'EOF'
import json, sys
part, path, code, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for line in open(path):
    if line.startswith("{"):
        print(json.dumps({"part": part, **json.loads(line)}), flush=True)
if code == 124:
    print(json.dumps({"part": part, "error": f"timed out after {seconds} s"}), flush=True)
elif code:
    print(json.dumps({"part": part, "error": f"exit code {code} (its log is on stderr)"}), flush=True)
EOF
}

check() {
  tagged step "$STEP_S" "$PYTHON" benchmarks/gpu_step.py --time-budget $((STEP_S - 75)) "$@"
  tagged mix "$MIX_S" "$PYTHON" benchmarks/token_budget.py --json "${MIX[@]}"
  local left=$((LIMIT - SECONDS))
  if ((left < 30)); then
    echo '{"part": "trl", "skipped": "time budget"}'
  else
    tagged trl "$left" "$PYTHON" benchmarks/vs_trl.py --json "${TRL[@]}"
  fi
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  check "$@" | tee "$OUT/gpu_check.jsonl"
else
  check "$@"
fi
