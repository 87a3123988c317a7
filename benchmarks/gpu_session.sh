#!/usr/bin/env bash
# Everything the open issues ask of a GPU, in one command. A session is lent 15 minutes of device
# time in all (the machine's start, 1-2 minutes, included) and one command may run 10 minutes, so
# this is ONE call: every step has its own time limit (the sum is 1,140 s, over one call's 600: a
# session leaves out with SKIP what it does not need; the steps usually take about 60% of their
# limits) and the steps run in the order of what matters most, so a step that hangs or
# fails costs its own limit and nothing after it, and a call given less time (the device tool's
# timeout_s) loses the last steps first: what they wrote before is kept. Run from the repository root on the GPU machine; results land in
# $OUT (the device tool brings them back) or in the folder given:
#
#   bash benchmarks/gpu_session.sh [RESULTS_DIR]          # default: $OUT, else benchmarks/results/gpu
#
# metapl needs nothing beyond torch, numpy, scikit-learn, matplotlib, tqdm, scipy, pillow and
# tensorboard there (all in the H200 image; no kornia, no torchvision); it runs from src/ without
# `pip install`. The device has torch 2.11, this project is developed on 2.13: the preflight shows
# within seconds whether every kind of step runs there at all.
#   0. preflight: `metapl bench` on a small conv net in bf16 on CUDA (all kinds of step, tape included)
#   1. issue 5: `metapl bench` in bf16 (WRN-28-2, labeled 128 / unlabeled 896), with the numerics
#      check against a float64 CPU reference: the headline goals
#   2. issue 2: the exact-gradient oracle tests in float64 on CUDA (METAPL_TEST_DEVICE=cuda), and
#      GlobalBatchNorm (sync_batchnorm) on CUDA tensors: 2 gloo processes sharing the one GPU;
#      multi-tensor inputs, and the optimizer and input checks (capturable=True on CUDA included);
#      steady training steps on CUDA under torch's sync debug mode (no synchronizing call), and
#      the batch's copies to the GPU from pinned memory
#   3. issue 3 item 10: 300 real UDA+MPL training steps at Table 3's batch sizes (steps/s, memory),
#      then again with the exact step's labeled pass in a CUDA graph (mpl_labeled_cuda_graph)
#   4. issue 5 item 4: torchrun on the GPU, one process, 20 digits UDA+MPL steps (with one process
#      no process group forms: NCCL itself needs a machine with 2 or more GPUs)
#   5. issue 5: benchmarks/profile_step.py: where the first-order and exact steps' time and memory
#      go (per phase, top kernels, the engine's step with and without the batch made ahead, what
#      holds device memory between steps), and the exact step again with BatchNorm's tangent
#      computing its statistics again (what reading the update pass's saves)
#   6. benchmarks/bn_kernels.py: BatchNorm's kernels at WRN-28-2's shapes, by memory format and
#      dtype (session 36 found them half the exact step's device time)
#   6b. issue 5: `metapl bench` in bf16 with --set compile=true (the teacher and the exact step's
#      update pass on the tangent tape compiled)
#   7. benchmarks/goals.py: issue 5's bars against the bench and train_throughput files, met or not
#   8. issue 5: `metapl bench` in fp32 (TF32 policy, numerics)
#   9. issue 5's torch.compile and CUDA-graph levers: step 3 again, 100 steps, with --set
#      compile=true in torch.compile's reduce-overhead mode (CUDA graphs; the teacher compiled,
#      the exact step's student cannot be) and the labeled pass in a CUDA graph; the first 10
#      steps, compiling, are not timed
#  10. both CUDA-graph levers in a whole `metapl train` (digits UDA+MPL, 20 steps with evaluations
#      and checkpoints, then resumed to 30)
#
# SKIP="NAME ..." leaves those steps out (a session with less device time left).
#
# SMOKE=1 checks the script itself on a CPU in a few minutes (tiny batches, few steps);
# its numbers mean nothing.
set -uo pipefail
results=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$results"
dev=cuda bench_size=() train_size=() profile_size=() steps=300 gpu=h200
preflight=(--precision bf16 --batch-size 8)
graph=(--set mpl_labeled_cuda_graph=true)  # CUDA graphs: left out of the CPU smoke run
if [ "${SMOKE:-0}" = 1 ]; then
  dev=cpu bench_size=(--batch-size 2 --repeats 2 --model small_cnn) steps=2 gpu=smoke
  train_size=(--set batch_size=2 --set model=small_cnn)
  profile_size=(--precision fp32 --batch-size 2 --model small_cnn --repeats 2)
  # a CPU without bf16 instructions emulates bf16 (4 min for this step in session 19, where the
  # bf16 bench below still runs bf16 at batch 2 in its longer limit)
  preflight=(--precision fp32 --batch-size 2)
  graph=()
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
# At most 8 files come back from a device call: one log (session.log) and the JSON results (and
# the profile step's tables); a call that runs every step writes more: leave some out with SKIP.
step() {  # NAME SECONDS COMMAND...: run under a time limit, append to session.log, go on
  local name=$1 limit=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)" | tee -a "$results/session.log"; return;; esac
  echo "== $name (limit ${limit} s): $*" | tee -a "$results/session.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$results/session.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=1
  [ "$rc" = 124 ] && echo "== $name: stopped at its limit" | tee -a "$results/session.log"
  echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$results/session.log"
}

