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
sweep labels reduced_mpl --set reduced_mpl:student_labeled_weight=1
sweep labels_ft reduced_mpl --set reduced_mpl:student_labeled_weight=1 --set reduced_mpl:finetune_steps=300
