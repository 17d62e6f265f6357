#!/usr/bin/env bash
# Rewrites requirements.lock from the packages installed in .venv now (`make lock`; a .venv
# made by `make setup`, with nothing installed by hand): run it
# after changing pyproject.toml's dependencies and installing them, then re-measure the
# quickstart (its numbers are stated for the locked versions). torch, torchvision, their CUDA
# libraries and DeepSpeed are left out: scripts/setup.sh installs those by pip.
set -euo pipefail
cd "$(dirname "$0")/.."
head -n 7 requirements.lock > requirements.lock.new
.venv/bin/python -m uv pip freeze --python .venv/bin/python --exclude-editable |
  grep -v -E '^(torch|torchvision|deepspeed|pip)==|^(nvidia-|triton|cuda-)|^-e' \
    >> requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
