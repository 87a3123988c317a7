# Shared by the session-7 ReducedMPL sweeps (sourced; sets `sweep`). Every run starts from the
# session-5 preset (no labels for the ReducedMPL student, no fine-tuning, a pool of 80 per class),
# which the digits preset replaced with the settings these sweeps (and session 8's) chose; each
# sweep's own --set come after and win.
# Usage inside a sweep script:  root=OUTROOT; source sweep_common.sh; sweep NAME METHODS [--set ...]
SESSION5_PRESET=(--set reduced_mpl:student_labeled_weight=0 --set reduced_mpl:finetune_steps=0
  --set noisy_student:finetune_steps=0
  --set reduced_mpl:unlabeled_per_class=80 --set noisy_student:unlabeled_per_class=80)
sweep() {  # NAME METHODS [--set ...]: one `metapl reduced` on the tuning seeds, a summary line
  local name=$1 methods=$2; shift 2
  local base=()  # only the stages that train: metapl reduced refuses --set for the others
  for stage in reduced_mpl noisy_student; do
    [[ ",$methods," == *",$stage,"* ]] && for s in "${SESSION5_PRESET[@]}"; do
      [[ $s == "$stage:"* ]] && base+=(--set "$s"); done
  done
  if [ ! -f "$root/$name/results.json" ]; then
    metapl reduced --seeds 100-104 --methods "$methods" --out "$root/$name" --quiet \
      "${base[@]}" "$@" >"$root/$name.log" 2>&1 ||
      { echo "$name FAILED: $(tail -n 1 "$root/$name.log")" >>"$root/summary.txt"; return; }
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
