#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a GPU image that has torch, transformers, accelerate, peft, pyarrow
# and pandas but not hydra-core, omegaconf, docling-core, datasets or trl, and no network: run this here (where pip
# reaches the package registry), carry the folder, and gpu_check.sh installs it there before it starts.
#
#   benchmarks/gpu_wheels.sh            # into .whl/ (git-ignored): 24 wheels, about 10 MB, Python 3.12, x86-64
#   benchmarks/gpu_wheels.sh DIR        # into DIR
#
# The versions are the ones this project's venv was tested with. The list is every package those five need that
# such an image lacks (their Requires-Dist, less what the image has: pyyaml, pillow, typer, tabulate, lxml, attrs,
# requests, filelock, fsspec, xxhash, psutil, jinja2, huggingface-hub), plus pypdfium2, which renders the real-docs
# PDFs for vs_trl.py; typing-extensions comes along because pydantic 2.14 needs a newer one than the image may
# have. antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as a source archive only, so it is built into
# a wheel here (pure Python). Checked by `gpu_check.sh --cpu-smoke` under a Python 3.12 venv that holds only the
# image's packages (benchmarks/RESULTS.md, GPU check).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}

WHEELS=(
  hydra-core==1.3.8 omegaconf==2.3.1
  docling-core==2.101.1 doclang==0.7.3 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 jsonref==1.1.0
  latex2mathml==3.81.1 defusedxml==0.7.1 pypdfium2==5.15.2
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
"$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST" >&2
