"""MindSpeed-MM-layout InternVL3 checkpoints written from an original-format HF checkpoint by MindSpeed-MM's
rules (docs: /work/shared/reference/mindspeed-mm-internvl3.md §2), independently of our converter: its rename
map, the Megatron GQA QKV interleave, the GLU split, the unaligned ViT head split, unpadded uneven vocabulary
rows, the projector whole on every TP rank, the PP partition renumbered per stage with `model{v}` under VPP.
Nothing here uses our registry, sharding or converter, so comparing against it tests them.

`as_training_save` writes what its trainer saves instead of a conversion: ``iter_0000010`` with ``args`` (an
argparse.Namespace holding an Enum member of a class of this module and a torch dtype), ``iteration``,
``rng_state`` (numpy RandomState state), ``opt_param_scheduler``, plus TE-style ``_extra_state`` entries.
"""
from __future__ import annotations

import argparse
import enum
import io
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

_RENAMES = [  # regexes in order, as MindSpeed-MM's InternVL recipe applies them
    (r"^vision_model\.(.*)\.attn\.qkv", r"vision_model.\1.self_attention.linear_qkv"),
    (r"\.attn\.q_norm", ".self_attention.q_layernorm"),
    (r"\.attn\.k_norm", ".self_attention.k_layernorm"),
    (r"\.attn\.proj", ".self_attention.linear_proj"),
    (r"^(vision_model\..*)\.mlp\.fc1", r"\1.mlp.linear_fc1"),
    (r"^(vision_model\..*)\.mlp\.fc2", r"\1.mlp.linear_fc2"),
    (r"\.norm1\.", ".input_layernorm."),
    (r"\.norm2\.", ".pre_mlp_layernorm."),
    (r"^vision_model\.encoder\.layers\.", "image_encoder.encoder.encoder.layers."),
    (r"^vision_model\.embeddings\.", "image_encoder.encoder.embeddings."),
    (r"^mlp1\.0\.", "image_encoder.projector.norm."),
    (r"^mlp1\.1\.", "image_encoder.projector.linear_fc1."),
    (r"^mlp1\.3\.", "image_encoder.projector.linear_fc2."),
    (r"^language_model\.lm_head\.", "text_decoder.output_layer."),
    (r"^language_model\.model\.embed_tokens\.", "text_decoder.embedding.word_embeddings."),
    (r"^language_model\.model\.norm\.", "text_decoder.decoder.final_layernorm."),
    (r"\.self_attn\.o_proj\.", ".self_attention.linear_proj."),
    (r"\.self_attn\.([qkv])_proj\.", r".self_attention.linear_\1."),
    (r"\.post_attention_layernorm\.", ".pre_mlp_layernorm."),
    (r"\.mlp\.gate_proj\.", ".mlp.gate."),
    (r"\.mlp\.up_proj\.", ".mlp.up."),
    (r"\.mlp\.down_proj\.", ".mlp.linear_fc2."),
    (r"^language_model\.model\.layers\.", "text_decoder.decoder.layers."),
]


class ScheduleKind(enum.Enum):
    """Stands for the megatron/mindspeed enums MindSpeed-MM's args hold."""
    COSINE = "cosine"


