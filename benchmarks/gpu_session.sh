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
#   4. issue 5 item 4: torchrun with NCCL, one process (the only GPU), a few steps of training
set -uo pipefail
results=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$results"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # NAME COMMAND...: run, log to $results/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$results/$name.log" || status=1
  echo "== $name: $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

step oracle_cuda env METAPL_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider \
  tests/test_exact_gradient.py tests/test_double_backward_step.py
step bench_bf16 python3 -m metapl bench --device cuda --precision bf16 \
  --json "$results/bench_h200_bf16.json"
step bench_fp32 python3 -m metapl bench --device cuda --precision fp32 \
  --json "$results/bench_h200_fp32.json"
step train_throughput python3 benchmarks/train_throughput.py --device cuda --precision bf16 \
  --steps 300 --json "$results/train_throughput_h200_bf16.json"
step torchrun_nccl python3 -m torch.distributed.run --nproc_per_node 1 -m metapl train \
  --preset digits-uda-mpl --device cuda --steps 20 --set eval_every=10 --out /tmp/torchrun_nccl --quiet
exit $status
