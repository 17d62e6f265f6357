#!/usr/bin/env bash
# Creates .venv with everything srmri needs; a no-op when nothing changed since the last run.
# torch/torchvision come first, by pip (pinned to the releases on this machine's disk, which
# only pip's configuration points at), then every other dependency at the exact version in
# requirements.lock and the project itself, by uv, then DeepSpeed, which must be built against
# the installed torch (--no-build-isolation).
# Why not pip throughout: on a fresh 2-core clone pip took 250 s (torch 95 s, the project's
# ~180 dependencies 148 s, mostly byte-compiling and one-at-a-time downloads); pip with
# --no-compile for torch and uv for the rest take about 55 s (BENCHMARKS.md, issue 14).
# uv keeps the torch pip installed: it satisfies the project's range. Python byte-compiles a
# module the first time it is imported instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.srmri-setup
want=$(cat pyproject.toml requirements.lock scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip uv
python -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
python -m uv pip install -q --python .venv/bin/python -r requirements.lock
python -m uv pip install -q --python .venv/bin/python --no-deps -e '.[dev]'
python -m pip install -q --no-compile --no-build-isolation deepspeed==0.19.8
echo "$want" > "$stamp"
echo "srmri: environment ready in .venv"
