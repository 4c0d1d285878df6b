"""Tiny random InternVL3 checkpoints, written offline, in either HF format.

The weights come from transformers' ``InternVLForConditionalGeneration`` (our numerical oracle) with every
parameter overwritten by seeded random values (norm weights ~1, nonzero biases, random layer scales, CLS and
position embeddings), so a wrong mapping anywhere changes the logits. Same seed => same weights in both formats.

Tokenizer: a byte-level BPE trained with ``tokenizers`` on a fixed English + Chinese text (256 byte symbols +
63 merges = 319 ids), then the special tokens appended in Qwen order (see :data:`SPECIAL_TOKENS`); wrapped as
``Qwen2TokenizerFast`` (``Qwen2Tokenizer`` in transformers 5) with the named extra special tokens that
transformers' InternVL processor reads. ``len(tokenizer) == 332``; the model vocab is the smallest odd number
strictly greater than that (333), so there is one unused, padded embedding row and the vocab is odd (TP padding
paths get exercised).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mindspeed_mm.data.template import DEFAULT_SYSTEM_MESSAGE
from mindspeed_mm.checkpoint.atomic import atomic_output_dir
from mindspeed_mm.checkpoint.hf_files import write_sharded
from mindspeed_mm.models.internvl.hf.config import (
    NATIVE,
    ORIGINAL,
    native_config_to_original,
)
from mindspeed_mm.models.internvl.hf.keys import (
    native_to_original_state_dict,
)

__all__ = [
    "INTERNVL_TOKENS",
    "SPECIAL_TOKENS",
    "TRAINING_LINES",
    "EXTRA_SPECIAL_TOKENS",
    "DEFAULT_SYSTEM_MESSAGE",
    "TinyPreset",
    "TINY_PRESETS",
    "BENCH_PRESETS",
    "build_tiny_tokenizer",
    "tiny_vocab_size",
    "tiny_native_config",
    "build_tiny_model",
    "refresh_rope_buffers",
    "check_tying",
    "write_tiny_checkpoint",
]


# Appended after the BPE vocab, in this order (Qwen order; the real model has other tokens in between).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *INTERNVL_TOKENS,
    "<video>",  # transformers' InternVL processor needs a video_token
)
# named special tokens transformers' InternVL processor reads from the tokenizer
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
BPE_VOCAB_SIZE = 319  # 256 byte-level symbols + 63 merges
MODEL_MAX_LENGTH = 2048

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, newlines, spaces).
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

TRAINING_LINES = (  # what the tiny tokenizers learn their pieces from
        DEFAULT_SYSTEM_MESSAGE,
        "The quick brown fox jumps over the lazy dog. Please describe this image in detail.",
        "What is in the picture? The image shows a cat sitting on a wooden table next to a cup of coffee.",
        "A rocket is standing on the launch pad. An astronaut floats in space above the blue earth.",
        "Answer the question using a single word or phrase. How many people are there in the photo?",
        "请描述这张图片。图片中有什么？这是一只猫，它坐在桌子上。",
        "图中有一个宇航员和一枚火箭。请用一个词或短语回答问题。这张照片里有几个人？",
        "Frame-1: the video starts with a dog running in the park, then it stops and looks at the camera.",
        "user assistant system image video frame question answer model language vision",
        "0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14",
)
_TRAINING_TEXT = "\n".join(TRAINING_LINES)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _train_bpe():
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if len(vocab) != BPE_VOCAB_SIZE:
        raise RuntimeError(f"tiny BPE trained to {len(vocab)} ids, expected {BPE_VOCAB_SIZE}")
    return vocab, merges


def build_tiny_tokenizer(out_dir: str | os.PathLike | None = None):
    """Train the tiny byte-level BPE and wrap it as a Qwen2 fast tokenizer (eos ``<|im_end|>``, pad
    ``<|endoftext|>``, specials at ids 319..331). Saved to ``out_dir`` when given (``AutoTokenizer`` reloads it
    offline). Deterministic: the same ids every call."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast  # an alias of Qwen2Tokenizer in transformers 5

    vocab, merges = _train_bpe()
    n = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        added_tokens_decoder={
            n + i: AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != list(range(n, n + len(SPECIAL_TOKENS))) or len(tokenizer) != n + len(SPECIAL_TOKENS):
        raise RuntimeError(f"unexpected special token ids {ids} (len {len(tokenizer)})")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_vocab_size(tokenizer_len: int) -> int:
    """Smallest odd number strictly greater than the tokenizer length (332 -> 333)."""
    return tokenizer_len + 1 if tokenizer_len % 2 == 0 else tokenizer_len + 2


# ----------------------------------------------------------------------------------------------------------------
# Presets and model
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyPreset:
    vit_hidden: int
    vit_heads: int
    vit_norm: str  # "layer_norm" | "rms_norm"
    vit_qkv_bias: bool
    vit_qk_norm: bool
    vit_layers: int = 2
    vit_ffn: int = 64
    image_size: int = 56
    patch_size: int = 14
    downsample_ratio: float = 0.5
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_ffn: int = 96
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    max_positions: int = 2048
    llm: str = "qwen2"  # the LLM's transformers model_type: "qwen2" | "qwen3" | "internlm3" | "qwen3_moe"
    llm_head_dim: int | None = None  # None: llm_hidden // llm_heads
    tied: bool = False  # lm_head tied to the token embeddings
    # qwen3_moe: experts per sparse layer, top-k, the experts' FFN size, and the layers kept dense
    experts: int = 0
    topk: int = 2
    expert_ffn: int = 32
    mlp_only_layers: tuple = ()
    norm_topk_prob: bool = True
    vocab_size: int | None = None  # None: the tiny tokenizer's (tiny_vocab_size); a real model's for shapes only


_VIT300M = dict(vit_hidden=32, vit_heads=4, vit_norm="layer_norm", vit_qkv_bias=True, vit_qk_norm=False)
_VIT6B = dict(vit_hidden=40, vit_heads=5, vit_norm="rms_norm", vit_qkv_bias=False, vit_qk_norm=True)
# Qwen3: head_dim set apart from hidden / heads (64 / 4 = 16), as Qwen3-0.6B's 128 is not 1024 / 16.
# InternLM3: InternVL3-9B's rope theta and eps.
_QWEN3 = dict(llm="qwen3", llm_head_dim=24)
_INTERNLM3 = dict(llm="internlm3", rope_theta=5e7, rms_eps=1e-5)
# Qwen3-MoE (InternVL3.5-30B-A3B / 241B-A28B): 8 experts, top-2, and 3 layers of which the first is dense, so that
# dense and sparse layers meet on every stage boundary of PP2 and EP2 and EP4 both divide the experts
_QWEN3_MOE = dict(llm="qwen3_moe", llm_head_dim=24, llm_layers=3, experts=8, topk=2, expert_ffn=32,
                  mlp_only_layers=(0,))


TINY_PRESETS: dict[str, TinyPreset] = {
    # InternViT-300M style: LayerNorm, qkv bias, no qk-norm; 4 heads x 8
    "vit300m": TinyPreset(vit_hidden=32, vit_heads=4, vit_norm="layer_norm", vit_qkv_bias=True, vit_qk_norm=False),
    # InternViT-6B style: RMSNorm, no qkv bias, qk-norm; an odd head count, 5 heads x 8
    "vit6b": TinyPreset(vit_hidden=40, vit_heads=5, vit_norm="rms_norm", vit_qkv_bias=False, vit_qk_norm=True),
    # Deep enough for one layer per stage at PP4 x VPP2 (8 stages).
    "deep": TinyPreset(vit_hidden=40, vit_heads=5, vit_norm="rms_norm", vit_qkv_bias=False, vit_qk_norm=True,
                       vit_layers=4, llm_layers=4),
    # Small rather than tiny, for benchmarks: 224-pixel tiles (64 tokens each), 4+4 layers of real-ish width.
    "small": TinyPreset(vit_hidden=256, vit_heads=4, vit_norm="layer_norm", vit_qkv_bias=True, vit_qk_norm=False,
                        vit_layers=4, vit_ffn=1024, image_size=224, llm_hidden=512, llm_layers=4, llm_heads=8,
                        llm_kv_heads=2, llm_ffn=1408),
    # For the LoRA memory benchmark: the small ViT, an LLM of ~90M parameters (8 layers of width 1024), so that
    # its weights, gradients and Adam state stand out from the process's fixed memory.
    "medium": TinyPreset(vit_hidden=256, vit_heads=4, vit_norm="layer_norm", vit_qkv_bias=True, vit_qk_norm=False,
                         vit_layers=4, vit_ffn=1024, image_size=224, llm_hidden=1024, llm_layers=8, llm_heads=16,
                         llm_kv_heads=4, llm_ffn=2816),
    # vit6b with 4 LLM query groups (4 heads, 4 kv heads), so that TP4 can split the LLM's attention.
    "tp4": TinyPreset(vit_hidden=40, vit_heads=5, vit_norm="rms_norm", vit_qkv_bias=False, vit_qk_norm=True,
                      llm_heads=4, llm_kv_heads=4),
    # the other LLM kinds with either ViT kind
    "qwen3_vit300m": TinyPreset(**_VIT300M, **_QWEN3),
    "qwen3_vit6b": TinyPreset(**_VIT6B, **_QWEN3),
    "internlm3_vit300m": TinyPreset(**_VIT300M, **_INTERNLM3),
    "internlm3_vit6b": TinyPreset(**_VIT6B, **_INTERNLM3),
    "qwen3_moe_vit300m": TinyPreset(**_VIT300M, **_QWEN3_MOE),
    "qwen3_moe_vit6b": TinyPreset(**_VIT6B, **_QWEN3_MOE, norm_topk_prob=False),
    # tied embeddings, as Qwen3-0.6B in InternVL3.5-1B
    "qwen3_tied": TinyPreset(**_VIT300M, **_QWEN3, tied=True),
}

# Real model shapes with random weights, for GPU benchmarks only: kept out of TINY_PRESETS because the tests
# write every tiny preset, and these are gigabytes.
BENCH_PRESETS: dict[str, TinyPreset] = {
    # InternVL3-2B: InternViT-300M (448-px tiles, 256 tokens each) + Qwen2.5-1.5B, its vocabulary included so
    # that the output layer's share of the step is the real one
    "internvl3_2b_shape": TinyPreset(vit_hidden=1024, vit_heads=16, vit_norm="layer_norm", vit_qkv_bias=True,
                                     vit_qk_norm=False, vit_layers=24, vit_ffn=4096, image_size=448,
                                     llm_hidden=1536, llm_layers=28, llm_heads=12, llm_kv_heads=2, llm_ffn=8960,
                                     max_positions=32768, vocab_size=151674),
}


def _preset(name: str) -> TinyPreset:
    if name in TINY_PRESETS:
        return TINY_PRESETS[name]
    if name in BENCH_PRESETS:
        return BENCH_PRESETS[name]
    raise ValueError(f"unknown tiny preset {name!r}; choose from {sorted(TINY_PRESETS) + sorted(BENCH_PRESETS)}")


def _text_config(p: TinyPreset, vocab_size: int, tid) -> dict:
    """The LLM's config, in the fields of transformers' config class for its kind."""
    cfg = {
        "model_type": p.llm,
        "vocab_size": vocab_size,
        "hidden_size": p.llm_hidden,
        "num_hidden_layers": p.llm_layers,
        "num_attention_heads": p.llm_heads,
        "num_key_value_heads": p.llm_kv_heads,
        "intermediate_size": p.llm_ffn,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": p.rms_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
        "tie_word_embeddings": p.tied,
    }
    if p.llm == "qwen3_moe":
        cfg.update(num_experts=p.experts, num_experts_per_tok=p.topk, moe_intermediate_size=p.expert_ffn,
                   norm_topk_prob=p.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=list(p.mlp_only_layers),
                   router_aux_loss_coef=0.01, output_router_logits=False)
    if p.llm in ("qwen2", "qwen3", "qwen3_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=p.llm_layers)
    if p.llm != "qwen2":
        cfg.update(head_dim=p.llm_head_dim or p.llm_hidden // p.llm_heads, attention_bias=False)
    if p.llm == "internlm3":
        cfg["mlp_bias"] = False
    return cfg


def tiny_native_config(preset: str = "vit300m", tokenizer=None) -> dict:
    """The native (``InternVLConfig``) dict for a preset; token ids from the tiny tokenizer."""
    p = _preset(preset)
    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    tid = tok.convert_tokens_to_ids
    grid = p.image_size // p.patch_size
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": p.vit_hidden,
            "num_hidden_layers": p.vit_layers,
            "num_attention_heads": p.vit_heads,
            "intermediate_size": p.vit_ffn,
            "hidden_act": "gelu",
            "norm_type": p.vit_norm,
            "layer_norm_eps": 1e-6,
            "attention_bias": p.vit_qkv_bias,
            "use_qk_norm": p.vit_qk_norm,
            "layer_scale_init_value": 0.1,
            "image_size": [p.image_size, p.image_size],
            "patch_size": [p.patch_size, p.patch_size],
            "num_channels": 3,
            "use_mean_pooling": True,
        },
        "text_config": _text_config(p, p.vocab_size or tiny_vocab_size(len(tok)), tid),
        "image_token_id": tid("<IMG_CONTEXT>"),
        "image_seq_length": int(grid * grid * p.downsample_ratio**2),
        "downsample_ratio": p.downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": p.tied,  # the flag InternVLConfig ties by (it ignores text_config's)
    }


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values that keep activations and logits O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(param.shape)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                value = normal(shape, 0.1)
            elif leaf in ("lambda_1", "lambda_2"):
                value = 0.25 + 0.75 * torch.rand(shape, generator=gen)  # layer scales in [0.25, 1)
            elif leaf in ("cls_token", "position_embeddings"):
                value = normal(shape, 0.5)
            elif len(shape) == 1 and "norm" in name:
                value = normal(shape, 0.1, mean=1.0)
            elif name.endswith("embed_tokens.weight") and not model.config.tie_word_embeddings:
                value = normal(shape, 1.0)  # tied, it is the output layer too: scaled as the other matrices
            elif len(shape) >= 2:
                fan_in = 1
                for d in shape[1:]:
                    fan_in *= d
                value = normal(shape, fan_in**-0.5)
            else:
                raise RuntimeError(f"no random-init rule for parameter {name} {shape}")
            param.copy_(value)


def build_tiny_model(preset: str = "vit300m", seed: int = 0, tokenizer=None):
    """Instantiate transformers' InternVLForConditionalGeneration (fp32, CPU, eval, eager attention) for a
    preset and fill it with the seeded random weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig.from_dict(tiny_native_config(preset, tokenizer))
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _randomize_(model, seed)
    refresh_rope_buffers(model)
    check_tying(model, _preset(preset).tied)
    return model.eval()


def refresh_rope_buffers(model: torch.nn.Module) -> None:
    """Recompute the non-persistent RoPE ``inv_freq`` buffers of every rotary module from its config.

    They are never saved, so they are whatever model construction left. A process-wide monkeypatch of
    ``torch.tensor`` (e.g. a CPU device adaptor wrapping torch's factory functions after
    ``torch.utils._device._device_constructors()`` was first evaluated) makes transformers' meta-device loading
    leave them as uninitialised memory; recomputing is exact and harmless when they are already right."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    with torch.no_grad():
        for module in model.modules():
            if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "original_inv_freq"):
                continue
            if module.rope_type == "default":
                inv_freq, _ = module.compute_default_rope_parameters(module.config)
            else:
                inv_freq, _ = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)
            device = module.inv_freq.device
            module.inv_freq = inv_freq.to(device)
            module.original_inv_freq = inv_freq.clone().to(device)


