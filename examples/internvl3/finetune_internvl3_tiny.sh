#!/usr/bin/env bash
# The tiny built-in default, on CPU with nothing downloaded (a few minutes on 2 cores):
#   1. write a tiny random InternVL3 checkpoint (transformers' native format, with a tokenizer) and a small
#      multimodal dataset (images of several shapes, several images per sample, a video, text only);
#   2. convert it with mm-convert to the MM layout (TP1);
#   3. finetune it with pretrain_vlm.py on 2 ranks at TP2 + SP with the distributed optimizer (--load reshards
#      the TP1 conversion), stopping half-way after a save (--exit-interval);
#   4. resume from that save at another layout (PP2) and train to the end;
#   4b. MPO (InternVL3's preference stage) from the SFT save on preference pairs, at DP2, a frozen reference copy;
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

echo "== MPO after SFT (InternVL3's recipe: sigmoid + bco_pair + the generation loss) on preference pairs, DP2"
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
from mindspeed_mm.testing.tiny_dataset import write_tiny_preference_dataset
from mindspeed_mm.testing.tiny_run import _pad_id, write_data_json
out = Path(sys.argv[1])
size = spec_from_hf_dir(out / "hf").vision.image_size
pairs = write_tiny_preference_dataset(out / "pref_data", image_size=size)
write_data_json(out / "pref_data.json", pairs, out / "hf", size, pad_id=_pad_id(out / "hf"), dataset_kind="preference")
PY
MPO_ITERS=${MPO_ITERS:-6}
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 pretrain_vlm.py $ARGS --mm-model "$OUT/model.json" \
  --mm-data "$OUT/pref_data.json" --training-mode mpo --load "$OUT/save" --finetune --train-iters $MPO_ITERS \
  --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 0 --log-interval 1 --micro-batch-size 1 --use-distributed-optimizer \
  --save "$OUT/mpo" --metrics-file "$OUT/mpo_metrics.jsonl"

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
mpo = [json.loads(l) for l in open(f"{out}/mpo_metrics.jsonl")]
print(f"MPO: loss {mpo[0]['loss']:.3f} -> {mpo[-1]['loss']:.3f}, reward margin {mpo[0]['rewards/margins']:.3f} -> "
      f"{mpo[-1]['rewards/margins']:.3f}, reward accuracy {mpo[-1]['rewards/accuracies']:.2f} ({out}/mpo)")
if not mpo[-1]["rewards/margins"] > mpo[0]["rewards/margins"]:
    sys.exit("MPO did not widen the reward margin")
PY