def cal_split_sizes(n: int, tp: int) -> list[int]:
    return [n // tp + (1 if r < n % tp else 0) for r in range(tp)]


def _rename(k: str) -> str:
    for pat, rep in _RENAMES:
        k = re.sub(pat, rep, k)
    return k


def _merge(sd: dict, cfg: dict) -> dict:
    """QKVMergeOp (Megatron GQA interleave) and UpGateMergeOp on the renamed LLM tensors."""
    llm = cfg["llm_config"]
    heads, groups = llm["num_attention_heads"], llm["num_key_value_heads"]
    hd = llm["hidden_size"] // heads
    out = {}
    for k in list(sd):
        m = re.match(r"^(text_decoder\.decoder\.layers\.\d+\.self_attention)\.linear_q\.(weight|bias)$", k)
        if m:
            base, p = m.groups()
            q, kk, v = (sd[f"{base}.linear_{x}.{p}"] for x in "qkv")
            tail = q.shape[1:]
            q = q.reshape(groups, heads // groups * hd, *tail)
            kk, v = kk.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)
            out[f"{base}.linear_qkv.{p}"] = torch.cat([q, kk, v], dim=1).reshape(-1, *tail)
            continue
        m = re.match(r"^(text_decoder\.decoder\.layers\.\d+\.mlp)\.gate\.weight$", k)
        if m:
            out[f"{m.group(1)}.linear_fc1.weight"] = torch.cat([sd[k], sd[f"{m.group(1)}.up.weight"]], dim=0)
            continue
        if re.search(r"\.self_attention\.linear_[kv]\.|\.mlp\.up\.", k) and k.startswith("text_decoder."):
            continue
        out[k] = sd[k]
    return out


def _tp_split(k: str, t: torch.Tensor, tp: int, vit_heads: int, vit_hd: int) -> list[torch.Tensor]:
    if tp == 1:
        return [t]
    if k.startswith("image_encoder.projector."):
        return [t] * tp
    if k in ("text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight"):
        return list(torch.split(t, cal_split_sizes(t.shape[0], tp), dim=0))  # UnalignedEmbeddingSplit
    if k.startswith("text_decoder."):
        if k.endswith("mlp.linear_fc1.weight"):  # GLUSplit
            gate, up = torch.chunk(t, 2, dim=0)
            return [torch.cat([g, u], dim=0) for g, u in zip(torch.chunk(gate, tp), torch.chunk(up, tp))]
        if k.endswith(("mlp.linear_fc2.weight", "self_attention.linear_proj.weight")):  # ColSplit
            return list(torch.chunk(t, tp, dim=1))
        if ".self_attention.linear_qkv." in k:  # RowSplit
            return list(torch.chunk(t, tp, dim=0))
        return [t] * tp
    rows = [h * vit_hd for h in cal_split_sizes(vit_heads, tp)]
    if ".self_attention.linear_qkv." in k:  # UnalignedRowSplit(heads), per Q, K and V
        q, kk, v = torch.chunk(t, 3, dim=0)
        parts = [torch.split(x, rows, dim=0) for x in (q, kk, v)]
        return [torch.cat([parts[0][r], parts[1][r], parts[2][r]], dim=0) for r in range(tp)]
    if k.endswith("self_attention.linear_proj.weight"):  # UnalignedColSplit(heads)
        return list(torch.split(t, rows, dim=1))
    if k.endswith("mlp.linear_fc1.weight") or k.endswith("mlp.linear_fc1.bias"):
        return list(torch.chunk(t, tp, dim=0))
    if k.endswith("mlp.linear_fc2.weight"):
        return list(torch.chunk(t, tp, dim=1))
    return [t] * tp


_SCHEMA = {  # modality: (firsts, lasts, middle)
    "vit": (("image_encoder.encoder.embeddings.",), ("image_encoder.projector.",),
            "image_encoder.encoder.encoder.layers."),
    "llm": (("text_decoder.embedding.",), ("text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."),
            "text_decoder.decoder.layers."),
}


def _pp_partition(sd: dict, vit_flat: list[int], llm_flat: list[int]) -> list[dict]:
    """partition_state_dict_by_pp: per flat stage, firsts/lasts on the first/last non-zero stage of each
    modality, layers renumbered from 0 on every stage."""
    stages: list[dict] = [{} for _ in vit_flat]
    for modality, counts in (("vit", vit_flat), ("llm", llm_flat)):
        firsts, lasts, middle = _SCHEMA[modality]
        nonzero = [i for i, c in enumerate(counts) if c]
        starts = np.cumsum([0] + counts[:-1])
        for k, t in sd.items():
            if k.startswith(firsts):
                stages[nonzero[0]][k] = t
            elif k.startswith(lasts):
                stages[nonzero[-1]][k] = t
            elif k.startswith(middle):
                layer, rest = k[len(middle):].split(".", 1)
                layer = int(layer)
                s = next(i for i, c in enumerate(counts) if starts[i] <= layer < starts[i] + c)
                stages[s][f"{middle}{layer - starts[s]}.{rest}"] = t
    return stages


def write_mindspeed_checkpoint(hf_dir: Path, out_dir: Path, tp: int = 1, vit_pp_layers: Optional[list] = None,
                               llm_pp_layers: Optional[list] = None, as_training_save: bool = False) -> Path:
    """MindSpeed-MM's `hf_to_mm` output (or training save) of the original-format checkpoint at `hf_dir`."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if "vision_config" not in cfg or "llm_config" not in cfg:
        raise ValueError(f"{hf_dir}: expected an original-format (InternVLChatModel) config")
    src: dict = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        src.update(load_file(str(f)))
    sd = _merge({_rename(k): v for k, v in src.items()}, cfg)
    vis = cfg["vision_config"]
    vit_heads, vit_hd = vis["num_attention_heads"], vis["hidden_size"] // vis["num_attention_heads"]
    vit_pp_layers = vit_pp_layers or [[vis["num_hidden_layers"]]]
    llm_pp_layers = llm_pp_layers or [[cfg["llm_config"]["num_hidden_layers"]]]
    vpp, pp = len(llm_pp_layers), len(llm_pp_layers[0])
    stages = _pp_partition(sd, [c for row in vit_pp_layers for c in row], [c for row in llm_pp_layers for c in row])
    name = "iter_0000010" if as_training_save else "release"
    for p in range(pp):
        for r in range(tp):
            chunks = []
            for v in range(vpp):
                chunk = {k: _tp_split(k, t, tp, vit_heads, vit_hd)[r].clone() for k, t in stages[v * pp + p].items()}
                if as_training_save:  # Transformer Engine's metadata beside some modules' weights
                    for k in [k for k in chunk if k.endswith("linear_qkv.weight")]:
                        chunk[k.removesuffix("weight") + "_extra_state"] = io.BytesIO(b"te-fp8-meta")
                chunks.append(chunk)
            obj = {"model": chunks[0]} if vpp == 1 else {f"model{v}": c for v, c in enumerate(chunks)}
            obj["checkpoint_version"] = 3.0
            if as_training_save:
                obj.update(
                    args=argparse.Namespace(lr_decay_style=ScheduleKind.COSINE, params_dtype=torch.bfloat16,
                                            tensor_model_parallel_size=tp, consumed_train_samples=40),
                    iteration=10,
                    rng_state=[{"random_rng_state": (3, (1, 2), None),
                                "np_rng_state": np.random.RandomState(0).get_state(),
                                "torch_rng_state": torch.get_rng_state()}],
                    opt_param_scheduler={"max_lr": 1e-3, "num_steps": 40},
                    num_floating_point_operations_so_far=123.0,
                )
            d = out_dir / name / (f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else ""))
            d.mkdir(parents=True, exist_ok=True)
            torch.save(obj, d / "model_optim_rng.pt")
    (out_dir / "latest_checkpointed_iteration.txt").write_text("10" if as_training_save else "release")
    return out_dir
