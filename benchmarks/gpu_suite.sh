#!/usr/bin/env bash
# GPU tests and benchmarks in one device call.  Each stage runs under a time limit;
# logs and JSON land in $OUT/res, packed into $OUT/results.tgz, with a summary in $OUT/suite.log.
#
#   bash benchmarks/gpu_suite.sh a     # tests, train-step throughput, recipe throughput, shard_map overhead, decode
#   bash benchmarks/gpu_suite.sh b     # long-context latency split, scaling sweep, retrieval study, 2-GPU run
#   bash benchmarks/gpu_suite.sh moe   # MoE expert kernels, MoE train step per moe_impl, step profile, 1M-token step
#   bash benchmarks/gpu_suite.sh retrieval   # step profile without command buffers, then the MQAR study
#     (RETRIEVAL_ONLY=1 skips the profile; RETRIEVAL_ARGS="--steps 10000 ..." passes options to the study)
#   bash benchmarks/gpu_suite.sh multi # grouped-matmul GPU tests, shard_map overhead, then the 2-GPU run
#   bash benchmarks/gpu_suite.sh verify   # one GPU: shard_map overhead and equivalence with the GPU kernels
#   bash benchmarks/gpu_suite.sh perf  # one GPU: dense-step levers at 8k, the train-step table with each row's
#     memory, the MoE preset at 8k, MoE capacity 1.0
#   bash benchmarks/gpu_suite.sh long  # the 1B presets at 128k and the MoE preset at 32k (remat + chunked loss);
#     THEN_RETRIEVAL=1 then runs the MQAR study (`retrieval_study` below)
#
# Wheels for what the GPU image lacks (flax, optax, orbax, grain, fla...) travel in .whl/.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
R=$OUT/res
mkdir -p "$R"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$R/pip.log" 2>&1 || { tail "$R/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
NGPU=$(nvidia-smi -L | wc -l)

# Every stage ends before DEADLINE (seconds after the start; default 560), so the results are always packed.
END_AT=$(( $(date +%s) + ${DEADLINE:-560} ))
stage() {  # stage NAME GPU LIMIT_S CMD...
  local name=$1 gpu=$2 limit=$3
  shift 3
  local left=$(( END_AT - $(date +%s) ))
  if [ "$left" -lt 15 ]; then echo "=== [$name] skipped: deadline"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] gpu=$gpu start $(date -u +%T): $*"
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" "$@" > "$R/$name.log" 2>&1
  echo "=== [$name] rc=$? end $(date -u +%T)"
}

# The MQAR study: one process per (kind, size) shares GPU 0 (tiny models leave it mostly idle).
# RETRIEVAL_ARGS passes options; RETRIEVAL_ARGS2, when set, runs a second study after the first in the
# same process slot; RETRIEVAL_SIZES picks the sizes (default "xs s").
retrieval_study() {
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
  local kind size
  for kind in softmax lightning hybrid; do
    for size in ${RETRIEVAL_SIZES:-xs s}; do
      stage "retrieval_${kind}_$size" 0 "${RETRIEVAL_LIMIT_S:-520}" bash -c "python3 -m recipes.retrieval \
        --kinds $kind --sizes $size --out $R/retrieval_${kind}_$size.csv ${RETRIEVAL_ARGS:-} && \
        { [ -z '${RETRIEVAL_ARGS2:-}' ] || python3 -m recipes.retrieval --kinds $kind --sizes $size \
        --out $R/retrieval2_${kind}_$size.csv ${RETRIEVAL_ARGS2:-}; }" &
    done
  done
  wait
  unset XLA_PYTHON_CLIENT_MEM_FRACTION
}

# Second GPU if there is one, else the first (stages then run one after the other).
G1=$(( NGPU > 1 ? 1 : 0 ))

