#!/usr/bin/env bash
# Everything the open issues ask of a GPU, in one command (a device call is limited to 10 minutes,
# and a session gets 30 minutes of device time: few, full calls). Run from the repository root on
# the GPU machine; results land in $OUT (the device tool brings them back) or in the folder given:
#
#   bash benchmarks/gpu_session.sh [RESULTS_DIR]          # default: $OUT, else benchmarks/results/gpu
#
# metapl needs nothing beyond torch, numpy, scikit-learn, matplotlib, tqdm, scipy, pillow and
# tensorboard there (no kornia, no torchvision); it runs from src/ without `pip install`.
#   1. issue 2: the exact-gradient oracle tests in float64 on CUDA (METAPL_TEST_DEVICE=cuda)
#   2. issue 5: `metapl bench` in bf16 and fp32 (WRN-28-2, labeled 128 / unlabeled 896), with the
#      numerics check against a float64 CPU reference
#   3. issue 3 item 10: 300 real UDA+MPL training steps at Table 3's batch sizes (steps/s, memory)
#   then benchmarks/goals.py: issue 5's bars against the bench files, met or not
#   4. issue 5 item 4: torchrun on the GPU, one process, 20 digits UDA+MPL steps (with one process
#      no process group forms: NCCL itself needs a machine with 2 or more GPUs)
#
# SMOKE=1 checks the script itself on a CPU in a few minutes (tiny batches, few steps);
# its numbers mean nothing.
set -uo pipefail
results=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$results"
dev=cuda bench_size=() train_size=() steps=300 gpu=h200
if [ "${SMOKE:-0}" = 1 ]; then
  dev=cpu bench_size=(--batch-size 2 --repeats 2 --model small_cnn) steps=2 gpu=smoke
  train_size=(--set batch_size=2 --set model=small_cnn)
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
# At most 8 files come back from a device call: one log (session.log) and the JSON results.
step() {  # NAME COMMAND...: run, append to session.log, remember a failure, go on
  local name=$1; shift
  echo "== $name: $*" | tee -a "$results/session.log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$results/session.log" || status=1
  echo "== $name: $((SECONDS - t0)) s" | tee -a "$results/session.log"
}

if [ "$dev" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$results/session.log"
fi
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' |
  tee -a "$results/session.log"

step oracle env METAPL_TEST_DEVICE=$dev python3 -m pytest -q -p no:cacheprovider \
  tests/test_exact_gradient.py tests/test_double_backward_step.py
for precision in bf16 fp32; do
  step "bench_$precision" python3 -m metapl bench --device $dev --precision $precision \
    "${bench_size[@]}" --json "$results/bench_${gpu}_$precision.json"
done
step train_throughput python3 benchmarks/train_throughput.py --device $dev --precision bf16 \
  --steps $steps --warmup $((steps < 20 ? 1 : 20)) --json "$results/train_throughput_${gpu}_bf16.json" \
  "${train_size[@]}"
step goals python3 benchmarks/goals.py "$results"  # issue 5's bars, met or not, into session.log
rm -rf /tmp/metapl_torchrun_run  # a fresh run, not a resumed one
step torchrun python3 -m torch.distributed.run --nproc_per_node 1 -m metapl train \
  --preset digits-uda-mpl --device $dev --steps 20 --set warmup_steps=5 --set eval_every=10 \
  --out /tmp/metapl_torchrun_run \
  --quiet
exit $status
