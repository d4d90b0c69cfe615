#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on a GPU machine without network whose image lacks them (or has older
# versions): the versions this repository is tested with, for CPython 3.12 on x86-64, into .whl/ (git-ignored through
# info/exclude), 23 MB. datasets 5.2 also needs pyarrow >= 24: add pyarrow==26.0.1 (about 45 MB) if the machine has an
# older one. Check first what the machine has (`python3 -m pip list`) and drop what it has in a version that fits. Usage, from the repository root, where pip can reach PyPI:
#     bash benchmarks/gpu_wheels.sh && du -sh .whl
# Install there (one command line of the device tool, .whl carried with the working tree):
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PACKAGES=(
  trl==1.16.0 transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
  kernels==0.19.1 tomlkit==0.15.3
  tokenizers==0.23.3
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${PACKAGES[@]}"
