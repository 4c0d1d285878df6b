"""A complete tiny finetuning setup, offline: HF checkpoint + tokenizer, its mm-convert output, a small
multimodal dataset, and the model/data JSON specs `pretrain_vlm.py` reads. Used by the tests, the tiny example
script and the training benchmark."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from mindspeed_mm.cli.mm_convert import HFConfig, HFToMMConfig, ParallelConfig, hf_to_mm
from mindspeed_mm.models.internvl.hf.config import spec_from_hf_dir
from mindspeed_mm.config.model_spec import to_dict
from mindspeed_mm.testing.tiny_checkpoint import write_tiny_checkpoint

__all__ = ["TinyRun", "prepare_tiny_preference_run", "prepare_tiny_run", "write_model_json", "write_data_json", "pretrain_args",
           "tiny_reference_inference_json"]


@dataclasses.dataclass
class TinyRun:
    root: Path
    hf_dir: Path
    mm_dir: Path
    data_jsonl: Path
    data_json: Path


def write_model_json(hf_dir: Path, path: Path, vit_pp_layers=None, llm_pp_layers=None, freeze_vit: bool = False,
                     **text_overrides) -> Path:
    """The model spec of `hf_dir` in the reference JSON schema, with per-stage layer lists for PP."""
    raw = to_dict(spec_from_hf_dir(hf_dir))
    raw["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = vit_pp_layers
    raw["image_encoder"]["vision_encoder"]["freeze"] = freeze_vit
    raw["text_decoder"]["pipeline_num_layers"] = llm_pp_layers
    raw["text_decoder"].update(text_overrides)
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return path


def write_data_json(path: Path, data_jsonl: Path, tokenizer_dir: Path, image_size: int, max_dynamic_patch: int = 6,
                    shuffle: bool = True, pad_id: int = 0, dataset_kind: Optional[str] = None) -> Path:
    """``dataset_kind``: written as ``dataset_param.dataset_kind`` when given ("preference" for pairs)."""
    raw = {
        "dataset_param": {
            "dataset_type": "multimodal",
            "basic_parameters": {"data_path": str(data_jsonl), "data_folder": str(data_jsonl.parent),
                                 "repeat_time": 1},
            "preprocess_parameters": {"image_reader_type": "torchvision"},
            "tokenizer_config": {"hub_backend": "hf", "autotokenizer_name": "AutoTokenizer",
                                 "from_pretrained": str(tokenizer_dir), "add_eos_token": False, "use_fast": False},
            "template_name": "internvl2_5", "patch_size": 14, "image_size": image_size, "down_sample_ratio": 0.5,
            "group_by_length": False, "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
            "max_dynamic_patch": max_dynamic_patch, "min_num_frame": 2, "max_num_frame": 4,
            "sampling_method": "rand",
        },
        "dataloader_param": {"dataloader_mode": "sampler", "shuffle": shuffle, "drop_last": True,
                             "pin_memory": False, "sampler_type": "BaseRandomBatchSampler",
                             "collate_param": {"model_name": "internvl", "pad_id": pad_id}},
    }
    if dataset_kind is not None:
        raw["dataset_param"]["dataset_kind"] = dataset_kind
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return path


def prepare_tiny_run(root: Path, preset: str = "vit6b", seed: int = 0, broken: bool = False,
                     mm_tp: int = 1, shuffle: bool = True, convert: bool = True) -> TinyRun:
    from mindspeed_mm.testing.tiny_dataset import write_tiny_dataset

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    hf_dir = root / "hf"
    if not (hf_dir / "config.json").is_file():
        write_tiny_checkpoint(hf_dir, fmt="native", preset=preset, seed=seed, overwrite=True)
    spec = spec_from_hf_dir(hf_dir)
    mm_dir = root / "mm"
    if convert and not (mm_dir / "latest_checkpointed_iteration.txt").is_file():
        hf_to_mm(HFToMMConfig(mm_dir=str(mm_dir), hf_config=HFConfig(hf_dir=str(hf_dir)),
                              parallel_config=ParallelConfig(tp_size=mm_tp, llm_pp_layers=[[spec.text.num_layers]],
                                                             vit_pp_layers=[[spec.vision.num_layers]]),
                              progress=False, overwrite=True))
    data_jsonl = write_tiny_dataset(root / "data", image_size=spec.vision.image_size, seed=seed, broken=broken)
    data_json = write_data_json(root / "data.json", data_jsonl, hf_dir, spec.vision.image_size, shuffle=shuffle,
                                pad_id=_pad_id(hf_dir))
    return TinyRun(root, hf_dir, mm_dir, data_jsonl, data_json)


def prepare_tiny_preference_run(root: Path, preset: str = "vit6b", seed: int = 0, broken: bool = False,
                                shuffle: bool = True) -> TinyRun:
    """A tiny run whose data is MMPR preference pairs (`write_tiny_preference_dataset`), for DPO/MPO; the
    checkpoint and its conversion as `prepare_tiny_run`'s."""
    from mindspeed_mm.testing.tiny_dataset import write_tiny_preference_dataset

    base = prepare_tiny_run(root, preset=preset, seed=seed)
    spec = spec_from_hf_dir(base.hf_dir)
    jsonl = write_tiny_preference_dataset(Path(root) / "pref_data", image_size=spec.vision.image_size, seed=seed,
                                          broken=broken)
    data_json = write_data_json(Path(root) / "pref_data.json", jsonl, base.hf_dir, spec.vision.image_size,
                                shuffle=shuffle, pad_id=_pad_id(base.hf_dir), dataset_kind="preference")
    return TinyRun(base.root, base.hf_dir, base.mm_dir, jsonl, data_json)


