#!/usr/bin/env bash
# Finetune InternVL3 / InternVL3.5 on GPUs with the reference recipe's flags; the per-size wrappers
# (finetune_internvl3_<size>.sh here, ../internvl3_5/finetune_internvl3_5_<size>.sh) set the model's defaults and
# run this. FAMILY (internvl3, internvl3_5) picks the examples folder of the model and data JSONs. Every default
# below can be overridden from the environment.
# Nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or run the same command under srun / mpirun: ranks are
# read from SLURM_* / OMPI_* variables when torchrun's are absent).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-8B}
FAMILY=${FAMILY:-internvl3}

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

MM_DATA=${MM_DATA:-examples/${FAMILY}/data_${MODEL}.json}
MM_MODEL=${MM_MODEL:-examples/${FAMILY}/model_${MODEL}.json}
LOAD_PATH=${LOAD_PATH:-ckpt/mm_path/${FAMILY}-${MODEL}}
SAVE_PATH=${SAVE_PATH:-save_dir}

TP=${TP:-1}
PP=${PP:-4}
CP=${CP:-1}
MBS=${MBS:-1}
GRAD_ACC_STEP=${GRAD_ACC_STEP:-64}
DP=$((WORLD_SIZE / TP / PP / CP))
GBS=$((MBS * GRAD_ACC_STEP * DP))

DISTRIBUTED_ARGS="--nproc_per_node $NPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
  --master_addr $MASTER_ADDR --master_port $MASTER_PORT"

# --vocab-size and --rotary-base are left to the model JSON (text_decoder.vocab_size / rotary_base): given, they
# must repeat it, and they differ across the family (InternVL3-9B: 128512 and 5e7).
GPT_ARGS="
    --use-distributed-optimizer ${EXTRA_ARGS:-}
    --tensor-model-parallel-size ${TP}
    --pipeline-model-parallel-size ${PP}
    --context-parallel-size ${CP}
    --micro-batch-size ${MBS}
    --global-batch-size ${GBS}
    --tokenizer-type NullTokenizer
    --seq-length 4096
    --position-embedding-type rope
    --swiglu
    --no-masked-softmax-fusion
    --lr 2e-5
    --min-lr 0.0
    --train-iters 5000
    --lr-decay-style cosine
    --weight-decay 0.05
    --clip-grad 1.0
    --adam-beta1 0.9
    --adam-beta2 0.999
    --no-gradient-accumulation-fusion
    --no-load-optim
    --no-load-rng
    --no-save-optim
    --no-save-rng
    --use-flash-attn
    --bf16
    --load $LOAD_PATH
    --variable-seq-lengths
    --normalization RMSNorm
    --num-workers 4
"

MM_ARGS="
    --mm-data $MM_DATA
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1
    --save-interval 5000
    --eval-interval 5000
    --eval-iters 5000
    --save $SAVE_PATH
    --ckpt-format torch
    --log-tps
    --metrics-file $SAVE_PATH/metrics.jsonl
"

logfile=${FAMILY}_${MODEL}
mkdir -p logs
torchrun $DISTRIBUTED_ARGS pretrain_vlm.py $GPT_ARGS $MM_ARGS $OUTPUT_ARGS --distributed-backend nccl \
  2>&1 | tee logs/train_${logfile}.log

# ---- throughput summary: the reference scripts' own pipeline over Megatron's log line. Its window (lines
# 51-150) shrinks for short runs to every line after the first, which carries the start-up cost.
set +eo pipefail  # as the reference runs it: head closing the pipe early must not end the script
N_LINES=`grep -c "elapsed time per iteration" logs/train_${logfile}.log`
if [ "$N_LINES" -ge 150 ]; then HEAD_N=150; TAIL_N=100; elif [ "$N_LINES" -gt 1 ]; then HEAD_N=$N_LINES; TAIL_N=$((N_LINES - 1)); else HEAD_N=1; TAIL_N=1; fi
STEP_TIME=`grep "elapsed time per iteration" logs/train_${logfile}.log | awk -F ':' '{print$5}' | awk -F '|' '{print$1}' | head -n $HEAD_N | tail -n $TAIL_N | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
SAMPLES_PER_SECOND=`awk 'BEGIN{printf "%.3f\n", '${GBS}'*1000/'${STEP_TIME}'}'`
echo "Elapsed Time Per iteration: $STEP_TIME"
echo "Average Samples per Second: $SAMPLES_PER_SECOND"
LOG_TOKENS_PER_SECOND=`grep "tokens per sample" logs/train_${logfile}.log`
if [ "$LOG_TOKENS_PER_SECOND" ]; then
    AVERAGE_TOKENS=`grep "tokens per sample" logs/train_${logfile}.log | awk -F 'tokens per sample:' '{print$2}' | awk -F '|' '{print$1}' | head -n $HEAD_N | tail -n $TAIL_N | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
    TOKENS_PER_SECOND=`awk 'BEGIN{printf "%.3f\n", '${SAMPLES_PER_SECOND}'*'${AVERAGE_TOKENS}'}'`
    echo "Consumed Tokens per Second: $TOKENS_PER_SECOND"
fi
