"""The inference JSON, typed and validated.

Schema (the reference system's ``inference_8B.json`` plus ``output_path``, ``requests_file``, ``seed`` and a
few optional knobs)::

    {
      "infer_data_type": "image" | "video" | "text",
      "file_path": str | [str, ...],        image(s) of one request, or one video; absent for text
      "prompts": str | [str, ...],          one request per prompt (each with the same file(s))
      "requests_file": "reqs.jsonl",        or/also: one JSON request per line (see `RequestSpec`)
      "pipeline_class": "InternVLPipeline", "template": "internvl2_5",
      "dtype": "bf16" | "fp16" | "fp32",    "device": "cuda" | "npu" | "cpu" | "auto",
      "num_segments": 8,                    video frames (one tile each)
      "max_tiles": 12,                      tiles of one image, thumbnail excluded (alias max_dynamic_patch)
      "from_pretrained": "ckpt/mm_path/internvl3-8B"   mm-convert output dir, or one rank's .pt file
      "tokenizer": {"from_pretrained": "<HF dir>", ...},
      "generation_config": {"do_sample": false, "max_new_tokens": 1024, "temperature": 1.0, "top_k": 50,
                            "top_p": 1.0, "eos_token_id": 151645, "repetition_penalty": 1.0, ...},
                                            every key of transformers' GenerationConfig (GenerationConfig below)
      "output_path": "results.jsonl", "seed": 1234, "batch_size": 1,
      "text_decoder": {...}, "image_encoder": {...}, ...   the model keys, as in the model JSON (optional
                                                           with a converted dir: its metadata has them)
    }

Every error is an :class:`InferenceConfigError` (the one :class:`~mindspeed_mm.config.validate.ConfigError` of
every config file) whose message starts with the key path.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mindspeed_mm.config.validate import ConfigError, Section, check_value, describe, parse_json, read_json
from mindspeed_mm.data.data_spec import tokenizer_config_from_dict
from mindspeed_mm.data.tokenizer import TokenizerConfig
from mindspeed_mm.inference.generation_keys import unused_keys

__all__ = [
    "DATA_TYPES",
    "GenerationConfig",
    "InferenceConfig",
    "InferenceConfigError",
    "RequestSpec",
    "TokenizerConfig",
    "load_inference_config",
]

DATA_TYPES = ("image", "video", "text")
DTYPES = ("bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "npu", "cpu")  # the one there is runs (inference.cli.resolve_device)
PIPELINES = ("InternVLPipeline",)
TEMPLATES = ("internvl2_5",)
# Top-level keys of the model JSON that may sit in the inference JSON (the reference merges the two).
MODEL_KEYS = ("model_id", "img_context_token_id", "downsample_ratio", "select_layer", "ps_version",
              "pre_process", "post_process", "add_text_encoder", "text_encoder", "video_encoder",
              "img_embedding_idx", "add_rmsnorm_offset", "text_decoder", "image_encoder")
# The reference's inference JSON names the LLM "Qwen2.5llm"; it is the same module as training's "internllm".
_TEXT_MODEL_ALIASES = {"Qwen2.5llm": "internllm"}


logger = logging.getLogger("mindspeed_mm.inference")
InferenceConfigError = ConfigError  # the name this module's callers and users know


def _str_list(path: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise InferenceConfigError(path, f"expected a string or a list of strings, got {describe(value)}")
    return tuple(check_value(f"{path}[{i}]", str, v) for i, v in enumerate(value))


DEFAULT_MAX_NEW_TOKENS = 1024  # when neither max_new_tokens nor max_length is given


@dataclass(frozen=True)
class GenerationConfig:
    """transformers' generation settings, with its meanings (``generation_keys`` says what every other key of
    its GenerationConfig does here). ``max_new_tokens`` wins over ``max_length`` (prompt + new tokens), as in
    transformers; with neither, ``DEFAULT_MAX_NEW_TOKENS``. Lengths count each request's own prompt, so a batch
    gives every request what it would get alone. ``eos_token_id`` null: stop at the tokenizer's ``<|im_end|>``
    (and its eos); ``[]`` never stops early. ``min_length``/``min_new_tokens`` hold those stop tokens back.
    ``num_beams`` must be 1 (no beam search). ``use_cache`` false (Python callers only: the tests and benchmarks'
    baseline) recomputes the whole sequence every step; the JSON's false keeps the cache, whose tokens are the
    same."""

    do_sample: bool = False
    num_beams: int = 1
    max_new_tokens: int | None = None
    max_length: int | None = None
    min_length: int = 0
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: tuple[int, ...] | None = None
    bos_token_id: int | None = None  # unused, as in transformers given a prompt (ours start with the system turn)
    pad_token_id: int | None = None
    use_cache: bool = True

    def new_token_budget(self, prompt_length: int) -> int:
        """New tokens allowed after a prompt of this length, as transformers counts them (< 1: no room)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - prompt_length
        return DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def from_dict(cls, raw: Any, path: str = "generation_config") -> GenerationConfig:
        s, d = Section(raw, path), cls()
        unused = unused_keys(s.raw, path)
        s.accept(*unused)

        def get(name: str, kind: Any, minimum: float | None = None) -> Any:
            value = s.get(name, kind, None, nullable=True, minimum=minimum)  # null: transformers' default
            return getattr(d, name) if value is None else value

        eos = s.get("eos_token_id", Any, None)  # one id or a list of them
        if isinstance(eos, list):
            eos = tuple(check_value(f"{s.key('eos_token_id')}[{i}]", int, v, minimum=0) for i, v in enumerate(eos))
        elif eos is not None:
            eos = (s.get("eos_token_id", int, minimum=0),)
        kw = {name: get(name, kind, minimum) for name, kind, minimum in (
            ("do_sample", bool, None), ("num_beams", int, 1), ("max_new_tokens", int, 1), ("max_length", int, 1),
            ("min_length", int, 0), ("min_new_tokens", int, 0), ("temperature", float, None), ("top_k", int, 0),
            ("top_p", float, None), ("repetition_penalty", float, None), ("no_repeat_ngram_size", int, 0),
            ("bos_token_id", int, 0), ("pad_token_id", int, 0))}
        s.get("use_cache", bool, None, nullable=True)
        s.done()
        out = cls(**kw, eos_token_id=eos)
        if out.num_beams != 1:
            raise InferenceConfigError(f"{path}.num_beams", f"only 1 is supported (no beam search), got {out.num_beams}")
        if out.do_sample and out.temperature <= 0:
            raise InferenceConfigError(f"{path}.temperature", f"must be > 0 when sampling, got {out.temperature}")
        if not 0.0 < out.top_p <= 1.0:
            raise InferenceConfigError(f"{path}.top_p", f"must be in (0, 1], got {out.top_p}")
        if out.repetition_penalty <= 0:
            raise InferenceConfigError(f"{path}.repetition_penalty", f"must be > 0, got {out.repetition_penalty}")
        notes = list(unused)
        if raw.get("use_cache") is False:
            notes.append("use_cache (false: the KV cache is used anyway; the tokens are the same)")
        if raw.get("max_new_tokens") is not None and raw.get("max_length") is not None:
            notes.append("max_length (max_new_tokens wins, as in transformers)")
        if notes:
            logger.info("%s: accepted with no effect in mindspeed_mm: %s", path, ", ".join(notes))
        return out