if [ "$dev" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$results/session.log"
fi
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' |
  tee -a "$results/session.log"

step preflight 40 python3 -m metapl bench --quiet --device $dev "${preflight[@]}" --model small_cnn \
  --repeats 2 --json /tmp/metapl_preflight.json
step bench_bf16 120 python3 -m metapl bench --quiet --device $dev --precision bf16 \
  "${bench_size[@]}" --json "$results/bench_${gpu}_bf16.json"
step oracle 100 env METAPL_TEST_DEVICE=$dev python3 -m pytest -q -p no:cacheprovider \
  tests/test_exact_gradient.py tests/test_double_backward_step.py tests/test_sync_batchnorm.py \
  tests/test_multi_input.py tests/test_step_late_errors.py tests/test_attention_student.py \
  tests/test_host_syncs.py tests/test_transfer.py tests/test_batches_ahead.py \
  tests/test_labeled_graph.py tests/test_packed_signs.py tests/test_augment_grid.py
step train_throughput 90 python3 benchmarks/train_throughput.py --device $dev --precision bf16 \
  --steps $steps --warmup $((steps < 20 ? 1 : 20)) --json "$results/train_throughput_${gpu}_bf16.json" \
  "${train_size[@]}"
step train_throughput_graph 60 python3 benchmarks/train_throughput.py --device $dev \
  --precision bf16 --steps $steps --warmup $((steps < 20 ? 1 : 20)) \
  --json "$results/train_throughput_${gpu}_bf16_labeled_graph.json" "${train_size[@]}" "${graph[@]}"
rm -rf /tmp/metapl_torchrun_run  # a fresh run, not a resumed one
step torchrun 40 python3 -m torch.distributed.run --nproc_per_node 1 -m metapl train \
  --preset digits-uda-mpl --device $dev --steps 20 --set warmup_steps=5 --set eval_every=10 \
  --set finetune_steps=0 --out /tmp/metapl_torchrun_run \
  --quiet
step profile 120 python3 benchmarks/profile_step.py --device $dev --precision bf16 \
  --variants recompute_bn_stats --memory-origins --out "$results" "${profile_size[@]}"
step bn_kernels 60 python3 benchmarks/bn_kernels.py --device $dev --json "$results/bn_kernels_${gpu}.json" \
  $([ "$dev" = cpu ] && echo --scale 0.01 --repeats 2)
# the same bench with every step compiled where it can be (the exact step: its teacher and its
# student's update pass on the tangent tape; session 41), before goals.py reads the folder. With
# it the limits before goals sum to 870 s, over one call's 600: a full run needs SKIP
step bench_compile 240 python3 -m metapl bench --quiet --device $dev --precision bf16 \
  "${bench_size[@]}" --set compile=true --json "$results/bench_${gpu}_bf16_compile.json"
step goals 10 python3 benchmarks/goals.py "$results"  # issue 5's bars, met or not, into session.log
step bench_fp32 90 python3 -m metapl bench --quiet --device $dev --precision fp32 \
  "${bench_size[@]}" --json "$results/bench_${gpu}_fp32.json"
step train_throughput_compile 80 python3 benchmarks/train_throughput.py --device $dev \
  --precision bf16 --steps $((steps < 20 ? steps : 100)) --warmup $((steps < 20 ? 1 : 10)) \
  --json "$results/train_throughput_${gpu}_bf16_compile_graph.json" "${train_size[@]}" --set compile=true \
  --set compile_mode=reduce-overhead "${graph[@]}"
# the CUDA-graph levers in a whole `metapl train`: evaluations (eval mode and back), checkpoints,
# and a resumed run (its models loaded in place, where the graphs read them)
rm -rf /tmp/metapl_graph_run
graph_sets=("${graph[@]}" --set compile=true --set compile_mode=reduce-overhead
  --set warmup_steps=5 --set eval_every=10 --set finetune_steps=0)
step train_graph 90 bash -c 'python3 -m metapl train --preset digits-uda-mpl --device "$0" \
  --steps 20 --out /tmp/metapl_graph_run --quiet "${@}" && python3 -m metapl train \
  --preset digits-uda-mpl --device "$0" --steps 30 --out /tmp/metapl_graph_run --quiet "${@}"' \
  $dev "${graph_sets[@]}"
exit $status
