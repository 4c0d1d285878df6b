#!/usr/bin/env bash
# Chat with InternVL3 on an image, several images, a video or text, from an inference JSON.
#
#   bash examples/internvl3/inference_internvl.sh                  # InternVL3-8B: examples/internvl3/inference_8B.json
#   bash examples/internvl3/inference_internvl.sh tiny             # a tiny random model on CPU, nothing downloaded
#   bash examples/internvl3/inference_internvl.sh reference        # the reference launcher's command line as written
#       (its Megatron flags, torchrun, tee) with the reference's inference_8B.json (examples/internvl3/reference/),
#       only paths and model sizes changed to the tiny model's: a single TP1 x PP1 rank file, device "npu", bf16
#
# The 8B run reads `from_pretrained` (an mm-convert output or a training save, any TP/PP layout) and starts
# as many processes as that layout has (TP x PP), e.g. after
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-8B --cfg.hf_config.hf_dir /models/InternVL3-8B \
#     --cfg.parallel_config.llm_pp_layers [[28]] --cfg.parallel_config.vit_pp_layers [[24]] --cfg.parallel_config.tp_size 1
# NPROC (default: read from the checkpoint) and MM_MODEL (the JSON) override; OUT_DIR and MAX_NEW_TOKENS for
# `reference` (default out/tiny_reference, 16). Results: `output_path` (JSONL).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "${1:-}" = tiny ]; then
  OUT=out/tiny_infer
  MM_MODEL=${MM_MODEL:-examples/internvl3/inference_tiny.json}
  TP=${TP:-1}
  if [ ! -f "$OUT/hf/config.json" ]; then "$PY" -m mindspeed_mm.testing.tiny_run "$OUT"; fi
  rm -rf "$OUT/mm"
  "$PY" -m mindspeed_mm.cli.mm_convert InternVLConverter hf_to_mm --cfg.mm_dir "$OUT/mm" --cfg.hf_config.hf_dir "$OUT/hf" \
    --cfg.parallel_config.llm_pp_layers [[2]] --cfg.parallel_config.vit_pp_layers [[2]] --cfg.parallel_config.tp_size "$TP"
  # two images, a video and a text-only question, batched with the JSON's own two image prompts
  cat > "$OUT/requests.jsonl" <<JSONL
{"prompt": "What colours are the two pictures?", "infer_data_type": "image", "file_path": ["$OUT/data/images/red_1.jpg", "$OUT/data/images/blue_0.png"]}
{"prompt": "What colour is the video?", "infer_data_type": "video", "file_path": "$OUT/data/videos/green.mp4"}
{"prompt": "What colour is the sky?", "infer_data_type": "text", "max_new_tokens": 8}
JSONL
elif [ "${1:-}" = reference ]; then
  OUT=${OUT_DIR:-out/tiny_reference}
  "$PY" -m mindspeed_mm.testing.tiny_run "$OUT" --preset vit300m \
    --reference-inference examples/internvl3/reference/inference_8B.json --max-new-tokens "${MAX_NEW_TOKENS:-16}"
  rm -rf "$OUT/mm"
  "$PY" -m mindspeed_mm.cli.mm_convert InternVLConverter hf_to_mm --cfg.mm_dir "$OUT/mm" --cfg.hf_config.hf_dir "$OUT/hf" \
    --cfg.parallel_config.llm_pp_layers [[2]] --cfg.parallel_config.vit_pp_layers [[2]] --cfg.parallel_config.tp_size 1
  VOCAB=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['text_decoder']['vocab_size'])" "$OUT/inference_reference.json")
  # The reference's command, with its paths (the JSON, the log) and --vocab-size changed.
  "$PY" -m torch.distributed.run --nproc_per_node 1 inference_vlm.py --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 --context-parallel-size 1 --micro-batch-size 1 --global-batch-size 1 \
    --seq-length 4096 --tokenizer-type NullTokenizer --vocab-size "$VOCAB" --position-embedding-type rope \
    --rotary-base 1000000 --swiglu --no-masked-softmax-fusion --use-distributed-optimizer --bf16 --use-flash-attn \
    --mm-model "$OUT/inference_reference.json" --log-interval 1 --save-interval 5000 --eval-interval 5000 \
    --eval-iters 5000 --distributed-backend nccl | tee "$OUT/inference_x.log" 2>&1
  exit 0
else
  MM_MODEL=${MM_MODEL:-examples/internvl3/inference_8B.json}
fi

# The layout is the checkpoint's: TP x PP processes (the run checks it and says so if they differ).
NPROC=${NPROC:-$("$PY" inference_vlm.py --mm-model "$MM_MODEL" --print-nproc)}
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" inference_vlm.py --mm-model "$MM_MODEL"