def _tokenizer_config(raw: Any, path: str = "tokenizer") -> TokenizerConfig:
    out = tokenizer_config_from_dict(raw, path, use_fast=TokenizerConfig.use_fast)
    if out.add_eos_token:
        raise InferenceConfigError(f"{path}.add_eos_token", "true would end every prompt with eos; use false")
    return out


@dataclass(frozen=True)
class RequestSpec:
    """One generation request: a prompt, its data type and its files (images of one request, or one video)."""

    prompt: str
    infer_data_type: str = "text"
    file_path: tuple[str, ...] = ()
    id: str | None = None
    max_new_tokens: int | None = None  # overrides generation_config.max_new_tokens

    source: str = ""  # where it was written: "" (the top-level keys) or "requests_file line N."

    def check_files(self) -> None:
        """Missing files and wrong counts, before any model is loaded."""
        key = f"{self.source}file_path"
        if self.infer_data_type == "text":
            if self.file_path:
                raise InferenceConfigError(key, f"infer_data_type 'text' takes no files, got {list(self.file_path)}")
            return
        if not self.file_path:
            raise InferenceConfigError(key, f"infer_data_type {self.infer_data_type!r} needs a file")
        if self.infer_data_type == "video" and len(self.file_path) != 1:
            raise InferenceConfigError(key, f"a video request takes one file, got {list(self.file_path)}")
        for i, f in enumerate(self.file_path):
            if not Path(f).is_file():
                where = key + (f"[{i}]" if len(self.file_path) > 1 else "")
                raise InferenceConfigError(where, f"file not found: {f}")


@dataclass(frozen=True)
class InferenceConfig:
    from_pretrained: str
    tokenizer: TokenizerConfig
    requests: tuple[RequestSpec, ...]
    generation_config: GenerationConfig = field(default_factory=GenerationConfig)
    pipeline_class: str = "InternVLPipeline"
    template: str = "internvl2_5"
    dtype: str = "bf16"
    device: str = "auto"
    num_segments: int = 8
    max_tiles: int = 12
    use_thumbnail: bool = True
    system_message: str | None = None  # null: the template's default
    batch_size: int = 1
    seed: int = 1234
    seq_length: int | None = None  # prompt + new tokens limit; null: the model's max_position_embeddings
    output_path: str | None = None
    model: dict | None = None  # the model keys, reference schema; None: from the checkpoint metadata
    source: str = "<dict>"


_TOP_KEYS = ("infer_data_type", "file_path", "prompts", "requests_file", "pipeline_class", "template", "dtype",
             "device", "num_segments", "max_tiles", "max_dynamic_patch", "use_thumbnail", "system_message",
             "batch_size", "seed", "seq_length", "output_path", "from_pretrained", "tokenizer",
             "generation_config")


