#!/usr/bin/env bash
# Session 7: Table 2 on digits, reported seeds 0-4, with the setting chosen on the tuning seeds
# 100-104 (results/reduced/tuning/summary.txt): the ReducedMPL student also learns the labels
# (student_labeled_weight=1) and is fine-tuned for 300 steps; NoisyStudent is fine-tuned the same
# way, so that fine-tuning does not separate them. Then the same ReducedMPL without the MPL signal
# (mpl_weight=0: the reduced teacher learns from the labeled distributions alone), to see what the
# adaptive teacher adds. Usage: bash results/reduced/session7_run.sh OUTROOT
set -euo pipefail
root=${1:?output folder}
common=(--set reduced_mpl:student_labeled_weight=1 --set reduced_mpl:finetune_steps=300)
metapl reduced --seeds 0-4 --out "$root/table2" --quiet "${common[@]}" \
  --set noisy_student:finetune_steps=300 > "$root/table2.log" 2>&1
metapl reduced --seeds 0-4 --out "$root/mpl_weight0" --quiet --methods reduced_mpl "${common[@]}" \
  --set reduced_mpl:mpl_weight=0 > "$root/mpl_weight0.log" 2>&1
