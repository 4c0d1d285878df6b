"""`mm-convert`: the checkpoint converter's command line (jsonargparse, the reference's syntax).

    mm-convert InternVLConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \\
        --cfg.parallel_config.llm_pp_layers [[6,8,8,6]] --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \\
        --cfg.parallel_config.tp_size 2
    mm-convert InternVLConverter mm_to_hf --cfg.mm_dir OUT --cfg.save_hf_dir HF2 [--cfg.hf_format native]
    mm-convert InternVLConverter mm_to_hf --cfg.mm_dir LORA_SAVE --cfg.save_hf_dir ADAPTER --cfg.lora_format peft
    mm-convert InternVLConverter resplit --cfg.mm_dir OUT --cfg.save_mm_dir OUT2 --cfg.parallel_config.tp_size 4
    mm-convert InternVLConverter mm_to_hf --cfg.mm_dir MINDSPEED_OUT --cfg.hf_config.hf_dir HF --cfg.save_hf_dir HF2
    mm-convert InternVLConverter hf_to_mm ... --cfg.target_format mindspeed   # MindSpeed-MM's own rank files

Every subcommand also takes `--config FILE` (YAML/JSON with a `cfg:` section) and `--print_config`. The
options are the dataclasses below (their `help` metadata is what `--help` prints); the work is done by
`mindspeed_mm.checkpoint.convert`.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from mindspeed_mm.checkpoint import convert
from mindspeed_mm.errors import UserError, run_main
from mindspeed_mm.checkpoint.convert import ConvertSummary, DryRunReport
from mindspeed_mm.config.parallel import ParallelConfig

# No `if TYPE_CHECKING:` block here: jsonargparse executes those of the module that defines the CLI's
# dataclasses when it resolves their annotations, which would import torch.

__all__ = ["HFConfig", "ParallelConfig", "HFToMMConfig", "MMToHFConfig", "ResplitConfig", "hf_to_mm", "mm_to_hf",
           "resplit", "main"]


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


_DIRECT_IO_HELP = ("Write rank files with O_DIRECT (past the page cache) where the filesystem takes it; False: "
                   "ordinary buffered writes.")
_WORKERS_HELP = ("Rank files written at once (0: one per CPU core, at most 8), each by two or more threads "
                 "holding an 8 MiB chunk apiece.")
_TRUST_HELP = ("Accepted for compatibility and ignored: config.json is read as data and no code shipped with a "
               "checkpoint is ever executed.")


@dataclass
class HFConfig:
    hf_dir: Optional[str] = _h(
        "HF checkpoint directory (config.json + *.safetensors, either InternVL3 format). hf_to_mm: the source. "
        "mm_to_hf: where config.json, the tokenizer and other non-weight files are taken from (default: the "
        "source directory recorded in the MM metadata).", default=None)


_TARGET_HELP = ("TP convention of the rank files: 'mm' (ours) or 'mindspeed' (exactly MindSpeed-MM's: projector "
                "whole on every TP rank, vocabulary in unpadded uneven row blocks; our metadata file is added).")


@dataclass
class HFToMMConfig:
    mm_dir: Optional[str] = _h("Output MM checkpoint directory (must not exist or be empty unless overwrite); "
                               "required unless dry_run.", default=None)
    hf_config: HFConfig = _h("The HF source.", default_factory=HFConfig)
    parallel_config: ParallelConfig = _h("The MM layout to write.", default_factory=ParallelConfig)
    target_format: str = _h(_TARGET_HELP, default="mm")
    trust_remote_code: bool = _h(_TRUST_HELP, default=False)
    overwrite: bool = _h("Replace a non-empty output directory (only once the new one is complete).",
                         default=False)
    progress: bool = _h("Show a progress bar.", default=True)
    workers: int = _h(_WORKERS_HELP, default=0)
    direct_io: bool = _h(_DIRECT_IO_HELP, default=True)
    dry_run: bool = _h("Write nothing and read no weights: print the size of every rank file the layout would "
                       "get, from the model's shapes (hf_config.hf_dir needs only config.json; or model_json).",
                       default=False)
    model_json: Optional[str] = _h("dry_run only: take the model from this model JSON (the reference schema) "
                                   "instead of hf_config.hf_dir's config.json.", default=None)


@dataclass
class MMToHFConfig:
    mm_dir: str = _h("Input MM checkpoint directory (written by mm-convert, or by MindSpeed-MM: its conversion or "
                     "training save, read with hf_config.hf_dir).")
    save_hf_dir: str = _h("Output HF checkpoint directory (must not exist or be empty unless overwrite).")
    hf_format: Optional[str] = _h("'native' (transformers InternVLForConditionalGeneration) or 'original' "
                                  "(InternVLChatModel). Default: the format the MM checkpoint was made from.",
                                  default=None)
    hf_config: HFConfig = _h("Where the config and tokenizer come from (required for a checkpoint without "
                             "mm-convert's metadata).", default_factory=HFConfig)
    parallel_config: Optional[ParallelConfig] = _h(
        "The MM checkpoint's layout. Optional: read from its metadata, or off its files when it has none; when "
        "given, it is checked against that.", default=None)
    max_shard_size: Union[int, str] = _h("Largest safetensors file to write, bytes or e.g. '5GB', '500MB'.",
                                         default="5GB")
    lora_format: str = _h(
        "For an adapter save (a LoRA run's save: adapters and trainable parameters on a frozen base its metadata "
        "names). 'merged': the full HF checkpoint, every adapted weight W + alpha/r B A (fp32, cast to W's "
        "dtype), the trainable parameters from the save, the rest from the base (its fingerprint checked). "
        "'peft': a PEFT LoRA adapter directory for transformers' native InternVL (adapter_config.json, "
        "adapter_model.safetensors) whose base_model_name_or_path is hf_config.hf_dir or the base's source HF "
        "directory (checked against the base's fingerprint); refused when the save also trains non-adapter "
        "parameters.", default="merged")
    trust_remote_code: bool = _h(_TRUST_HELP, default=False)
    overwrite: bool = _h("Replace a non-empty output directory.", default=False)
    progress: bool = _h("Show a progress bar.", default=True)


@dataclass
class ResplitConfig:
    mm_dir: str = _h("Input MM checkpoint directory (written by mm-convert, or by MindSpeed-MM with "
                     "hf_config.hf_dir).")
    save_mm_dir: str = _h("Output MM checkpoint directory (must not exist or be empty unless overwrite).")
    parallel_config: ParallelConfig = _h("The new layout.", default_factory=ParallelConfig)
    target_format: str = _h(_TARGET_HELP, default="mm")
    hf_config: HFConfig = _h("The model config, for an input without mm-convert's metadata (a MindSpeed-MM "
                             "checkpoint).", default_factory=HFConfig)
    overwrite: bool = _h("Replace a non-empty output directory.", default=False)
    progress: bool = _h("Show a progress bar.", default=True)
    workers: int = _h(_WORKERS_HELP, default=0)
    direct_io: bool = _h(_DIRECT_IO_HELP, default=True)


def _note_trust(cfg) -> None:
    if cfg.trust_remote_code:
        print("mm-convert: note: trust_remote_code is ignored; config.json is read as data and no checkpoint "
              "code is run", file=sys.stderr)


def hf_to_mm(cfg: HFToMMConfig) -> Union[ConvertSummary, DryRunReport]:
    if cfg.dry_run:
        return convert.dry_run_from_files(cfg.hf_config.hf_dir, cfg.model_json, cfg.parallel_config,
                                          target_format=cfg.target_format)
    if cfg.model_json:
        raise UserError("model_json is only read by a dry run (--cfg.dry_run true); a conversion takes the model "
                        "from hf_config.hf_dir")
    if not cfg.mm_dir:
        raise UserError("mm_dir is required: the output MM checkpoint directory (--cfg.mm_dir DIR)")
    if not cfg.hf_config.hf_dir:
        raise UserError("hf_config.hf_dir is required: the HF checkpoint to convert (--cfg.hf_config.hf_dir DIR)")
    _note_trust(cfg)
    return convert.hf_to_mm(cfg.hf_config.hf_dir, cfg.mm_dir, cfg.parallel_config, overwrite=cfg.overwrite,
                            progress=cfg.progress, workers=cfg.workers, direct_io=cfg.direct_io,
                            target_format=cfg.target_format)


def mm_to_hf(cfg: MMToHFConfig) -> ConvertSummary:
    _note_trust(cfg)
    return convert.mm_to_hf(cfg.mm_dir, cfg.save_hf_dir, cfg.hf_format, cfg.hf_config.hf_dir, cfg.parallel_config,
                            max_shard_size=cfg.max_shard_size, overwrite=cfg.overwrite, progress=cfg.progress,
                            lora_format=cfg.lora_format)


def resplit(cfg: ResplitConfig) -> ConvertSummary:
    return convert.resplit(cfg.mm_dir, cfg.save_mm_dir, cfg.parallel_config, overwrite=cfg.overwrite,
                           progress=cfg.progress, workers=cfg.workers, direct_io=cfg.direct_io,
                           target_format=cfg.target_format, hf_dir=cfg.hf_config.hf_dir)


CONVERTER = "InternVLConverter"
COMMANDS = {
    "hf_to_mm": (HFToMMConfig, hf_to_mm,
                 "Convert an HF InternVL3 checkpoint (native or original format) to MM shards for a TP/PP/VPP layout."),
    "mm_to_hf": (MMToHFConfig, mm_to_hf,
                 "Convert MM shards back to an HF checkpoint (sharded safetensors, config, tokenizer)."),
    "resplit": (ResplitConfig, resplit,
                "Reshard an MM checkpoint to another TP/PP/VPP layout directly (never through HF)."),
}


def _field_help(cls, prefix: str, out: dict[str, str]) -> None:
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if "help" in f.metadata:
            out[key] = f.metadata["help"]
        sub = f.type if isinstance(f.type, type) else None
        if sub is None:  # resolve string / Optional annotations
            import typing
            hints = typing.get_type_hints(cls)
            sub = hints[f.name]
            args = [a for a in typing.get_args(sub) if a is not type(None)]
            sub = args[0] if typing.get_origin(sub) is typing.Union and len(args) == 1 else sub
        if dataclasses.is_dataclass(sub):
            _field_help(sub, key, out)


def build_parser(only: Optional[str] = None):
    """The CLI; with `only`, just that command's branch (building all three costs ~0.27 s of a conversion
    that may itself take ~3 s)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    # exit_on_error=False: a parse error is raised (see _parse_error) instead of printing the whole usage
    root = ArgumentParser(prog="mm-convert", exit_on_error=False,
                          description="InternVL3 checkpoint converter: HF <-> MM (Megatron) and MM resharding; "
                          "streaming, bit-exact, atomic.")
    conv = ArgumentParser(description=f"{CONVERTER}: InternVL3 (InternViT + MLP projector + Qwen2 LLM).")
    root_subs = root.add_subcommands(dest="converter")
    root_subs.add_subcommand(CONVERTER, conv, help="The InternVL3 converter (hf_to_mm, mm_to_hf, resplit).")
    subs = conv.add_subcommands(dest="command")
    for name, (cls, _, text) in COMMANDS.items():
        if only is not None and name != only:
            continue
        p = ArgumentParser(description=text)
        p.add_argument("--config", action=ActionConfigFile, help="A YAML/JSON file of options (a 'cfg:' section).")
        p.add_argument("--cfg", type=cls, required=True, help=f"{cls.__name__} options.")
        helps: dict[str, str] = {}
        _field_help(cls, "cfg", helps)
        for action in p._actions:  # jsonargparse adds the type and default itself
            if action.dest in helps:
                action.help = helps[action.dest]
        for group in p._action_groups:  # nested configs: title them by their option prefix
            dests = [a.dest for a in getattr(group, "_group_actions", [])]
            if group.title and group.title.startswith("<class") and dests:
                prefix = min(dests, key=len)
                group.title = f"{prefix} options" + (f" ({helps[prefix]})" if prefix in helps else "")
        subs.add_subcommand(name, p, help=text)
    return root