case "${1:-a}" in
  a)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, jax.devices())"
    } > "$R/env.log" 2>&1
    cat "$R/env.log"
    (
      stage gpu_tests 0 240 python3 -m pytest -m gpu tests/pallas_kernels tests/mx01/test_attention.py \
        tests/mx01/test_model.py -q -rA --durations=8
      stage train_step 0 300 python3 -m benchmarks.train_step \
        --presets hybrid_1b,lightning_1b,softmax_1b,hybrid_moe_1b --seq 2048,8192,32768 \
        --tokens_per_step 32768 --steps 4 --warmup 1 --time_budget_s 240 --out "$R/train_step.json"
    ) &
    A=$!
    if [ "$G1" = 0 ]; then wait $A; fi
    stage train_presets "$G1" 200 python3 benchmarks/train_presets.py \
      --presets softmax_100m lightning_100m hybrid_100m hybrid_moe_100m --steps 30 --out "$R/train_presets.json"
    stage overhead "$G1" 100 python3 benchmarks/shard_map_overhead.py --out "$R/overhead.json"
    stage decode "$G1" 150 python3 benchmarks/decode.py --out "$R/decode.json"
    wait
    ;;
  b)
    stage latency 0 300 python3 benchmarks/long_context_latency.py --out "$R/latency.json" &
    A=$!
    if [ "$G1" = 0 ]; then wait $A; fi
    # Small models share the other GPU: one process per architecture, a slice of memory each.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.15
    for arch in softmax lightning hybrid; do
      stage "sweep_$arch" "$G1" 240 python3 -m recipes.sweep --out "$R/sweep_$arch.csv" --archs $arch \
        --sizes s3,s4,s5,s6 --tokens 2e6,6e6 --batch_size 32 --seq_len 256 --run_root "/tmp/sweep_$arch" &
      stage "retrieval_$arch" "$G1" 240 python3 -m recipes.retrieval --kinds $arch --lengths 128,512 \
        --steps 1000 --out "$R/retrieval_$arch.csv" &
    done
    wait
    unset XLA_PYTHON_CLIENT_MEM_FRACTION
    if [ "$NGPU" -gt 1 ] && [ -f benchmarks/multi_gpu.py ]; then
      stage multi_gpu 0,1 120 python3 benchmarks/multi_gpu.py --out "$R/multi_gpu.json"
    fi
    ;;
  moe)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/env.log" 2>&1
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$R/env.log" 2>&1
    cat "$R/env.log"
    stage gpu_tests 0 50 python3 -m pytest -m gpu tests/mx01/test_grouped_matmul_gpu.py -q -rA
    for impl in capacity ragged_mosaic; do
      stage "train_moe_$impl" 0 90 python3 -m benchmarks.train_step --presets hybrid_moe_1b --seq 2048 \
        --tokens_per_step 16384 --steps 3 --warmup 1 --override model.moe_impl=$impl \
        --override model.capacity_factor=1.25 --out "$R/train_moe_$impl.json"
    done
    stage lightning_1m 0 120 python3 -m benchmarks.train_step --presets lightning_100m --seq 262144,1048576 \
      --tokens_per_step 1 --steps 2 --warmup 1 --override model.remat=full --override model.loss_chunk_size=16384 \
      --out "$R/lightning_1m.json"
    stage profile_hybrid_1b 0 60 python3 -m benchmarks.profile_step --preset hybrid_1b --seq 8192 --batch 4 \
      --out "$R/profile_hybrid_1b.json"
    stage flash_tiles 0 60 python3 -m benchmarks.flash_attention_tiles --out "$R/flash_tiles.json"
    stage moe_experts_paper 0 45 python3 -m benchmarks.moe_experts --shape paper --tokens 8192 \
      --variants balanced,ragged_mosaic,capacity_1.0,capacity_1.25 --out "$R/moe_experts_paper.json"
    stage train_moe_ragged 0 80 python3 -m benchmarks.train_step --presets hybrid_moe_1b --seq 2048 \
      --tokens_per_step 16384 --steps 3 --warmup 1 --override model.moe_impl=ragged --out "$R/train_moe_ragged.json"
    ;;
  multi)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/env.log" 2>&1
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$R/env.log" 2>&1
    cat "$R/env.log"
    stage gpu_tests 0 150 python3 -m pytest -m gpu tests/mx01/test_grouped_matmul_gpu.py -q -rA &
    stage overhead "$G1" 150 python3 benchmarks/shard_map_overhead.py --out "$R/overhead.json"
    wait
    if [ "$NGPU" -gt 1 ]; then
      stage multi_gpu 0,1 300 python3 benchmarks/multi_gpu.py --out "$R/multi_gpu.json"
    fi
    ;;
  verify)
    # One GPU: the shard_map path with the GPU kernels against the plain step (values and time).
    stage overhead 0 150 python3 benchmarks/shard_map_overhead.py --out "$R/overhead.json"
    stage equivalence_1gpu 0 200 python3 benchmarks/multi_gpu.py --steps 2 --long_budget_s 0 \
      --out "$R/multi_gpu_1gpu.json"
    ;;
  perf)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/env.log" 2>&1
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$R/env.log" 2>&1
    cat "$R/env.log"
    T="python3 -m benchmarks.train_step --steps 4 --warmup 1"
    # The table first (its hybrid_1b 8k row is the levers' baseline), then the levers on hybrid_1b at 8k.
    stage table 0 230 $T --presets hybrid_1b,lightning_1b,softmax_1b --seq 8192,2048,32768 --tokens_per_step 32768 \
      --out "$R/table.json"
    stage lever_batch2 0 50 $T --presets hybrid_1b --seq 8192 --tokens_per_step 16384 --out "$R/lever_batch2.json"
    stage lever_1doc_pallas 0 50 $T --presets hybrid_1b --seq 8192 --tokens_per_step 32768 --docs_per_row 1 \
      --out "$R/lever_1doc_pallas.json"
    stage lever_1doc_cudnn 0 50 $T --presets hybrid_1b --seq 8192 --tokens_per_step 32768 --docs_per_row 1 \
      --override model.attention_impl=cudnn --out "$R/lever_1doc_cudnn.json"
    # 32k needs remat: the `long` stage runs it.
    stage moe_8k 0 60 $T --presets hybrid_moe_1b --seq 8192 --tokens_per_step 16384 \
      --override model.capacity_factor=1.25 --out "$R/moe_8k.json"
    stage moe_cap1 0 40 $T --presets hybrid_moe_1b --seq 2048 --tokens_per_step 16384 \
      --override model.capacity_factor=1.0 --out "$R/moe_cap1.json"
    ;;
  long)
    # The 1B presets at 128k tokens: batch 1, every layer rematerialised, LM head + loss in chunks.
    stage long_128k 0 "${LONG_LIMIT_S:-200}" python3 -m benchmarks.train_step --steps 2 --warmup 1 \
      --presets lightning_1b,hybrid_1b,softmax_1b --seq 131072 --tokens_per_step 1 --override model.remat=full \
      --override model.loss_chunk_size=16384 --out "$R/long_128k.json"
    stage moe_32k 0 90 python3 -m benchmarks.train_step --steps 3 --warmup 1 --presets hybrid_moe_1b --seq 32768 \
      --tokens_per_step 1 --override model.capacity_factor=1.25 --override model.remat=full \
      --override model.loss_chunk_size=16384 --out "$R/moe_32k.json"
    if [ -n "${THEN_RETRIEVAL:-}" ]; then retrieval_study; fi
    ;;
  retrieval)
    # First, alone on the GPU: the step profile without CUDA command buffers, so every
    # kernel names its HLO op (command buffers hide them behind one name).
    if [ -z "${RETRIEVAL_ONLY:-}" ]; then
      XLA_FLAGS=--xla_gpu_enable_command_buffer= stage profile_nocb 0 70 python3 -m benchmarks.profile_step \
        --preset hybrid_1b --seq 8192 --batch 4 --top 40 --out "$R/profile_hybrid_1b_nocb.json"
      stage gpu_tests 0 45 python3 -m pytest -m gpu tests/mx01/test_grouped_matmul_gpu.py -q -rA
    fi
    retrieval_study
    ;;
esac

for f in "$R"/*.log; do echo "----- $(basename "$f") (tail)"; tail -n 30 "$f"; done > "$OUT/suite.log"
tar -czf "$OUT/results.tgz" -C "$OUT" res
cat "$OUT/suite.log"
