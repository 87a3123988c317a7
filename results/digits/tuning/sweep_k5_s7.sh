#!/usr/bin/env bash
# Session 7: does the ReducedMPL finding carry over to Table 1's UDA+MPL? There the student, as
# in the paper's Section 4.1, meets the labels only through the teacher and the final fine-tuning.
# UDA and UDA+MPL (presets) and UDA+MPL whose student also learns the labeled batch
# (student_labeled_weight=1), K=5, on the tuning seeds 100-104 only.
# Usage: bash results/digits/tuning/sweep_k5_s7.sh OUTROOT
set -euo pipefail
root=${1:?output folder}
metapl digits --seeds 100-104 --methods uda,uda_mpl --out "$root/presets" --quiet > "$root/presets.log" 2>&1
metapl digits --seeds 100-104 --methods uda_mpl --set uda_mpl:student_labeled_weight=1 \
  --out "$root/labels" --quiet > "$root/labels.log" 2>&1
