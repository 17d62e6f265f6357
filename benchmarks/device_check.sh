#!/usr/bin/env bash
# The device check of issue 18 (see benchmarks/device_check.py for what it measures).
#
# On the device machine, as the one `run` call (from the repository root there):
#     bash benchmarks/device_check.sh [--parts resnet50,sr ...]
#   installs the wheels carried in .whl/ (if present) into /tmp/site, then runs
#   benchmarks/device_check.py at full size with --out "$OUT", the whole under `timeout`, and
#   prints the table (from results.json if the run itself was cut short).
#
# Here, once, to make .whl/ (ignored by .gitignore; about 28 MB, inside the 64 MiB carry limit):
#     bash benchmarks/device_check.sh --fetch-wheels
#   cp312 manylinux wheels for the device's Python 3.12 of what its image lacks, and DeepSpeed
#   built here into a pure-Python wheel (PyPI has only its source). Ray is not fetched: its
#   wheel alone (~79 MB) is over the carry limit, and the check does not use it.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}  # the device's python3 is the one with torch
# Versions of this project's .venv; the device's image has everything else these need.
PINS=(
  webdataset==1.0.2 braceexpand==0.1.7 nibabel==5.4.2 nilearn==0.14.1 pydicom==3.0.2
  ImageHash==4.3.2 PyWavelets==1.9.0 monai==1.6.1
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing_extensions==4.16.0
)
DEEPSPEED=deepspeed==0.19.8

if [ "${1:-}" = "--fetch-wheels" ]; then
  [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$WHEELS" "${PINS[@]}" || exit
  # No ops compiled in (DS_BUILD_OPS=0): a py3-none-any wheel; ZeRO-1/2 with the trainer's
  # own optimizer needs none. --no-build-isolation: its build imports torch.
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "$DEEPSPEED" \
    -w "$WHEELS" || exit
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi

OUT=${OUT:-runs/device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
  # --no-deps: the image has what these need; --target: the image's own packages stay as
  # they are. A failure is reported, not fatal: the table then says what is missing.
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl 2>&1 | tail -5 \
    || echo "pip install of the carried wheels failed; going on without them"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no $WHEELS/*.whl: running with what this machine has"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi > /dev/null && nvidia-smi
# The Python budget is 450 s (plus its imports); the timeout stays under the call's 540 s.
timeout 500 "$PY" benchmarks/device_check.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/console.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "device_check.py ended with status $status; the table of what it saved:"
  "$PY" benchmarks/device_check.py --report "$OUT" 2>&1 | tee -a "$OUT/console.log"
fi
exit "$status"
