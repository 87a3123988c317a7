#!/usr/bin/env bash
# Session 8, tuning seeds 100-104 only: the two directions session 7 left untried, each from
# the session-7 digits-reduced preset (the ReducedMPL student learns the labels, both students
# fine-tune 300 steps) and applied to both students alike, NoisyStudent and ReducedMPL run together:
#   preset     the session-7 preset itself (a reference run with session 8's code)
#   steps3000  twice the students' steps (1,500 -> 3,000; the large teacher unchanged)
#   pool160    an unlabeled pool the large teacher is less sure of: the top 160 per class by its
#              confidence instead of 80 (digits has about 100 unlabeled images per class, so this
#              keeps nearly all of them, the ones it is least sure of included)
# Usage: bash results/reduced/tuning/sweep_s8.sh OUTROOT
set -uo pipefail
root=${1:?output folder}
mkdir -p "$root"
source "$(dirname "$0")/sweep_common.sh"
# Unlike sessions 5-7's sweeps, these start from the session-7 preset; the digits preset now holds
# this sweep's choice (pool160), so every run is pinned back to the pool of 80 (later --set win).
SESSION5_PRESET=(--set noisy_student:unlabeled_per_class=80 --set reduced_mpl:unlabeled_per_class=80)
both=noisy_student,reduced_mpl
sweep preset $both
sweep steps3000 $both --set noisy_student:steps=3000 --set reduced_mpl:steps=3000
sweep pool160 $both --set noisy_student:unlabeled_per_class=160 \
  --set reduced_mpl:unlabeled_per_class=160
