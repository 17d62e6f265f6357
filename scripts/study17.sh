#!/usr/bin/env bash
# Issue 17's grid, one pipeline folder at a time, exactly as RESULTS.md pre-registers it:
#   scripts/study17.sh split2 split3-rcan ...      (folders in the order given)
# Each folder is runs/study17/NAME (split K's main folder: splitK; its RCAN folder: splitK-rcan);
# once its report is done it is archived to results/study17/NAME (records only, see
# `python -m trainer.experiment archive`), which is what a later session's study reads: the
# run folders live on a machine that is not kept. Classifiers use one thread each
# (train.threads), so two or three of these at once on 2 cores give the same numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in "$@"; do
  if [[ ! "$name" =~ ^split([0-9]+)(-rcan)?$ ]]; then
    echo "study17: $name is not splitK or splitK-rcan" >&2
    exit 2
  fi
  k=${BASH_REMATCH[1]}
  if [[ -n "${BASH_REMATCH[2]}" ]]; then
    words=(sr.config=configs/sr-synth-strong.yaml 'sr.overrides=[]' 'arms=[lr,sr,lr+sr]')
  else
    words=('arms=[hr,lr,sr,lr+sr,lr|sr,tsr]')
  fi
  if [[ -e results/study17/$name/archive.json ]]; then
    echo "study17: $name is archived already (results/study17/$name)"
    continue
  fi
  mkdir -p runs/study17 results/study17
  echo "study17: $name from $(date -u +%FT%TZ)"
  .venv/bin/python -m launch.cli pipeline --config configs/synth-v1.yaml \
    "out_dir=runs/study17/$name" "${words[@]}" 'seeds=[0,1,2]' "data.split.seed=$k" \
    >"runs/study17/$name.log" 2>&1
  echo "study17: $name done at $(date -u +%FT%TZ)"
  .venv/bin/python -m trainer.experiment archive "runs/study17/$name" "results/study17/$name"
done
