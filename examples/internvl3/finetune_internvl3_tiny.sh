#!/usr/bin/env bash
# The tiny built-in default, on CPU with nothing downloaded (a few minutes on 2 cores):
#   1. write a tiny random InternVL3 checkpoint (transformers' native format, with a tokenizer) and a small
#      multimodal dataset (images of several shapes, several images per sample, a video, text only);
#   2. convert it with mm-convert to the MM layout (TP1);
#   3. finetune it with pretrain_vlm.py on 2 ranks at TP2 + SP with the distributed optimizer (--load reshards
#      the TP1 conversion), stopping half-way after a save (--exit-interval);
#   4. resume from that save at another layout (PP2) and train to the end;
#   5. ask the finetuned model (the PP2 save, on 2 ranks, KV-cache decoding) about pictures it was trained on;
#   6. convert the final save back to an HF checkpoint that transformers loads.
# Set OUT to choose the output directory, SKIP_INSTALL=1 to use the current environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/tiny}
ITERS=${ITERS:-40}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then bash scripts/install.sh; fi
PY=${PYTHON:-.venv/bin/python}
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning" OMP_NUM_THREADS=1  # megatron warns per missing accelerator

rm -rf "$OUT"
"$PY" -m mindspeed_mm.testing.tiny_run "$OUT"
"$PY" -m mindspeed_mm.cli.mm_convert InternVLConverter hf_to_mm --cfg.mm_dir "$OUT/mm" --cfg.hf_config.hf_dir "$OUT/hf" \
  --cfg.parallel_config.llm_pp_layers [[2]] --cfg.parallel_config.vit_pp_layers [[2]] --cfg.parallel_config.tp_size 1

# a PP2 copy of the model spec: ViT and one LLM layer on stage 0, one LLM layer on stage 1
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
spec = json.load(open(f"{out}/model.json"))
spec["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = [2, 0]
spec["text_decoder"]["pipeline_num_layers"] = [1, 1]
json.dump(spec, open(f"{out}/model_pp2.json", "w"), indent=2)
PY

ARGS="--mm-data $OUT/data.json --seq-length 1024 --micro-batch-size 2 --global-batch-size 4 --train-iters $ITERS
  --lr 2e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.0 --clip-grad 1.0
  --num-workers 1 --log-interval 5 --save $OUT/save --metrics-file $OUT/metrics.jsonl
  --tokenizer-type NullTokenizer --swiglu --normalization RMSNorm --position-embedding-type rope"
echo "== finetune at TP2 + SP, distributed optimizer; stop after iteration $((ITERS / 2))"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 pretrain_vlm.py $ARGS --mm-model "$OUT/model.json" \
  --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer --load "$OUT/mm" \
  --exit-interval $((ITERS / 2))
echo "== resume at PP2 from $OUT/save"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 pretrain_vlm.py $ARGS --mm-model "$OUT/model_pp2.json" \
  --pipeline-model-parallel-size 2 --load "$OUT/save"

echo "== inference with the finetuned checkpoint ($OUT/save, its PP2 layout)"
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
cfg = json.load(open("examples/internvl3/inference_tiny.json"))
cfg.update(file_path=f"{out}/data/images/red_1.jpg", prompts=["What colour is this picture?"],
           requests_file=f"{out}/requests.jsonl", output_path=f"{out}/answers.jsonl",
           from_pretrained=f"{out}/save", tokenizer={"from_pretrained": f"{out}/hf"})
cfg["generation_config"]["max_new_tokens"] = 16
json.dump(cfg, open(f"{out}/inference.json", "w"), indent=2)
with open(f"{out}/requests.jsonl", "w") as f:
    for path in ("blue_0.png", "green_1.jpg"):
        f.write(json.dumps({"prompt": "What colour is this picture?", "infer_data_type": "image",
                            "file_path": f"{out}/data/images/{path}"}) + "\n")
PY
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 inference_vlm.py --mm-model "$OUT/inference.json"

"$PY" -m mindspeed_mm.cli.mm_convert InternVLConverter mm_to_hf --cfg.mm_dir "$OUT/save" --cfg.save_hf_dir "$OUT/hf_finetuned"
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rec = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
first, last = rec[0]["loss"], rec[-1]["loss"]
print(f"loss {first:.3f} (iteration {rec[0]['iteration']}) -> {last:.3f} (iteration {rec[-1]['iteration']}); "
      f"finetuned HF checkpoint in {out}/hf_finetuned")
if not last < 0.7 * first:
    sys.exit("the loss did not fall")
PY
