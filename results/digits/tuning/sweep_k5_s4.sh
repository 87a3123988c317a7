#!/usr/bin/env bash
# Session 4 sweep for the digits K=5 goal (UDA+MPL above UDA): the MPL signal's weight in the
# teacher's loss (config key mpl_weight), on top of the preset (uda_factor 6 from session 3).
# Tuning seeds 100-104 only: the reported seeds 0-4 are never looked at while choosing. Each line: one setting, 5 seeds.
# Usage: bash results/digits/tuning/sweep_k5_s4.sh OUTROOT   (summary lines -> OUTROOT/summary.txt)
set -euo pipefail
root=${1:?output folder}
mkdir -p "$root"
run() {  # NAME METHOD [--set ...]
  local name=$1 method=$2; shift 2
  [ -f "$root/$name/results.json" ] || \
    metapl digits --seeds 100-104 --methods "$method" --out "$root/$name" --quiet "$@" >/dev/null
  python - "$root/$name/results.json" "$name" "$*" >>"$root/summary.txt" <<'PY'
import json, sys
import numpy as np
r = json.load(open(sys.argv[1]))["results"]
acc = np.array([float(x["accuracy"]) for x in r])
t = [x.get("teacher_accuracy") for x in r]
b = [x.get("accuracy_before_finetune") for x in r]
print(f"{sys.argv[2]:<16} {100*acc.mean():6.2f} +- {100*acc.std():4.2f}  seeds {[round(100*a,1) for a in acc]}"
      f"  teacher {[t and round(100*t,1) for t in t]}  before_ft {[v and round(100*v,1) for v in b]}  [{sys.argv[3]}]")
PY
}
# mpl_weight 1 is the preset itself: session 3's "uf6" row, 98.15 +- 0.75 (sweep_k5_s3_summary.txt).
run mplw0           uda_mpl --set uda_mpl:mpl_weight=0
run mplw3           uda_mpl --set uda_mpl:mpl_weight=3
run mplw10          uda_mpl --set uda_mpl:mpl_weight=10
