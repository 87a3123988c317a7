# The run() of the digits tuning sweeps (sourced by sweep_k5_s*.sh; needs $root): one setting on
# the tuning seeds 100-104, skipped if its results exist, one summary line -> $root/summary.txt.
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
print(f"{sys.argv[2]:<16} {100*acc.mean():6.2f} +- {100*acc.std():4.2f}  seeds {[round(100*float(a),1) for a in acc]}"
      f"  teacher {[t and round(100*t,1) for t in t]}  before_ft {[v and round(100*v,1) for v in b]}  [{sys.argv[3]}]")
PY
}
