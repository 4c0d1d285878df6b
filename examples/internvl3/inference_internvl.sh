#!/usr/bin/env bash
# Chat with InternVL3 on an image, several images, a video or text, from an inference JSON.
#
#   bash examples/internvl3/inference_internvl.sh                  # InternVL3-8B: examples/internvl3/inference_8B.json
#   bash examples/internvl3/inference_internvl.sh tiny             # a tiny random model on CPU, nothing downloaded
#
# The 8B run reads `from_pretrained` (an mm-convert output or a training save, any TP/PP layout) and starts
# as many processes as that layout has (TP x PP), e.g. after
#   mm-convert InternVLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/internvl3-8B --cfg.hf_config.hf_dir /models/InternVL3-8B \
#     --cfg.parallel_config.llm_pp_layers [[28]] --cfg.parallel_config.vit_pp_layers [[24]] --cfg.parallel_config.tp_size 1
# NPROC (default: read from the checkpoint) and MM_MODEL (the JSON) override. Results: `output_path` (JSONL).
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
else
  MM_MODEL=${MM_MODEL:-examples/internvl3/inference_8B.json}
fi

# The layout is the checkpoint's: TP x PP processes (the run checks it and says so if they differ).
NPROC=${NPROC:-$("$PY" inference_vlm.py --mm-model "$MM_MODEL" --print-nproc)}
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" inference_vlm.py --mm-model "$MM_MODEL"
