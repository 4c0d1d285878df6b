"""The command line of `pretrain_vlm.py`: the reference scripts' GPT_ARGS, MM_ARGS and OUTPUT_ARGS, as a typed
dataclass.

Every flag is a field of `TrainArgs` (``--lr-decay-style`` is ``lr_decay_style``), so the parser, the defaults
and the checks live in one place. Flags the reference scripts pass that mean nothing to this stack (fusions that
megatron-core does not need, ``--unaligned-linear`` which is always on) are accepted; a flag that cannot take
effect on this device (``--use-flash-attn`` without CUDA) falls back with a one-line warning. Model flags that
repeat the JSON model spec (``--vocab-size``, ``--rotary-base``, ...) must agree with it: the JSON is the one
source of the model's shape and a contradiction is an error, not a silent winner. An unknown flag is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from mindspeed_mm.config.model_flags import REPEATED_FLAGS, ArgumentError, check_model_flags, flag_name

__all__ = ["TrainArgs", "ArgumentError", "parse_args", "build_parser"]


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainArgs:
    # ---- MM_ARGS
    mm_model: str = _f(None, "model JSON spec (reference schema), e.g. examples/internvl3/model_8B.json")
    mm_data: str = _f(None, "data JSON spec (reference schema), e.g. examples/internvl3/data_8B.json")
    mm_tool: Optional[str] = _f(None, "profiler/memory tools JSON (accepted; its switches are all off in the "
                                      "reference scripts)")
    # ---- parallel layout
    tensor_model_parallel_size: int = _f(1, "TP degree; ViT heads need not divide it (unaligned split)")
    pipeline_model_parallel_size: int = _f(1, "PP degree; per-module stage lists come from the model JSON")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(None, "VPP chunks per pipeline rank")
    context_parallel_size: int = _f(1, "CP degree (the LLM's sequence is split; the ViT is not)")
    expert_model_parallel_size: int = _f(1, "EP degree: each rank holds num_experts / EP of a mixture-of-experts "
                                            "LLM's experts; EP ranks come out of the data-parallel ones (TP x CP x "
                                            "DP must be a multiple of ETP x EP)")
    expert_tensor_parallel_size: Optional[int] = _f(None, "the experts' TP degree: 1 or --tensor-model-parallel-size "
                                                          "(default); 1 below TP needs EP > 1")
    context_parallel_algo: str = _f("megatron_cp_algo", "megatron_cp_algo (ring, zigzag) or ulysses_cp_algo",
                                    choices=("megatron_cp_algo", "ulysses_cp_algo"))
    sequence_parallel: bool = _f(False, "sequence parallelism in the TP regions (needs TP > 1)")
    use_distributed_optimizer: bool = _f(False, "shard optimizer state over data-parallel ranks (ZeRO-1)")
    distributed_backend: Optional[str] = _f(None, "nccl or gloo; default: nccl with CUDA, else gloo",
                                            choices=("nccl", "gloo"))
    unaligned_linear: bool = _f(False, "accepted for compatibility: unaligned ViT heads are always supported")
    variable_seq_lengths: bool = _f(False, "accepted: shapes are always exchanged between pipeline stages")
    # ---- batch and sequence
    micro_batch_size: int = _f(1, "samples per micro-batch on one data-parallel rank")
    global_batch_size: Optional[int] = _f(None, "samples per optimizer step over all DP ranks; a multiple of "
                                                "micro-batch-size x DP (default: micro-batch-size x DP)")
    seq_length: int = _f(4096, "maximum tokens per sample (image tokens included); longer samples get fewer "
                               "tiles or are skipped, never cut inside an image")
    num_workers: int = _f(2, "data-loader worker processes per rank")
    seed: int = _f(1234, "seed for initialisation, data order and drop path")
    # ---- model flags that repeat the JSON (checked against it)
    tokenizer_type: Optional[str] = _f(None, "accepted (the tokenizer comes from the data JSON's tokenizer_config)")
    vocab_size: Optional[int] = _f(None, "must equal text_decoder.vocab_size of the model JSON")
    position_embedding_type: Optional[str] = _f(None, "must be rope (checked against the model JSON)")
    rotary_base: Optional[float] = _f(None, "must equal text_decoder.rotary_base of the model JSON")
    normalization: Optional[str] = _f(None, "must equal text_decoder.normalization of the model JSON")
    swiglu: bool = _f(False, "the LLM must be gated SiLU in the model JSON")
    max_position_embeddings: Optional[int] = _f(None, "must equal text_decoder.max_position_embeddings")
    no_masked_softmax_fusion: bool = _f(False, "accepted: fused kernels are never required")
    no_gradient_accumulation_fusion: bool = _f(False, "accepted: gradient-accumulation fusion is always off")
    use_flash_attn: bool = _f(False, "flash attention: attention always goes through torch SDPA, which uses flash "
                                     "kernels on CUDA (on CPU: its CPU kernel, with a warning)")
    trust_remote_code: bool = _f(False, "accepted for compatibility; no code from a checkpoint is ever run")
    use_cpu_initialization: bool = _f(False, "accepted: parameters are always initialised on the host")
    # ---- optimizer and schedule
    optimizer: str = _f("adam", "adam (decoupled weight decay: AdamW) or sgd", choices=("adam", "sgd"))
    lr: float = _f(1e-5, "peak learning rate")
    min_lr: float = _f(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = _f("cosine", "constant, linear, cosine or inverse-square-root",
                             choices=("constant", "linear", "cosine", "inverse-square-root"))
    lr_decay_iters: Optional[int] = _f(None, "iterations of decay (default: train-iters)")
    lr_warmup_iters: int = _f(0, "linear warm-up iterations")
    lr_warmup_fraction: Optional[float] = _f(None, "warm-up as a fraction of the decay iterations")
    lr_warmup_init: float = _f(0.0, "learning rate at the start of warm-up")
    weight_decay: float = _f(0.01, "decoupled weight decay (not applied to biases and norms)")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    sgd_momentum: float = _f(0.9, "SGD momentum")
    bf16: bool = _f(False, "bf16 parameters with fp32 main parameters and gradients")
    fp16: bool = _f(False, "fp16 parameters with fp32 main parameters and dynamic loss scaling")
    loss_scale: Optional[float] = _f(None, "static loss scale for fp16 (default: dynamic)")
    initial_loss_scale: float = _f(2.0 ** 32, "initial dynamic loss scale")
    min_loss_scale: float = _f(1.0, "smallest dynamic loss scale")
    loss_scale_window: int = _f(1000, "iterations without overflow before the loss scale grows")
    hysteresis: int = _f(2, "overflows tolerated before the loss scale shrinks")
    train_iters: int = _f(None, "optimizer steps to train for (required)")
    exit_interval: Optional[int] = _f(None, "stop (after saving) once the iteration is a multiple of this")
    # ---- loss
    calculate_per_sample_loss: bool = _f(False, "each sample's token mean, then the mean over samples")
    calculate_per_token_loss: bool = _f(False, "sum over the global batch's target tokens / their count "
                                               "(independent of how the batch is split into micro-batches)")
    loss_reduction: Optional[str] = _f(None, "InternVL's loss_reduction: token (the default, or per token with "
                                             "--calculate-per-token-loss), sample (= --calculate-per-sample-loss) or "
                                             "square (each target weighted by 1/sqrt of its sample's target count)",
                                       choices=("token", "sample", "square"))
    # ---- preference optimization (training/preference.py)
    training_mode: str = _f("sft", "sft; dpo (InternVL's DPO: sigmoid loss); mpo (InternVL3's MPO: loss types "
                                   "sigmoid,bco_pair weighted 0.8,0.2 plus the generation term, rpo_alpha 1)",
                            choices=("sft", "dpo", "mpo"))
    loss_type: Optional[str] = _f(None, "preference loss types, comma-separated (TRL's: sigmoid, bco_pair, hinge, "
                                        "ipo); default: the training mode's")
    loss_weight: Optional[str] = _f(None, "a weight per --loss-type, comma-separated (default: the mode's)")
    beta: float = _f(0.1, "DPO's beta: the strength of the reference log-ratio")
    label_smoothing: float = _f(0.0, "the sigmoid loss's label smoothing (conservative DPO)")
    rpo_alpha: Optional[float] = _f(None, "weight of the generation loss (token-mean NLL of the chosen answers); "
                                          "default: mpo 1.0, dpo off")
    reference_model: Optional[str] = _f(None, "the reference: copy (a frozen copy at the run's layout), "
                                              "precomputed (its log-probabilities from a first pass, stored in "
                                              "--reference-logps), adapters_off (LoRA: the base without the "
                                              "adapters); default: adapters_off with LoRA, else copy",
                                        choices=("copy", "precomputed", "adapters_off"))
    reference_logps: Optional[str] = _f(None, "precomputed reference log-probabilities (JSON); default "
                                              "<save>/reference_logps.json; written by the first pass if absent")
    loss_reduction_all_gather: bool = _f(False, "InternVL's loss_reduction_all_gather: each micro-batch's denominator "
                                                "(targets, samples or weights' sum) averaged over data-parallel ranks")
    # ---- recompute (the JSON's per-module settings win; these fill modules that set none)
    recompute_granularity: Optional[str] = _f(None, "full or selective, for modules whose JSON sets none",
                                              choices=("full", "selective"))
    recompute_method: Optional[str] = _f(None, "uniform or block (with full)", choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = _f(None, "layers per recompute group (with full)")
    # ---- LoRA and freezing (InternVL's flags in Megatron's style; applied to the model JSON, which must agree)
    use_llm_lora: Optional[int] = _f(None, "LoRA of this rank on the LLM's linears (0: none); the LLM's base weights "
                                           "then freeze unless text_decoder.freeze is false")
    use_backbone_lora: Optional[int] = _f(None, "LoRA of this rank on the ViT's linears (0: none)")
    lora_alpha: Optional[float] = _f(None, "LoRA alpha of the adapters the flags above add (default: 2 x rank)")
    lora_dropout: Optional[float] = _f(None, "dropout on the adapters' input (default: 0.05, InternVL's)")
    freeze_llm: bool = _f(False, "freeze the LLM's own weights (text_decoder.freeze true)")
    freeze_backbone: bool = _f(False, "freeze the ViT's own weights (image_encoder.vision_encoder.freeze true)")
    freeze_mlp: bool = _f(False, "freeze the projector (image_encoder.vision_projector.freeze true)")
    unfreeze_vit_layers: Optional[int] = _f(None, "train the ViT's last N layers (its unfreeze_last_layers); -N means "
                                                  "the same (InternVL's spelling; InternVL's positive N, layers[N:], "
                                                  "is the last num_layers - N here)")
    unfreeze_lm_head: bool = _f(False, "train the LLM's output layer (text_decoder.unfreeze_output_layer)")
    # ---- checkpoints
    load: Optional[str] = _f(None, "checkpoint to start from: an mm-convert output or a directory this loop saved")
    load_adapter: Optional[str] = _f(None, "adapters to load on top of --load: a LoRA save of this loop or a PEFT "
                                           "adapter directory (its LoRA is the run's when the model JSON sets none)")
    save: Optional[str] = _f(None, "directory to save iter_XXXXXXX checkpoints into")
    save_interval: Optional[int] = _f(None, "save every this many iterations (and at the end)")
    ckpt_format: str = _f("torch", "torch: per-rank model_optim_rng.pt files in model space (reshardable)",
                          choices=("torch",))
    no_load_optim: bool = _f(False, "do not load the optimizer state and LR schedule")
    no_load_rng: bool = _f(False, "do not load the RNG states")
    no_save_optim: bool = _f(False, "do not save the optimizer state")
    no_save_rng: bool = _f(False, "do not save the RNG states")
    finetune: bool = _f(False, "load only the weights: iteration, optimizer, schedule and data position restart")
    # ---- logging
    log_interval: int = _f(1, "iterations between log lines")
    log_tps: bool = _f(False, "add MindSpeed-MM's `tokens per sample` to the log line: the mean padded length of "
                              "the global batch's samples, image tokens included")
    metrics_file: Optional[str] = _f(None, "append one JSON record per log line to this file")
    tensorboard_dir: Optional[str] = _f(None, "write TensorBoard scalars here (needs the tensorboard package)")
    eval_interval: Optional[int] = _f(None, "validation loss every this many iterations and after the last one, on the "
                                            "data JSON's valid_data_path (without one: accepted, no effect, as in "
                                            "Megatron)")
    eval_iters: int = _f(100, "global batches of the validation set per evaluation, the same ones each time from "
                              "its start (wrapping around past its end)")
    peak_tflops: Optional[float] = _f(None, "device peak TFLOP/s for MFU (default: known GPUs' dense bf16 peak)")

    # ------------------------------------------------------------------------------------------------
    @property
    def params_dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def check(self) -> None:
        """Checks that need no model or process group."""
        if self.mm_model is None or self.mm_data is None:
            raise ArgumentError("--mm-model and --mm-data are required")
        if self.train_iters is None or self.train_iters < 1:
            raise ArgumentError(f"--train-iters must be given and >= 1, got {self.train_iters}")
        if self.bf16 and self.fp16:
            raise ArgumentError("--bf16 and --fp16 are mutually exclusive")
        if self.calculate_per_sample_loss and self.calculate_per_token_loss:
            raise ArgumentError("--calculate-per-sample-loss and --calculate-per-token-loss are mutually exclusive")
        clash = {"sample": self.calculate_per_token_loss, "square": self.calculate_per_token_loss
                 or self.calculate_per_sample_loss, "token": self.calculate_per_sample_loss}
        if self.loss_reduction and clash[self.loss_reduction]:
            other = "--calculate-per-token-loss" if self.calculate_per_token_loss else "--calculate-per-sample-loss"
            raise ArgumentError(f"--loss-reduction {self.loss_reduction} and {other} are mutually exclusive")
        if self.loss_reduction_all_gather and self.calculate_per_token_loss:
            raise ArgumentError("--loss-reduction-all-gather has no meaning with --calculate-per-token-loss (already "
                                "one count over the global batch)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        for name in ("micro_batch_size", "log_interval", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.expert_tensor_parallel_size is not None and self.expert_tensor_parallel_size < 1:
            raise ArgumentError(f"--expert-tensor-parallel-size must be >= 1, got {self.expert_tensor_parallel_size}")
        if self.save_interval is not None and self.save_interval < 1:
            raise ArgumentError(f"--save-interval must be >= 1, got {self.save_interval}")
        for name in ("eval_interval", "eval_iters"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ArgumentError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ArgumentError(f"--num-workers must be >= 0, got {self.num_workers}")
        for name in ("use_llm_lora", "use_backbone_lora"):
            rank = getattr(self, name)
            if rank is not None and rank < 0:
                raise ArgumentError(f"{flag_name(name)} must be >= 0 (a LoRA rank; 0: no LoRA), got {rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ArgumentError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise ArgumentError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain_vlm.py", allow_abbrev=False,
                                description="Finetune InternVL3 with megatron-core (reference-compatible flags).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainArgs):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        if f.type in ("bool", bool):
            p.add_argument(flag_name(f.name), dest=f.name, action="store_true", help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
                "Optional[str]": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        p.add_argument(flag_name(f.name), dest=f.name, type=kind, default=f.default, help=help_text, **meta)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainArgs:
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    args = TrainArgs(**vars(ns))
    args.check()
    return args


def reconcile_with_spec(args: TrainArgs, spec, cuda: bool):
    """Check the model flags that repeat the JSON spec, fill per-module recompute settings the JSON leaves
    unset, apply the LoRA and freeze flags (`apply_training_flags`), and say which flags fall back on this
    device. Returns (spec, warnings)."""
    t = spec.text
    check_model_flags(spec, args.mm_model, {name: getattr(args, name) for name in REPEATED_FLAGS}, args.swiglu)
    if t.params_dtype != args.params_dtype_name:
        raise ArgumentError(f"text_decoder.params_dtype {t.params_dtype!r} of {args.mm_model} needs "
                            f"{'--' + t.params_dtype if t.params_dtype != 'fp32' else 'neither --bf16 nor --fp16'}"
                            f" (got {'--' + args.params_dtype_name if args.params_dtype_name != 'fp32' else 'fp32'})")
    if args.recompute_granularity is not None:
        fill = dict(recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                    recompute_num_layers=args.recompute_num_layers)
        if spec.text.recompute_granularity is None:
            spec = dataclasses.replace(spec, text=dataclasses.replace(spec.text, **fill))
        if spec.vision.recompute_granularity is None:
            spec = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, **fill))
    return apply_training_flags(args, spec), device_warnings(args, cuda)


_LORA_DEFAULT_DROPOUT = 0.05  # InternVL's wrap_llm_lora / wrap_backbone_lora
_MODULE_PATHS = {"vision": "image_encoder.vision_encoder", "projector": "image_encoder.vision_projector",
                 "text": "text_decoder"}


def apply_training_flags(args: TrainArgs, spec):
    """The spec with InternVL's LoRA and freeze flags applied. A flag adds what the JSON leaves unset; where
    the JSON says something else (another LoRA, ``"freeze": false`` against ``--freeze-*``) it is an error
    naming both, and where it says the same, nothing changes."""
    src = args.mm_model
    lora_flags = {"vision": "use_backbone_lora", "text": "use_llm_lora"}
    for module, dest in lora_flags.items():
        rank, m, path = getattr(args, dest), getattr(spec, module), _MODULE_PATHS[module]
        if rank is None:
            continue
        flag = f"{flag_name(dest)} {rank}"
        if m.lora is None:
            if rank:
                alpha = float(args.lora_alpha) if args.lora_alpha is not None else 2.0 * rank
                dropout = args.lora_dropout if args.lora_dropout is not None else _LORA_DEFAULT_DROPOUT
                m = dataclasses.replace(m, lora={"rank": rank, "alpha": alpha, "dropout": dropout})
                spec = dataclasses.replace(spec, **{module: m})
            continue
        if rank != m.lora.rank:
            raise ArgumentError(f"{flag}{' (no LoRA)' if rank == 0 else ''} contradicts {path}.lora.rank "
                                f"{m.lora.rank} of {src}")
    for dest, key in (("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        value = getattr(args, dest)
        if value is None:
            continue
        with_lora = [k for k in lora_flags if getattr(spec, k).lora is not None]
        if not with_lora:
            raise ArgumentError(f"{flag_name(dest)} needs --use-llm-lora or --use-backbone-lora (or a lora in {src})")
        for module in with_lora:
            have = getattr(getattr(spec, module).lora, key)
            if float(value) != float(have):
                raise ArgumentError(f"{flag_name(dest)} {value} contradicts {_MODULE_PATHS[module]}.lora.{key} "
                                    f"{have} of {src}")
    for dest, module in (("freeze_llm", "text"), ("freeze_backbone", "vision"), ("freeze_mlp", "projector")):
        if not getattr(args, dest):
            continue
        m = getattr(spec, module)
        if m.freeze is False:
            raise ArgumentError(f"{flag_name(dest)} contradicts {_MODULE_PATHS[module]}.freeze false of {src}")
        spec = dataclasses.replace(spec, **{module: dataclasses.replace(m, freeze=True)})
    n = args.unfreeze_vit_layers
    if n:
        v, key = spec.vision, f"{_MODULE_PATHS['vision']}.unfreeze_last_layers"
        if abs(n) > v.num_layers:
            raise ArgumentError(f"--unfreeze-vit-layers {n}: the ViT has {v.num_layers} layers "
                                f"({_MODULE_PATHS['vision']}.num_layers of {src})")
        if v.unfreeze_last_layers not in (0, abs(n)):
            raise ArgumentError(f"--unfreeze-vit-layers {n} contradicts {key} {v.unfreeze_last_layers} of {src}")
        spec = dataclasses.replace(spec, vision=dataclasses.replace(v, unfreeze_last_layers=abs(n)))
    if args.unfreeze_lm_head:
        spec = dataclasses.replace(spec, text=dataclasses.replace(spec.text, unfreeze_output_layer=True))
    return spec


def device_warnings(args: TrainArgs, cuda: bool) -> list[str]:
    """The flags that fall back on this device."""
    if args.use_flash_attn and not cuda:
        return ["--use-flash-attn: no CUDA flash kernel here; attention runs through torch SDPA's CPU kernel"]
    return []
