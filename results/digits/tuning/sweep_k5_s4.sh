#!/usr/bin/env bash
# Session 4 sweep for the digits K=5 goal (UDA+MPL above UDA): the MPL signal's weight in the
# teacher's loss (config key mpl_weight), on top of the preset (uda_factor 6 from session 3).
# Tuning seeds 100-104 only: the reported seeds 0-4 are never looked at while choosing.
# Each line: one setting, 5 seeds.
# Usage: bash results/digits/tuning/sweep_k5_s4.sh OUTROOT   (summary lines -> OUTROOT/summary.txt)
set -euo pipefail
root=${1:?output folder}
mkdir -p "$root"
source "$(dirname "$0")/sweep_run.sh"
# mpl_weight 1 is the preset itself: session 3's "uf6" row, 98.15 +- 0.75 (sweep_k5_s3_summary.txt).
run mplw0           uda_mpl --set uda_mpl:mpl_weight=0
run mplw3           uda_mpl --set uda_mpl:mpl_weight=3
run mplw10          uda_mpl --set uda_mpl:mpl_weight=10
