#!/usr/bin/env bash
# The GPU check of issue 14 in one command: under 8 minutes on one H100 or H200.
#
# Assumes (nothing else; no network, nothing is downloaded):
#   * a fresh checkout of distllm, this script run from anywhere inside or outside it;
#   * a Python ($PYTHON, default `python`, else `python3`) with a CUDA build of torch (>= 2.6 for
#     FlexAttention and torch.compile on this GPU) installed FIRST, then `pip install -e '.[dev]'`
#     run in the checkout (distllm, transformers, accelerate, deepspeed; pytest for the gpu tests);
#   * one visible CUDA GPU, and a few GB free under $GPU_CHECK_DIR (default: a new `mktemp -d`).
#
#   bash benchmarks/gpu_check.sh                    # the check
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # every part tiny, on CPU, fp32, no compile (smoke test)
#
# Parts, each time-boxed with `timeout` (the limits add up to 470 s at worst); a part that fails or
# runs out of time is reported and the others still run; a summary table ends the output, and the
# exit status is 0 only if every part was ok (each part's full log stays in $GPU_CHECK_DIR):
#   llama-1b      training throughput at seq 2048, bf16, compiled blocks: tokens/s, MFU, peak memory,
#                 compile time; Hugging Face LlamaForCausalLM (sdpa, compiled) of the same shape in the
#                 same run (targets: MFU >= 50%, >= 1.2x Hugging Face's tokens/s)
#   gpt2-124m     the same
#   then, side by side (small loads on the GPU):
#   gpu-tests     pytest -m gpu (fused loss, FlexAttention, kernels, bf16 training and its matmul dtypes)
#   synth-data    random tokens and a tiny tokenizer, for `distllm train`
#   train-ddp     `distllm train` one step, DDP world size 1 (torchrun), bf16, compile, document mask
#   train-zero3   `distllm train` one step, DeepSpeed ZeRO-3 (torchrun, 1 process), bf16, compile,
#                 document mask (both one-step runs at once)
#   export        `distllm export` of train-ddp's checkpoint: logits against transformers on the GPU
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
command -v "$PY" > /dev/null 2>&1 || PY=python3
OUT="${GPU_CHECK_DIR:-$(mktemp -d -t distllm-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
export DISTLLM_CACHE_DIR="$OUT/cache"
TINY="${GPU_CHECK_TINY:-0}"
PARTS="$OUT/parts.tsv"
: > "$PARTS"

if [ "$TINY" = 1 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    TESTS=(tests/model/test_fused_loss.py)
    THROUGHPUT=(--tiny)
    DATA_TOKENS=200000
    TRAIN_CONFIG=configs/debug.yaml
    TRAIN=(--train.device=cpu --train.precision=fp32 --train.compile=false --data.seq_len=64 --model.max_seq_len=64
           --model.n_layers=2 --model.d_model=64 --model.n_heads=4 --model.n_kv_heads=2 --model.vocab_size=512
           --tokenizer.vocab_size=512)
    DEVICE=cpu
else
    TESTS=(tests)
    THROUGHPUT=(--seq 2048 --micro-batch 8 --device cuda --dtype bf16)
    DATA_TOKENS=2000000
    TRAIN_CONFIG=configs/gpt2-124m.yaml
    TRAIN=(--train.device=cuda --train.precision=bf16 --train.compile=true --data.seq_len=1024)
    DEVICE=cuda
fi
TRAIN+=(--data.dir="$OUT/data" --data.document_mask=true --train.max_steps=1 --optim.warmup_steps=0 --train.micro_batch_size=4
        --train.global_batch_size=4 --train.eval_batches=1 --checkpoint.every_minutes=0
        --logging.progress=false --logging.tensorboard=false --logging.log_every=1)

echo "distllm GPU check: $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo 'not a git checkout') | logs in $OUT"
"$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' || true

# run_part NAME LIMIT_SECONDS COMMAND...: run it time-boxed, log to $OUT/NAME.log, record the outcome
run_part() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT/$name.log" start=$SECONDS rc status
    echo
    echo "=== $name (at most ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED(exit $rc)" ;;
    esac
    [ $rc -ne 0 ] && grep -i -m 3 -e 'error' "$log"  # the cause, usually above the traceback's tail
    grep -v -e '^\s*$' "$log" | tail -n 12
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$log" >> "$PARTS"
    echo "--- $name: $status in $((SECONDS - start)) s"
}

# 1. throughput, with the GPU to itself: the figures that matter most come first
run_part llama-1b 170 "$PY" benchmarks/bench_gpu.py throughput --preset configs/llama-1b.yaml "${THROUGHPUT[@]}"
run_part gpt2-124m 110 "$PY" benchmarks/bench_gpu.py throughput --preset configs/gpt2-124m.yaml "${THROUGHPUT[@]}"

# 2. correctness, side by side (small GPU loads): the gpu tests, and data -> two one-step runs -> export
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m distllm train "$TRAIN_CONFIG")
train_and_export() {
    run_part synth-data 30 "$PY" benchmarks/bench_gpu.py synth-data "$OUT/data" --tokens "$DATA_TOKENS"
    run_part train-ddp 100 "${TORCHRUN[@]}" "${TRAIN[@]}" --run.dir="$OUT/run-ddp" &
    run_part train-zero3 100 "${TORCHRUN[@]}" "${TRAIN[@]}" --run.dir="$OUT/run-zero3" --distributed.zero_stage=3 &
    wait
    run_part export 60 "$PY" benchmarks/bench_gpu.py export-parity "$OUT/run-ddp" "$OUT/export" --device "$DEVICE"
}
train_and_export &
run_part gpu-tests 190 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}"
wait

echo
"$PY" benchmarks/bench_gpu.py summary "$PARTS"
