#!/usr/bin/env bash
# Session 7 sweep 2, tuning seeds 100-104 only: the ReducedMPL student learns the labels only
# through the MPL signal (they are its validation data), while NoisyStudent and the supervised
# student train on them. The paper's later versions fine-tune MPL's student on the labeled data
# (our digits UDA+MPL preset does: 300 steps, SGD lr 0.01). Here: ReducedMPL with that fine-tuning,
# at the preset's teacher lr and at sweep 1's pick, and NoisyStudent with the same fine-tuning (so
# that fine-tuning is not what separates them).
# Usage: bash results/reduced/tuning/sweep_finetune.sh OUTROOT TEACHER_LR
set -uo pipefail
root=${1:?output folder} lr=${2:?teacher lr chosen by sweep 1}
mkdir -p "$root"
source "$(dirname "$0")/sweep_common.sh"
ft=(--set noisy_student:finetune_steps=300 --set reduced_mpl:finetune_steps=300)
sweep ft_lr1e-4 noisy_student,reduced_mpl "${ft[@]}"
[ "$lr" = 1e-4 ] || sweep "ft_lr$lr" reduced_mpl "${ft[@]}" --set "reduced_mpl:teacher_lr=$lr"
