"""Our Megatron InternVL as a VLMEvalKit model, for users who run VLMEvalKit's own `run.py`.

VLMEvalKit starts one process per model copy (`torchrun --nproc-per-node N run.py ...`) and hands each its
share of a benchmark, an item at a time, through `generate_inner(message, dataset)`. So every process here is
one TP1 x PP1 model (a checkpoint saved at another layout is resharded at load); a model too large for one
device is evaluated with `evaluate_vlm.py`, whose instances are TP x PP groups. Registering it::

    # vlmeval/config.py
    from functools import partial
    from mindspeed_mm.evaluation.vlmeval_model import MindSpeedInternVL
    supported_VLM["InternVL3-8B-mm"] = partial(MindSpeedInternVL, mm_model="inference_8B.json")

    torchrun --nproc-per-node 8 run.py --model InternVL3-8B-mm --data MMBench_DEV_EN MME

VLMEvalKit is not a dependency: without it the class stands alone (the tests drive it that way).
"""
from __future__ import annotations

import string

from mindspeed_mm.evaluation import prompts

try:  # VLMEvalKit's base class when it is installed, so its run.py treats us like its own models
    from vlmeval.vlm.base import BaseModel as _Base
except Exception:  # not installed, or it fails to import without a GPU
    _Base = object

__all__ = ["MindSpeedInternVL"]

_OPTION_LETTERS = string.ascii_uppercase


class MindSpeedInternVL(_Base):
    """`mm_model`: an inference JSON (checkpoint, tokenizer, dtype, generation_config). Or build one around
    an existing pipeline with `from_pipeline` (no second model load)."""

    INTERLEAVE = False
    INSTALL_REQ = False
    allowed_types = ["text", "image", "video"]

    def __init__(self, mm_model: str | None = None, max_new_tokens: int | None = None, **kwargs):
        if _Base is not object:
            super().__init__()
        self.dump_image_func = None
        self.max_new_tokens = max_new_tokens
        self.pipeline = self.config = None
        if mm_model is not None:
            self._load(mm_model)

    @classmethod
    def from_pipeline(cls, pipeline, config, max_new_tokens: int | None = None) -> MindSpeedInternVL:
        model = cls(max_new_tokens=max_new_tokens)
        model.pipeline, model.config = pipeline, config
        return model

    def _load(self, mm_model: str) -> None:
        import torch.distributed as dist

        from mindspeed_mm.data.tokenizer import load_tokenizer
        from mindspeed_mm.device import apply_device_adaptor
        from mindspeed_mm.distributed import init_distributed
        from mindspeed_mm.inference.cli import resolve_device
        from mindspeed_mm.inference.config import load_inference_config
        from mindspeed_mm.inference.loading import build_runner, inspect_checkpoint, plan_for
        from mindspeed_mm.inference.pipeline import InternVLPipeline

        cfg = load_inference_config(mm_model, need_requests=False)
        info = inspect_checkpoint(cfg.from_pretrained, cfg.model, cfg.source)
        device, _ = resolve_device(cfg.device)
        apply_device_adaptor(force=device == "cpu")
        if not dist.is_initialized():  # VLMEvalKit's run.py has made the group when it runs several copies
            init_distributed(backend="nccl" if device == "cuda" else "gloo")
        runner = build_runner(info, cfg.dtype, plan_for(info, 1, 1))
        tokenizer = load_tokenizer(cfg.tokenizer, info.spec.img_context_token_id)
        self.config = cfg
        self.pipeline = InternVLPipeline(runner, tokenizer, cfg, cfg.seq_length or info.spec.text.max_position_embeddings)

    # ------------------------------------------------------------------------------------- VLMEvalKit API
    def use_custom_prompt(self, dataset) -> bool:
        """As VLMEvalKit's InternVLChat: its own prompts for multiple choice, yes/no and open VQA."""
        return dataset is not None and prompts.benchmark_kind(dataset) in (prompts.MCQ, prompts.YORN, prompts.VQA)

    def build_prompt(self, line, dataset=None) -> list[dict]:
        """The message for a TSV row (a pandas Series or a dict): the prompt text, then its images."""
        kind = prompts.benchmark_kind(dataset or "")
        # question_text drops empty and NaN options and hints itself
        options = {c: line[c] for c in _OPTION_LETTERS if c in line}
        text = prompts.question_text(dataset, kind, line["question"], options, line["hint"] if "hint" in line else None)
        images = self.dump_image(line, dataset) if self.dump_image_func is not None else []
        if isinstance(images, str):
            images = [images]
        return [{"type": "text", "value": text}] + [{"type": "image", "value": p} for p in images]

    def dump_image(self, line, dataset):
        return self.dump_image_func(line)

    def set_dump_image(self, dump_image_func) -> None:
        self.dump_image_func = dump_image_func

    def generate_inner(self, message, dataset=None) -> str:
        from mindspeed_mm.evaluation.runner import prepare

        text = "\n".join(m["value"] for m in message if m["type"] == "text")
        images = [m["value"] for m in message if m["type"] == "image"]
        videos = [m["value"] for m in message if m["type"] == "video"]
        kind = prompts.benchmark_kind(dataset or "")
        cfg, pipeline = self.config, self.pipeline
        if videos:
            n = cfg.num_segments
            text = prompts.image_placeholders(n, "Frame") + text
        else:
            text = prompts.image_placeholders(len(images)) + text
        prepared = prepare(text, dataset or "", kind, pipeline.spec, pipeline.tokenizer, images=images,
                           video=videos[0] if videos else None, num_segments=cfg.num_segments,
                           use_thumbnail=cfg.use_thumbnail, system_message=cfg.system_message,
                           max_new_tokens=self.max_new_tokens, index="0")
        return pipeline.run_batch([prepared])[0]["response"]

    def generate(self, message, dataset=None) -> str:
        if _Base is not object:  # VLMEvalKit's own checks and preprocessing
            return super().generate(message, dataset)
        if isinstance(message, str):
            message = [{"type": "text", "value": message}]
        return self.generate_inner(message, dataset)