def check_tying(model, tied: bool) -> None:
    """transformers' model ties lm_head to the input embeddings exactly when `tied` (its configs have a trap:
    see hf.config.native_tied)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if (emb is head or emb.data_ptr() == head.data_ptr()) != tied:
        raise RuntimeError(f"lm_head is {'not ' if tied else ''}tied to the input embeddings, expected "
                           f"tie_word_embeddings {str(tied).lower()}")


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(_DTYPES)}")


def write_tiny_checkpoint(
    out_dir: str | os.PathLike,
    fmt: str = NATIVE,
    preset: str = "vit300m",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random InternVL3 checkpoint (config, safetensors weights, tokenizer) to ``out_dir``.

    ``fmt="native"``: transformers ``save_pretrained`` (``tie_word_embeddings`` as the preset says). ``fmt="original"``:
    original-schema ``config.json`` (InternVLChatModel, template internvl2_5, ...) and the same weights renamed
    with :func:`native_to_original_state_dict`. Same ``seed`` and ``preset`` => the same weights in both formats.
    The directory appears atomically (written to a temp dir beside it, then renamed). An existing non-empty
    ``out_dir`` raises FileExistsError unless ``overwrite``.
    """
    if fmt not in (NATIVE, ORIGINAL):
        raise ValueError(f"fmt must be 'native' or 'original', got {fmt!r}")
    torch_dtype = _as_dtype(dtype)
    out_dir = Path(out_dir).absolute()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(preset, seed, tokenizer).to(torch_dtype)
        if fmt == NATIVE:
            model.save_pretrained(str(tmp), max_shard_size=max_shard_bytes or "1000GB", safe_serialization=True)
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("tie_word_embeddings") is not _preset(preset).tied:
                raise RuntimeError(f"save_pretrained wrote a config without tie_word_embeddings: "
                                   f"{str(_preset(preset).tied).lower()}")
        else:
            native_cfg = json.loads(model.config.to_json_string(use_diff=True))
            native_cfg["dtype"] = str(torch_dtype).removeprefix("torch.")  # .to() leaves config.dtype alone
            original_cfg = native_config_to_original(native_cfg)
            (tmp / "config.json").write_text(json.dumps(original_cfg, indent=2, sort_keys=True) + "\n")
            sd = model.state_dict()
            if _preset(preset).tied:  # the embedding's second name, which save_pretrained does not write
                sd.pop("lm_head.weight")
            sd = native_to_original_state_dict(sd)
            write_sharded(((k, t.detach().contiguous()) for k, t in sd.items()), tmp, max_shard_bytes)
        tokenizer.save_pretrained(str(tmp))
    return out_dir