def _model_dict(raw: Mapping[str, Any]) -> dict | None:
    model = {k: raw[k] for k in MODEL_KEYS if k in raw}
    if "text_decoder" not in model and "image_encoder" not in model:
        return None
    text = model.get("text_decoder")
    if isinstance(text, Mapping) and text.get("model_id") in _TEXT_MODEL_ALIASES:
        model["text_decoder"] = {**text, "model_id": _TEXT_MODEL_ALIASES[text["model_id"]]}
    return model


def _requests_from_file(path: str, default_type: str) -> list[RequestSpec]:
    """JSONL: {"prompt": str, "infer_data_type"?: str, "file_path"?: str | [str], "id"?: str,
    "max_new_tokens"?: int} per line (blank lines skipped). The type defaults to the top-level one for a line
    with files and to "text" for one without."""
    p = Path(path)
    if not p.is_file():
        raise InferenceConfigError("requests_file", f"file not found: {path}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"requests_file line {n}"
        s = Section(parse_json(line, key_path=where), where,
                    known=("prompt", "infer_data_type", "file_path", "id", "max_new_tokens"))
        files = _str_list(s.key("file_path"), s.raw["file_path"]) if s.raw.get("file_path") else ()
        out.append(RequestSpec(
            prompt=s.get("prompt", str),
            infer_data_type=s.get("infer_data_type", str, default_type if files else "text", choices=DATA_TYPES),
            file_path=files,
            id=None if s.raw.get("id") is None else str(s.raw["id"]),
            max_new_tokens=s.get("max_new_tokens", int, None, nullable=True, minimum=1),
            source=f"{where}."))
    return out


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>", check_files: bool = True,
                     need_requests: bool = True) -> InferenceConfig:
    """`need_requests` False: the JSON may have no prompts (the model and generation settings of an
    evaluation, whose requests come from benchmark files)."""
    s = Section(raw, "", known=_TOP_KEYS + MODEL_KEYS)
    from_pretrained, tokenizer = s.get("from_pretrained"), s.get("tokenizer")
    data_type = s.get("infer_data_type", str, "text", choices=DATA_TYPES)
    requests: list[RequestSpec] = []
    if raw.get("prompts") is not None:
        files = _str_list("file_path", raw["file_path"]) if raw.get("file_path") else ()
        for i, prompt in enumerate(_str_list("prompts", raw["prompts"])):
            requests.append(RequestSpec(prompt, data_type, files, id=str(i)))
    elif raw.get("file_path"):
        raise InferenceConfigError("prompts", "missing: file_path is given but no prompt for it")
    path = s.get("requests_file", str, None, nullable=True)
    if path is not None and (check_files or Path(path).is_file()):  # unchecked: skipped if absent
        requests += _requests_from_file(path, data_type)
    if not requests and need_requests:
        raise InferenceConfigError("prompts", "no requests: give prompts (with file_path) or requests_file")
    requests = [r if r.id is not None else dataclasses.replace(r, id=str(i)) for i, r in enumerate(requests)]
    if check_files:
        for r in requests:
            r.check_files()
    kw: dict[str, Any] = {
        "from_pretrained": check_value("from_pretrained", str, from_pretrained),
        "tokenizer": _tokenizer_config(tokenizer),
        "requests": tuple(requests),
        "model": _model_dict(raw),
        "source": source,
    }
    if "generation_config" in s:
        kw["generation_config"] = GenerationConfig.from_dict(raw["generation_config"])
    choices = {"pipeline_class": PIPELINES, "template": TEMPLATES, "dtype": DTYPES, "device": DEVICES}
    for key, allowed in choices.items():
        if key in s:
            kw[key] = s.get(key, str, choices=allowed)
    if "max_tiles" in s and "max_dynamic_patch" in s and raw["max_tiles"] != raw["max_dynamic_patch"]:
        raise InferenceConfigError("max_dynamic_patch", f"{raw['max_dynamic_patch']!r} disagrees with max_tiles "
                                   f"{raw['max_tiles']!r}")
    for key, kind, minimum in (("num_segments", int, 1), ("max_tiles", int, 1), ("max_dynamic_patch", int, 1),
                               ("batch_size", int, 1), ("seed", int, 0), ("seq_length", int, 1),
                               ("system_message", str, None), ("output_path", str, None)):
        value = s.get(key, kind, None, nullable=True, minimum=minimum)
        if value is not None:
            kw["max_tiles" if key == "max_dynamic_patch" else key] = value
    if "use_thumbnail" in s:
        kw["use_thumbnail"] = s.get("use_thumbnail", bool)
    return InferenceConfig(**kw)


def load_inference_config(path: str | Path, check_files: bool = True, need_requests: bool = True) -> InferenceConfig:
    raw = read_json(path)
    try:
        return config_from_dict(raw, source=str(path), check_files=check_files, need_requests=need_requests)
    except ConfigError as e:
        raise e.in_file(path) from None
