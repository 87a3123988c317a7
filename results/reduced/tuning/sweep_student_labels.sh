#!/usr/bin/env bash
# Session 7 sweep 3, tuning seeds 100-104 only. The paper says "the *only* difference between
# NoisyStudent and ReducedMPL is that ReducedMPL has a teacher that adapts to the student", but
# our ReducedMPL student (like MPL's in Section 4.1) met the labels only through the teacher's
# MPL signal, while NoisyStudent's student trains on them. Here ReducedMPL's student also learns
# the labeled batch in its own step (student_labeled_weight=1, NoisyStudent's weight), with and
# without sweep 2's fine-tuning (NoisyStudent's numbers on these seeds: sweeps 1 and 2).
# Usage: bash results/reduced/tuning/sweep_student_labels.sh OUTROOT
set -uo pipefail
root=${1:?output folder}
mkdir -p "$root"
source "$(dirname "$0")/sweep_common.sh"
sweep labels reduced_mpl --set reduced_mpl:student_labeled_weight=1
sweep labels_ft reduced_mpl --set reduced_mpl:student_labeled_weight=1 --set reduced_mpl:finetune_steps=300
