#!/usr/bin/env bash
# Creates .venv with everything srmri needs; a no-op when nothing changed since the last run.
# torch/torchvision come first (pinned to the releases on this machine's disk), then the
# project, then DeepSpeed, which must be built against the installed torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.srmri-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[dev]'
python -m pip install -q --no-build-isolation deepspeed==0.19.8
echo "$want" > "$stamp"
echo "srmri: environment ready in .venv"