def _parse_error(message: str, command: Optional[str]) -> str:
    """jsonargparse's report of a bad option, several lines long, as one short line naming the option."""
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if m:
        lines = [line.strip(" -") for line in m.group(2).splitlines() if line.strip()]
        # A Union's report lists every alternative's complaint; the first is about the type that was meant.
        why = next((line for line in lines if line.startswith("Expected") and "NoneType" not in line), lines[0])
        given = next((line for line in lines if line.startswith("Given value:")), None)
        message = f"--{m.group(1)}: {why}" + (f" ({given})" if given and "Got value" not in why else "")
    message = re.sub(r"Expected an? <class '(\w+)'>", r"expected \1", message)
    message = re.sub(r"\.? ?(Got|Given) value:", ", got", message).replace("(, got", "(got")
    message = re.sub(rf"\b{CONVERTER}\.\w+\.cfg\.", "--cfg.", message)  # required options, by their dest
    return f"{message} (see mm-convert {f'{CONVERTER} {command} ' if command else ''}--help)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("mm-convert", _main, argv)


def _main(argv: list[str]) -> int:
    named = argv[1] if len(argv) > 1 and argv[0] == CONVERTER and argv[1] in COMMANDS else None
    parser = build_parser(only=named)
    try:
        ns = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise UserError(_parse_error(str(e), named)) from e
    sub = ns[ns.converter]
    cls, func, _ = COMMANDS[sub.command]
    inst = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cfg = inst(ns)[ns.converter][sub.command].cfg
    if not isinstance(cfg, cls):  # older jsonargparse: a namespace
        cfg = cls(**vars(cfg))
    summary = func(cfg)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