def _pad_id(hf_dir: Path) -> int:
    cfg = json.loads((hf_dir / "config.json").read_text())
    return int(cfg["text_config"]["pad_token_id"])


def pretrain_args(run: TinyRun, model_json: Path, *, iters: int, mbs: int = 1, gbs: int = 4, lr: float = 1e-3,
                  save: Optional[Path] = None, load: Optional[Path] = None, metrics: Optional[Path] = None,
                  extra: tuple = ()) -> list[str]:
    """Flags for `pretrain_vlm.py` in the reference scripts' style (fp32, cosine, AdamW, clip 1.0)."""
    args = ["--mm-model", str(model_json), "--mm-data", str(run.data_json), "--seq-length", "512",
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--train-iters", str(iters),
            "--lr", str(lr), "--min-lr", "0", "--lr-decay-style", "cosine", "--weight-decay", "0.05",
            "--clip-grad", "1.0", "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-eps", "1e-6",
            "--num-workers", "0", "--log-interval", "1", "--seed", "1234",
            "--tokenizer-type", "NullTokenizer", "--position-embedding-type", "rope", "--swiglu",
            "--normalization", "RMSNorm", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion"]
    if save is not None:
        args += ["--save", str(save)]
    if load is not None:
        args += ["--load", str(load)]
    if metrics is not None:
        args += ["--metrics-file", str(metrics)]
    return args + list(extra)


# What differs between a reference inference JSON and its tiny copy: paths and model sizes, nothing else.
_TEXT_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "kv_channels", "vocab_size")
_VIT_SIZES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "image_size")


def tiny_reference_inference_json(reference: Path, hf_dir: Path, checkpoint: Path, image: Path, out: Path,
                                  max_new_tokens: Optional[int] = None) -> Path:
    """The reference's inference JSON as written, but for the tiny model: its paths (from_pretrained, file_path,
    tokenizer.from_pretrained) and model sizes (layers, widths, heads, vocabulary and the image token in it, image
    size) replaced, and `max_new_tokens` capped if given (test time). `hf_dir` must be a vit300m preset: the
    reference's 8B has InternViT-300M's architecture."""
    raw = json.loads(Path(reference).read_text(encoding="utf-8"))
    spec = spec_from_hf_dir(hf_dir)
    raw.update(from_pretrained=str(checkpoint), file_path=str(image), img_context_token_id=spec.img_context_token_id)
    raw["tokenizer"]["from_pretrained"] = str(hf_dir)
    raw["text_decoder"].update({k: getattr(spec.text, k) for k in _TEXT_SIZES})
    raw["image_encoder"]["vision_encoder"].update({k: getattr(spec.vision, k) for k in _VIT_SIZES})
    raw["image_encoder"]["vision_projector"].update(vit_hidden_size=spec.vision.hidden_size,
                                                    llm_hidden_size=spec.text.hidden_size)
    if max_new_tokens is not None:
        raw["generation_config"]["max_new_tokens"] = max_new_tokens
    Path(out).write_text(json.dumps(raw, indent=4) + "\n", encoding="utf-8")
    return Path(out)


def main(argv=None) -> None:
    """`python -m mindspeed_mm.testing.tiny_run OUT [--preset P]`: the HF checkpoint, dataset and JSON specs of
    a tiny run (the conversion is left to `mm-convert`, as a user would run it)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="vit6b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-inference", type=Path, metavar="JSON",
                    help="also write OUT/inference_reference.json: this reference inference JSON for the tiny model "
                         "(from_pretrained: OUT/mm's single rank file, to be written by mm-convert at TP1 PP1)")
    ap.add_argument("--max-new-tokens", type=int)
    a = ap.parse_args(argv)
    run = prepare_tiny_run(a.out, preset=a.preset, seed=a.seed, convert=False)
    write_model_json(run.hf_dir, a.out / "model.json")
    if a.reference_inference:
        rank_file = a.out / "mm" / "release" / "mp_rank_00" / "model_optim_rng.pt"
        tiny_reference_inference_json(a.reference_inference, run.hf_dir, rank_file,
                                      a.out / "data" / "images" / "red_1.jpg", a.out / "inference_reference.json",
                                      a.max_new_tokens)
    print(f"tiny run in {a.out}: HF checkpoint {run.hf_dir}, dataset {run.data_jsonl}, "
          f"specs {a.out / 'model.json'} and {run.data_json}")


if __name__ == "__main__":
    main()
