#!/usr/bin/env bash
# GPU tests and benchmarks as a table of named stages (STAGES below: one line per stage).
#
#   bash benchmarks/gpu_suite.sh list                  # every stage: name, GPUs, time limit, what it measures
#   bash benchmarks/gpu_suite.sh show NAME             # a stage's command
#   bash benchmarks/gpu_suite.sh NAME [NAME ...]       # run these stages, one after another
#
# Each stage runs under its time limit, and every stage ends before DEADLINE seconds after the start
# (default 560), so the results are always packed: logs and JSON land in $OUT/res (default /tmp/out/res),
# packed into $OUT/results.tgz, with the tail of every log in $OUT/suite.log.  Wheels for what the GPU image
# lacks (flax, optax, orbax, grain, fla...) travel in .whl/ and are installed before the first stage.
# Model configs use the one flag spelling of the recipes: --config=NAME --config.section.key=value.
# MPS=1 runs the stages under CUDA's Multi-Process Service, for stages whose processes share the GPU.
set -u

# name | GPUs | limit (s) | what it measures | command ($R is the results folder)
STAGES=$(cat <<'EOF'
gpu_tests | 0 | 300 | every test marked gpu (kernels against their references, model parity on the GPU), six workers compiling in parallel (~190 s on an H200) | XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -m gpu tests -q -rA -n 6 --durations=8
gpu_tests_kernels | 0 | 110 | the tests marked gpu of the Pallas kernels only (every lightning kernel compiled, against its reference), four workers | XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -m gpu tests/pallas_kernels -q -rA -n 4
train_step_hybrid | 0 | 100 | hybrid_1b's train step at 8k tokens (4 x 8192), time, MFU and memory | python3 -m benchmarks.train_step --config=hybrid_1b --seq 8192 --tokens_per_step 32768 --steps 4 --warmup 1 --out $R/train_step_hybrid.json
train_step | 0 | 240 | train-step time, tokens/s, MFU and step memory of the 1B presets at 2k, 8k and 32k tokens | python3 -m benchmarks.train_step --config=hybrid_1b,lightning_1b,softmax_1b --seq 8192,2048,32768 --tokens_per_step 32768 --steps 4 --warmup 1 --out $R/train_step.json
train_step_moe | 0 | 90 | the MoE 1B preset's train step at 8k tokens (its default: capacity 1.25) | python3 -m benchmarks.train_step --config=hybrid_moe_1b --seq 8192 --tokens_per_step 16384 --steps 4 --warmup 1 --out $R/train_step_moe.json
moe_impls | 0 | 300 | the MoE 1B train step at 2k tokens per expert implementation: capacity 1.25 (the preset's default) and the dropless ones (capacity_factor=None) | python3 -m benchmarks.train_step --config=hybrid_moe_1b --seq 2048 --tokens_per_step 16384 --steps 3 --warmup 1 --out $R/moe_capacity.json; for impl in ragged ragged_mosaic ragged_tokamax; do python3 -m benchmarks.train_step --config=hybrid_moe_1b --seq 2048 --tokens_per_step 16384 --steps 3 --warmup 1 --config.model.moe_impl=$impl --config.model.capacity_factor=None --out $R/moe_$impl.json; done
moe_capacity_1 | 0 | 60 | the MoE 1B train step at capacity factor 1.0 (dropped tokens vs time) | python3 -m benchmarks.train_step --config=hybrid_moe_1b --seq 2048 --tokens_per_step 16384 --steps 4 --warmup 1 --config.model.capacity_factor=1.0 --out $R/moe_capacity_1.json
attention_packed | 0 | 200 | hybrid_1b at 8k on packed rows (4 documents a row): cuDNN's ragged layout against the Pallas flash kernel, after the attention GPU tests (cuDNN packed rows against the reference) | python3 -m pytest -q -m gpu tests/mx01/test_attention.py -rA; for impl in pallas cudnn; do python3 -m benchmarks.train_step --config=hybrid_1b --seq 8192 --tokens_per_step 32768 --steps 4 --warmup 1 --config.model.attention_impl=$impl --out $R/attention_packed_$impl.json; done
attention_segments | 0 | 240 | hybrid_1b at 8k on packed rows (4 documents a row): step memory and time of cuDNN's ragged layout at 4, 16 and 64 documents a row (model.cudnn_max_segments; its buffers are sized by it) beside the Pallas flash kernel | python3 -m benchmarks.train_step --config=hybrid_1b --seq 8192 --tokens_per_step 32768 --steps 4 --warmup 1 --config.model.attention_impl=pallas --out $R/segments_pallas.json; for n in 4 16 64; do python3 -m benchmarks.train_step --config=hybrid_1b --seq 8192 --tokens_per_step 32768 --steps 4 --warmup 1 --config.model.attention_impl=cudnn --config.model.cudnn_max_segments=$n --out $R/segments_cudnn_$n.json; done
attention_unpacked | 0 | 120 | hybrid_1b at 8k with one document per row: Pallas flash attention vs cuDNN | for impl in pallas cudnn; do python3 -m benchmarks.train_step --config=hybrid_1b --seq 8192 --tokens_per_step 32768 --steps 4 --warmup 1 --docs_per_row 1 --config.model.attention_impl=$impl --out $R/attention_unpacked_$impl.json; done
long_128k | 0 | 200 | the 1B presets at 128k tokens (batch 1, every layer rematerialised, chunked LM head and loss) | python3 -m benchmarks.train_step --config=lightning_1b,hybrid_1b,softmax_1b --seq 131072 --tokens_per_step 1 --steps 2 --warmup 1 --config.model.remat=full --config.model.loss_chunk_size=16384 --out $R/long_128k.json
long_128k_hybrid | 0 | 200 | hybrid_1b at 128k tokens (batch 1, 4 documents, chunked loss) with cuDNN packed attention sized for the 4 documents (its buffers grow with model.cudnn_max_segments x the row length): every layer rematerialised, then only the matmul outputs kept (save_dots) | for remat in full save_dots; do python3 -m benchmarks.train_step --config=hybrid_1b --seq 131072 --tokens_per_step 1 --steps 2 --warmup 1 --config.model.remat=$remat --config.model.loss_chunk_size=16384 --config.model.attention_impl=cudnn --config.model.cudnn_max_segments=4 --out $R/long_128k_hybrid_$remat.json; done
moe_32k | 0 | 90 | the MoE 1B preset at 32k tokens (remat, chunked loss) | python3 -m benchmarks.train_step --config=hybrid_moe_1b --seq 32768 --tokens_per_step 1 --steps 3 --warmup 1 --config.model.remat=full --config.model.loss_chunk_size=16384 --out $R/moe_32k.json
lightning_1m | 0 | 120 | lightning_100m at 256k and 1M tokens in one step (remat, chunked loss) | python3 -m benchmarks.train_step --config=lightning_100m --seq 262144,1048576 --tokens_per_step 1 --steps 2 --warmup 1 --config.model.remat=full --config.model.loss_chunk_size=16384 --out $R/lightning_1m.json
profile | 0 | 150 | where hybrid_1b's step time goes at 8k, by kernel category (profiler trace; no command buffers, so every kernel names its HLO op) | XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m benchmarks.profile_step --config=hybrid_1b --seq 8192 --batch 4 --top 40 --out $R/profile.json
profile_moe | 0 | 150 | where hybrid_moe_1b's step time goes at 8k (capacity 1.25, its default), by kernel category | XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m benchmarks.profile_step --config=hybrid_moe_1b --seq 8192 --batch 2 --top 40 --out $R/profile_moe.json
train_presets | 0 | 200 | tokens/s and MFU of the 100m presets through the whole pretraining recipe (data, metrics, checkpoint) | python3 benchmarks/train_presets.py --config=softmax_100m,lightning_100m,hybrid_100m,hybrid_moe_100m --steps 30 --out $R/train_presets.json
decode | 0 | 150 | prefill and decode tokens/s, bf16 vs W8A16, 8 layers of MiniMax-Text-01's shape | python3 benchmarks/decode.py --out $R/decode.json
latency | 0 | 300 | per-layer prefill latency split of the paper's shape by context length (lightning core, softmax core, rest) | python3 benchmarks/long_context_latency.py --out $R/latency.json
lightning_kernels | 0 | 300 | lightning attention forward and forward+backward: Pallas vs XLA vs flash-linear-attention vs cuDNN softmax | python3 -m benchmarks.lightning_attention --quick --out $R/lightning_kernels.json
lightning_rows_plain | 0 | 560 | lightning attention at the issue rows, plain (8 shapes; fwd and fwd+bwd): ours beside flash-linear-attention in the same run, floor ratios; fla gets 400 s (its backward autotunes for minutes on a fresh machine; set TRITON_CACHE_DIR to a kept folder to reuse the tuning) | python3 -m benchmarks.lightning_attention --rows issue --variants plain --fla_budget_s 400 --out $R/lightning_rows_plain.json
lightning_rows_packed | 0 | 560 | lightning attention at the issue rows, packed (8 shapes; fwd and fwd+bwd): ours beside flash-linear-attention in the same run, floor ratios; fla gets 400 s (its backward autotunes for minutes on a fresh machine; set TRITON_CACHE_DIR to a kept folder to reuse the tuning) | python3 -m benchmarks.lightning_attention --rows issue --variants packed --fla_budget_s 400 --out $R/lightning_rows_packed.json
lightning_rows_ragged | 0 | 560 | lightning attention at the issue rows, ragged (8 shapes; fwd and fwd+bwd): ours beside flash-linear-attention in the same run, floor ratios; fla gets 400 s (its backward autotunes for minutes on a fresh machine; set TRITON_CACHE_DIR to a kept folder to reuse the tuning) | python3 -m benchmarks.lightning_attention --rows issue --variants ragged --fla_budget_s 400 --out $R/lightning_rows_ragged.json
lightning_tune | 0 | 560 | the per-shape sweep of the lightning kernels' tiles and launch settings at the plain issue rows, row by row (forward settings, split counts, backward settings; ours only) | python3 -m benchmarks.lightning_attention --rows issue --variants plain --tune --out $R/lightning_tune.json
lightning_two_per_sm | 0 | 240 | lightning attention at the plain issue rows, forward and forward+backward, ours only: the defaults (one program per SM: 8 warps, 161-209 KiB of shared memory) against tiles that fit two programs per SM (value tiles 64, 4 warps, 2 stages; the backward as separate dK and dV sweeps of 64-wide tiles: kernel_resources reads 80-96 KiB of shared memory and at most 412 bytes of spills a thread) | python3 -m benchmarks.lightning_attention --rows issue --variants plain --passes fwd,fwd_bwd --skip-fla --settings default block_v=64,num_warps=4,num_stages=2,bwd_block_k=64,bwd_block_v=64,bwd_num_warps=4,bwd_num_stages=2,bwd_split_dkdv=true --out $R/lightning_two_per_sm.json
lightning_profile | 0 | 90 | the lightning kernels kernel by kernel (profiler trace), plain rows against packed ones, forward+backward | python3 -m benchmarks.lightning_profile --rows 16x8192x16,16x8192x64,1x131072x16 --out $R/lightning_profile.json
lightning_rows_fb | 0 | 120 | lightning attention forward+backward at the issue rows, plain and packed, ours only (the forward kernel timed too) | python3 -m benchmarks.lightning_attention --rows issue --variants plain,packed --passes fwd_bwd --skip-fla --out $R/lightning_rows_fb.json
lightning_split_dkdv | 0 | 200 | lightning attention forward+backward at the issue rows, plain and packed, ours only: one dK/dV sweep (the default) against separate dK and dV sweeps (bwd_split_dkdv) | python3 -m benchmarks.lightning_attention --rows issue --variants plain,packed --passes fwd_bwd --skip-fla --settings default bwd_split_dkdv=true --out $R/lightning_split_dkdv.json
lightning_rows_ours | 0 | 200 | lightning attention at the issue rows, plain, packed and ragged (fwd and fwd+bwd), ours only: packed against plain | python3 -m benchmarks.lightning_attention --rows issue --variants plain,packed,ragged --skip-fla --out $R/lightning_rows_ours.json
moe_mosaic | 0 | 200 | dropless MoE on jax's Mosaic GPU grouped matmuls: their GPU tests, then the hybrid_moe_1b train step at 8k (lowering and compile times printed) | python3 -m pytest -q tests/mx01/test_grouped_matmul_gpu.py -k mosaic -rA; python3 -m benchmarks.train_step --config=hybrid_moe_1b --seq 8192 --tokens_per_step 16384 --steps 3 --warmup 1 --config.model.moe_impl=ragged_mosaic --config.model.capacity_factor=None --out $R/moe_mosaic.json
flash_tiles | 0 | 60 | Pallas flash-attention block sizes | python3 -m benchmarks.flash_attention_tiles --out $R/flash_tiles.json
moe_experts | 0 | 45 | the expert matmuls alone at the paper's shape, per implementation | python3 -m benchmarks.moe_experts --shape paper --tokens 8192 --variants balanced,ragged_mosaic,capacity_1.0,capacity_1.25 --out $R/moe_experts.json
sweep | 0 | 480 | the scaling sweep, sizes s3-s6, one process per attention kind sharing the GPU | export XLA_PYTHON_CLIENT_MEM_FRACTION=0.15; for arch in softmax lightning hybrid; do python3 -m recipes.sweep --out $R/sweep_$arch.csv --archs $arch --sizes s3,s4,s5,s6 --tokens 2e6,6e6 --config.train.batch_size=32 --config.data.seq_len=256 --run_root /tmp/sweep_$arch > $R/sweep_$arch.log 2>&1 & done; wait
isoflop | 0 | 560 | the IsoFLOP study (scaling/isoflop.py): the corpus (kept in /tmp between calls on a warm machine), then one process per kind sharing the GPU for ISO_BUDGET_S seconds (default 470), appending to a copy of results/isoflop.csv (resumable: points in it are skipped) | { [ -f /tmp/pycorpus/manifest.json ] || python3 -m scaling.corpus --out /tmp/pycorpus --min_mb 250; } > $R/corpus.log && cp results/isoflop.csv $R/isoflop.csv && for kind in softmax lightning hybrid; do XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 -m recipes.sweep --plan isoflop --corpus /tmp/pycorpus --kinds $kind --time_budget_s ${ISO_BUDGET_S:-470} --out $R/isoflop.csv --run_root /tmp/iso_$kind > $R/isoflop_$kind.log 2>&1 & done; wait
mqar_xs | 0 | 560 | the MQAR study, size xs, every length: the three kinds in parallel processes, each resuming its CSV of results/mqar (copied to $R/mqar; points already there are skipped) | mkdir -p $R/mqar && cp results/mqar/*.csv $R/mqar/ 2>/dev/null; for kind in softmax lightning hybrid; do XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 -m recipes.retrieval --kinds $kind --sizes xs --out $R/mqar/$kind-xs.csv > $R/mqar_${kind}_xs.log 2>&1 & done; wait
mqar_s_short | 0 | 560 | the MQAR study, size s, lengths 64 and 128, the three kinds in parallel (resuming, as mqar_xs) | mkdir -p $R/mqar && cp results/mqar/*.csv $R/mqar/ 2>/dev/null; for kind in softmax lightning hybrid; do XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 -m recipes.retrieval --kinds $kind --sizes s --lengths 64,128 --out $R/mqar/$kind-s.csv > $R/mqar_${kind}_s_short.log 2>&1 & done; wait
mqar_s_mid | 0 | 560 | the MQAR study, size s, lengths 256 and 512, the three kinds in parallel (resuming, as mqar_xs) | mkdir -p $R/mqar && cp results/mqar/*.csv $R/mqar/ 2>/dev/null; for kind in softmax lightning hybrid; do XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 -m recipes.retrieval --kinds $kind --sizes s --lengths 256,512 --out $R/mqar/$kind-s.csv > $R/mqar_${kind}_s_mid.log 2>&1 & done; wait
mqar_s_long | 0 | 560 | the MQAR study, size s, length 1024 and the needle test, the three kinds in parallel (resuming, as mqar_xs) | mkdir -p $R/mqar && cp results/mqar/*.csv $R/mqar/ 2>/dev/null; for kind in softmax lightning hybrid; do XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 -m recipes.retrieval --kinds $kind --sizes s --lengths 1024 --out $R/mqar/$kind-s.csv > $R/mqar_${kind}_s_long.log 2>&1 & done; wait
equivalence_1gpu | 0 | 200 | the sharded step with the GPU kernels against the plain step on one GPU (values and time) | python3 benchmarks/multi_gpu.py --steps 2 --long_budget_s 0 --out $R/multi_gpu_1gpu.json
multi_gpu | 0,1 | 300 | two GPUs: sharded-step equivalence per layout, weak scaling, the longest context with the sequence axis | python3 benchmarks/multi_gpu.py --out $R/multi_gpu.json
EOF
)

field() {  # field N LINE: the Nth |-separated field of LINE, trimmed (N=5-: the command, which may hold a |)
  local v
  v=$(cut -d'|' -f"$1" <<< "$2")
  v="${v#"${v%%[![:space:]]*}"}"
  printf '%s' "${v%"${v##*[![:space:]]}"}"
}

stage_line() {  # stage_line NAME: the table line of stage NAME (empty when there is none)
  local line
  while IFS= read -r line; do
    [ "$(field 1 "$line")" = "$1" ] && { printf '%s\n' "$line"; return; }
  done <<< "$STAGES"
}

list_stages() {
  local line
  while IFS= read -r line; do
    printf '%-20s gpus %-4s %4ss  %s\n' "$(field 1 "$line")" "$(field 2 "$line")" "$(field 3 "$line")" \
      "$(field 4 "$line")"
  done <<< "$STAGES"
}

case "${1:-}" in
  ""|-h|--help)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo
    list_stages
    exit 0
    ;;
  list)
    list_stages
    exit 0
    ;;
  show)
    line=$(stage_line "${2:-}")
    [ -n "$line" ] || { echo "unknown stage '${2:-}'; see: bash benchmarks/gpu_suite.sh list" >&2; exit 2; }
    field 5- "$line"
    echo
    exit 0
    ;;
esac

# Every name is checked before anything runs.
for name in "$@"; do
  [ -n "$(stage_line "$name")" ] || { echo "unknown stage '$name'; see: bash benchmarks/gpu_suite.sh list" >&2; exit 2; }
done

export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
export R=$OUT/res
mkdir -p "$R"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$R/pip.log" 2>&1 || { tail "$R/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
# tokamax (the opt-in moe_impl=ragged_tokamax) imports xprof's command-line tools at import time without using
# them here; where xprof is missing, an empty stand-in module lets it import.
if ! python3 -c "import xprof.cli.tools" > /dev/null 2>&1; then
  mkdir -p /tmp/shim/xprof/cli && touch /tmp/shim/xprof/__init__.py /tmp/shim/xprof/cli/__init__.py
  echo "get_kernel_stats_tool = None" > /tmp/shim/xprof/cli/tools.py
  export PYTHONPATH=/tmp/site:$PWD:/tmp/shim
fi
# Triton's compiled kernels and autotuning results (flash-linear-attention's backward tunes for minutes) in a
# folder that comes back packed in $OUT/triton_cache.tgz: unpack it to .triton_cache/ and carry it to reuse.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache} TRITON_CACHE_AUTOTUNING=1
NGPU=$(nvidia-smi -L | wc -l)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, jax.devices())"
} > "$R/env.log" 2>&1
cat "$R/env.log"

# MPS=1: CUDA's Multi-Process Service for the stages whose processes share one GPU (isoflop, mqar_*). Without
# it the GPU time-slices between processes, running one process's kernels at a time, so three small models
# that each leave most SMs idle (latency-bound steps of tiny kernels) add up to about one; under MPS their
# kernels run side by side. It changes no GPU setting (a user-space daemon; the compute mode stays as it is),
# and it is used only where the daemon exists and a jax probe under it sees the GPU.
MPS_ON=0
if [ "${MPS:-0}" = 1 ]; then
  if command -v nvidia-cuda-mps-control > /dev/null 2>&1; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d > "$R/mps.log" 2>&1
    if timeout 90 python3 -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices(); \
print(float(jax.numpy.ones(8).sum()))" >> "$R/mps.log" 2>&1; then
      MPS_ON=1
    else
      echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
  fi
  echo "MPS: $([ "$MPS_ON" = 1 ] && echo on || echo "asked for, not available (see mps.log)")" | tee -a "$R/env.log"
fi

END_AT=$(( $(date +%s) + ${DEADLINE:-560} ))
for name in "$@"; do
  line=$(stage_line "$name")
  gpus=$(field 2 "$line")
  limit=$(field 3 "$line")
  cmd=$(field 5- "$line")
  need=$(( $(tr -cd ',' <<< "$gpus" | wc -c) + 1 ))
  if [ "$need" -gt "$NGPU" ]; then echo "=== [$name] skipped: needs $need GPUs, $NGPU attached"; continue; fi
  left=$(( END_AT - $(date +%s) ))
  if [ "$left" -lt 15 ]; then echo "=== [$name] skipped: deadline"; continue; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] gpus=$gpus start $(date -u +%T): $cmd"
  # The GPU's busy fraction (share of each second a kernel ran) sampled beside the stage: below 100% there are
  # idle gaps that another process sharing the GPU could fill; at 100% the GPU time-slices between them.
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 1000 \
    > "$R/$name.gpu_busy.csv" 2> /dev/null &
  sampler=$!
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" bash -c "$cmd" > "$R/$name.log" 2>&1
  rc=$?
  kill "$sampler" 2> /dev/null
  busy=$(awk -F', *' '{s += $2; n++} END {if (n) printf "%.0f%% over %d samples", s / n, n}' "$R/$name.gpu_busy.csv")
  echo "=== [$name] rc=$rc end $(date -u +%T); GPU busy ${busy:-not sampled}"
done

[ "$MPS_ON" = 1 ] && { echo quit | nvidia-cuda-mps-control > /dev/null 2>&1; }
for f in "$R"/*.log; do echo "----- $(basename "$f") (tail)"; tail -n 30 "$f"; done > "$OUT/suite.log"
tar -czf "$OUT/results.tgz" -C "$OUT" res
[ -d "$TRITON_CACHE_DIR" ] && tar -czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" .
cat "$OUT/suite.log"
