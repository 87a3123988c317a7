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
sweep() {  # NAME METHODS [--set ...]
  local name=$1 methods=$2; shift 2
  if [ ! -f "$root/$name/results.json" ]; then
    metapl reduced --seeds 100-104 --methods "$methods" --out "$root/$name" --quiet "$@" \
      >"$root/$name.log" 2>&1 || { echo "$name FAILED: $(tail -n 1 "$root/$name.log")" >>"$root/summary.txt"; return; }
  fi
  python - "$root/$name/results.json" "$name" "$*" >>"$root/summary.txt" <<'PY'
import json, sys
import numpy as np
payload = json.load(open(sys.argv[1]))
for method in dict.fromkeys(r["method"] for r in payload["results"]):
    acc = np.array([r["accuracy"] for r in payload["results"] if r["method"] == method])
    print(f"{sys.argv[2]:<12} {method:<14} {100*acc.mean():6.2f} +- {100*acc.std():4.2f}  "
          f"seeds {[round(100 * float(a), 1) for a in acc]}  [{sys.argv[3]}]")
PY
}
ft=(--set noisy_student:finetune_steps=300 --set reduced_mpl:finetune_steps=300)
sweep ft_lr1e-4 noisy_student,reduced_mpl "${ft[@]}"
[ "$lr" = 1e-4 ] || sweep "ft_lr$lr" reduced_mpl "${ft[@]}" --set "reduced_mpl:teacher_lr=$lr"
