#!/usr/bin/env bash
# A second (or third) process for one of issue 17's folders: runs the named classify stages,
# each followed by its evaluate, with exactly scripts/study17.sh's command words, so that the
# folder's serial pipeline finds them done (same fingerprints) and skips them:
#   scripts/study17-stages.sh split2 tsr-seed2 tsr-seed1 lr-sr-2ch-seed0 ...
# A stage that another process holds (the run-dir lock) or has done is passed over; the serial
# run then stops on the lock or skips, and re-running scripts/study17.sh NAME finishes the folder
# with its report. Start it once the folder's `enhance` stage is done (every classify reads it
# or `sr`).
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
if [[ ! "$name" =~ ^split([0-9]+)(-rcan)?$ ]]; then
  echo "study17-stages: $name is not splitK or splitK-rcan" >&2
  exit 2
fi
k=${BASH_REMATCH[1]}
if [[ -n "${BASH_REMATCH[2]}" ]]; then
  words=(sr.config=configs/sr-synth-strong.yaml 'sr.overrides=[]' 'arms=[lr,sr,lr+sr]')
else
  words=('arms=[hr,lr,sr,lr+sr,lr|sr,tsr]')
fi
for run in "$@"; do
  for stage in "classify/$run" "evaluate/$run"; do
    echo "study17-stages: $name $stage from $(date -u +%FT%TZ)"
    .venv/bin/python -m launch.cli pipeline --config configs/synth-v1.yaml \
      "out_dir=runs/study17/$name" "${words[@]}" 'seeds=[0,1,2]' "data.split.seed=$k" \
      --stage "$stage" || { echo "study17-stages: $name $stage not run here (rc=$?)"; break; }
  done
done
echo "study17-stages: $name done at $(date -u +%FT%TZ)"
