"""Typed data spec: the ``data_*.json`` a user hands us, in the reference (MindSpeed-MM) schema.

::

    {"dataset_param": {"dataset_type": "multimodal",
                       "basic_parameters": {"data_path", "data_folder", "repeat_time"} | [ {...}, ... ],
                       "preprocess_parameters": {"image_reader_type", "train_pipeline": {"image": [...]}},
                       "tokenizer_config": {"hub_backend", "autotokenizer_name", "from_pretrained", ...},
                       "template_name": "internvl2_5", "image_size", "patch_size", "down_sample_ratio",
                       "dynamic_image_size", "use_thumbnail", "min/max_dynamic_patch",
                       "min/max_num_frame", "sampling_method", ...},
     "dataloader_param": {"dataloader_mode": "sampler", "shuffle", "drop_last", "pin_memory",
                          "sampler_type", "collate_param": {"model_name": "internvl", "pad_id"}}}

Rules: values are type-checked (``bool`` is not an ``int``); a key nobody knows is an error naming its path,
because a misspelt key silently falling back to a default is the most expensive kind of config bug. Keys the
reference carries without effect here are accepted: ``use_text_processer``, ``image_reader_type`` and the torchvision
``train_pipeline`` (our tiling is bit-exact with InternVL's PIL path; only ``norm_fun``'s mean/std and the
presence of ``Pad2Square`` are read, and a ``Resize`` must agree with ``image_size``). Every error is a
:class:`DataSpecError` (the one :class:`~mindspeed_mm.config.validate.ConfigError` of every config file)
naming the key path and the file. Relative paths in the JSON are kept as written (resolved against the working
directory, as in the reference scripts).

Validation set: ``valid_data_path`` (a ``.json``/``.jsonl`` of training's shape) in a ``basic_parameters`` entry,
with ``valid_data_folder`` (default: that entry's ``data_folder``), or, with ``meta_path``, the same two keys in
``dataset_param`` beside it. Several entries may each name one; the set is their files in order. It is read in
file order with the entry's tiling limit and without ``data_augment`` (``DatasetParam.valid_parameters``).

Preference pairs (``data/preference.py``): ``dataset_kind`` ``"preference"`` makes every record an MMPR pair
``{question, chosen, rejected, image?/video?}``, ``"sft"`` a conversation; absent, the records decide.

Mixtures (``data/mixture.py``): ``basic_parameters`` is one dataset or a list, or ``meta_path`` names InternVL's
meta JSON ``{name: {root, annotation, data_augment, max_dynamic_patch, repeat_time, length}}`` instead. Each
dataset keeps ``floor(repeat_time x records)`` samples; ``max_dynamic_patch`` overrides the tiling limit for its
images; ``group_by_length`` orders each global batch as InternVL's LengthGroupedSampler does.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mindspeed_mm.config.validate import ConfigError, Section, check_value, read_json
from mindspeed_mm.data.tokenizer import TokenizerConfig
from mindspeed_mm.data.tiling import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DATASET_KINDS",
    "SAMPLING_PATTERN",
    "BasicParameters",
    "CollateParam",
    "DataSpec",
    "DataSpecError",
    "DataloaderParam",
    "DatasetParam",
    "PACKING_ALGORITHMS",
    "PackingParam",
    "TokenizerConfig",
    "data_spec_from_dict",
    "load_data_spec",
    "tokenizer_config_from_dict",
]

# "rand", "middle", or "fps<rate>" (frames sampled at <rate> frames per second, e.g. "fps0.5").
SAMPLING_PATTERN = re.compile(r"^(rand|middle|fps(\d+(\.\d*)?|\.\d+))$")

DataSpecError = ConfigError  # the name this module's callers and users know

# dataset_param.dataset_kind: SFT conversations or preference pairs (data/preference.py); absent: the records say
DATASET_KINDS = ("sft", "preference")


@dataclass(frozen=True)
class BasicParameters:
    """One dataset of the mixture: an annotation file. It gives ``floor(repeat_time x records)`` samples
    (see :mod:`mindspeed_mm.data.mixture`). ``data_folder`` null: paths are relative to the file's folder.
    ``max_dynamic_patch`` null: the ``dataset_param`` one. ``data_augment``: InternVL's random JPEG
    re-compression of each tile (quality 75..100, seeded per sample). ``length``: the meta JSON's record
    count, informational (a mismatch is logged). ``key``/``source``: where it was written, for messages."""

    data_path: str
    data_folder: str | None = None
    repeat_time: float = 1.0
    name: str = ""
    max_dynamic_patch: int | None = None
    data_augment: bool = False
    length: int | None = None
    key: str = field(default="", compare=False)
    source: str | None = field(default=None, compare=False)


# ---- packing (InternVL's PackedDataset fields; data/packing.py runs them) ------------------------------------

PACKING_ALGORITHMS = ("greedy", "best_fit")  # "greedy": InternVL's buffer algorithm; "best_fit": ours (tighter)


@dataclass(frozen=True)
class PackingParam:
    """``use_packed_ds``: pack whole samples into rows of at most ``max_packed_tokens`` tokens and
    ``num_images_expected`` tiles (InternVL's names and defaults); ``max_buffer_size``: open packs kept before
    the oldest-fullest is emitted; ``strict_mode``: pad each pack's tiles to ``num_images_expected`` with zero
    tiles whose ``image_flags`` are 0; ``replacement``: packs continue across epoch boundaries (false: each
    epoch's buffer is flushed at its end, as InternVL's loader does when its datasets run out);
    ``allow_overflow``: a sample over either limit becomes a pack of its own (false: dropped and counted);
    ``packing_algorithm``: one of :data:`PACKING_ALGORITHMS` (ours, not InternVL's)."""

    use_packed_ds: bool = False
    max_packed_tokens: int = 8192
    num_images_expected: int = 40
    max_buffer_size: int = 20
    strict_mode: bool = True
    replacement: bool = False
    allow_overflow: bool = False
    packing_algorithm: str = "best_fit"


def _packing_param(s: Section) -> PackingParam:
    d = PackingParam()
    out = PackingParam(
        use_packed_ds=s.get("use_packed_ds", bool, d.use_packed_ds),
        max_packed_tokens=s.get("max_packed_tokens", int, d.max_packed_tokens, minimum=1),
        num_images_expected=s.get("num_images_expected", int, d.num_images_expected, minimum=0),
        max_buffer_size=s.get("max_buffer_size", int, d.max_buffer_size, minimum=1),
        strict_mode=s.get("strict_mode", bool, d.strict_mode),
        replacement=s.get("replacement", bool, d.replacement),
        allow_overflow=s.get("allow_overflow", bool, d.allow_overflow),
        packing_algorithm=s.get("packing_algorithm", str, d.packing_algorithm, choices=PACKING_ALGORITHMS),
    )
    return out

# ---- end of packing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetParam:
    basic_parameters: tuple[BasicParameters, ...]
    tokenizer_config: TokenizerConfig
    dataset_type: str = "multimodal"
    template_name: str = "internvl2_5"
    image_size: int = 448
    patch_size: int = 14
    down_sample_ratio: float = 0.5
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    min_num_frame: int = 4
    max_num_frame: int = 12
    sampling_method: str = "rand"
    norm_mean: tuple[float, float, float] = IMAGENET_MEAN
    norm_std: tuple[float, float, float] = IMAGENET_STD
    # The pipeline's Pad2Square: pads images that are not tiled (video frames, dynamic_image_size false) to a
    # square of the mean colour before resizing, as the reference does; tiles are square already.
    pad_to_square: bool = False
    group_by_length: bool = False
    meta_path: str | None = None
    # A truncated image file is trained on as InternVL does (PIL's LOAD_TRUNCATED_IMAGES) and counted in the
    # log; true skips its sample instead (reason truncated_image).
    skip_truncated_images: bool = False
    packing: PackingParam = PackingParam()
    # the validation set's files (``valid_data_path``), each read whole and in order; empty: none
    valid_parameters: tuple[BasicParameters, ...] = ()
    # one of DATASET_KINDS, or None: each file's first records decide (data/preference.py)
    dataset_kind: str | None = None

    @property
    def tokens_per_tile(self) -> int:
        return int((self.image_size // self.patch_size) ** 2 * self.down_sample_ratio ** 2)


@dataclass(frozen=True)
class CollateParam:
    pad_id: int
    model_name: str = "internvl"


@dataclass(frozen=True)
class DataloaderParam:
    collate_param: CollateParam
    dataloader_mode: str = "sampler"
    shuffle: bool = True
    drop_last: bool = True
    pin_memory: bool = False
    sampler_type: str = "BaseRandomBatchSampler"


@dataclass(frozen=True)
class DataSpec:
    dataset_param: DatasetParam
    dataloader_param: DataloaderParam
    source: str | None = field(default=None, compare=False)

    @property
    def tokenizer_config(self) -> TokenizerConfig:
        return self.dataset_param.tokenizer_config


def _check_annotation_name(key: str, value: str) -> None:
    if not value:
        raise DataSpecError(key, "must not be empty")
    if not Path(value).suffix.lower() in (".json", ".jsonl"):
        raise DataSpecError(key, f"{value!r}: only .json (a list) and .jsonl files are read")


def _valid(s: Section, folder: str | None, max_patch: int | None, key: str) -> BasicParameters | None:
    """The validation file named in section ``s`` (``valid_data_path``, ``valid_data_folder``), or None.
    Never augmented and never repeated: each evaluation must see the same pixels and samples."""
    valid = s.get("valid_data_path", str, None, nullable=True)
    valid_folder = s.get("valid_data_folder", str, None, nullable=True)
    if valid is None:
        if valid_folder is not None:
            raise DataSpecError(s.key("valid_data_folder"), "given without valid_data_path")
        return None
    _check_annotation_name(s.key("valid_data_path"), valid)
    return BasicParameters(valid, valid_folder if valid_folder is not None else folder, 1.0, Path(valid).stem,
                           max_patch, False, key=key)


def _basic(raw: Any, path: str) -> tuple[BasicParameters, BasicParameters | None]:
    s = Section(raw, path)
    data_path = s.get("data_path", str)
    folder = s.get("data_folder", str, None, nullable=True)
    repeat = s.get("repeat_time", float, 1.0)
    name = s.get("name", str, "")
    max_patch = s.get("max_dynamic_patch", int, None, nullable=True, minimum=1)
    augment = s.get("data_augment", bool, False)
    valid = _valid(s, folder, max_patch, path)
    s.done()
    _check_annotation_name(s.key("data_path"), data_path)
    if repeat <= 0:
        raise DataSpecError(s.key("repeat_time"), f"must be > 0, got {repeat!r}")
    return BasicParameters(data_path, folder, repeat, name, max_patch, augment, key=path), valid


def _norm_from_pipeline(pre: Section, image_size: int) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """Mean/std from the ``norm_fun`` step of ``train_pipeline.image`` and whether it pads to square; the other
    steps are checked, not run."""
    mean, std, pad = IMAGENET_MEAN, IMAGENET_STD, False
    pipeline = pre.get("train_pipeline", dict, None, nullable=True)
    if pipeline is None:
        return mean, std, pad
    pipe = Section(pipeline, pre.key("train_pipeline"))
    steps = pipe.get("image", list, [])
    pipe.accept("video")  # the reference's per-frame pipeline; frames go through the same tiling here
    pipe.done()
    known = ("Pad2Square", "Resize", "ToTensor", "norm_fun")
    for i, raw_step in enumerate(steps):
        step = Section(raw_step, f"{pipe.key('image')}[{i}]")
        kind = step.get("trans_type", str, choices=known)
        pad = pad or kind == "Pad2Square"
        param = Section(step.get("param", dict, {}), step.key("param"))
        step.done()
        if kind == "norm_fun":
            values = []
            for name in ("mean", "std"):
                v = param.get(name, list)
                if len(v) != 3:
                    raise DataSpecError(param.key(name), f"expected 3 numbers, got {json.dumps(v)}")
                values.append(tuple(check_value(f"{param.key(name)}[{j}]", float, x) for j, x in enumerate(v)))
            mean, std = values
            if any(x <= 0 for x in std):
                raise DataSpecError(param.key("std"), f"must be positive, got {list(std)}")
        elif kind == "Resize":
            size = param.get("size", list)
            if size != [image_size, image_size]:
                raise DataSpecError(param.key("size"), f"{size} disagrees with image_size {image_size}")
            param.accept("interpolation", "antialias")
        param.accept("mean")  # Pad2Square's fill colour: a no-op on square tiles
        param.done()
    return mean, std, pad


def tokenizer_config_from_dict(raw: Any, path: str, use_fast: bool) -> TokenizerConfig:
    """The reference's tokenizer object (``tokenizer_config`` here, ``tokenizer`` in the inference JSON);
    ``use_fast``: the default when absent. ``hub_backend``/``autotokenizer_name`` can only be "hf"/"AutoTokenizer"."""
    tok = Section(raw, path)
    out = TokenizerConfig(
        from_pretrained=tok.get("from_pretrained", str),
        hub_backend=tok.get("hub_backend", str, "hf", choices=("hf",)),
        autotokenizer_name=tok.get("autotokenizer_name", str, "AutoTokenizer", choices=("AutoTokenizer",)),
        add_eos_token=tok.get("add_eos_token", bool, False),
        use_fast=tok.get("use_fast", bool, use_fast),
        trust_remote_code=tok.get("trust_remote_code", bool, False),
    )
    tok.done()
    return out


def _dataset_param(raw: Any, path: str) -> DatasetParam:
    s = Section(raw, path)
    dataset_type = s.get("dataset_type", str, "multimodal", choices=("multimodal",))
    meta_path = s.get("meta_path", str, None, nullable=True)
    basic_raw = s.get("basic_parameters", object, None, nullable=True)
    if (meta_path is None) == (basic_raw is None):
        raise DataSpecError(s.key("basic_parameters"), "give either basic_parameters or meta_path (InternVL's "
                            f"meta JSON), not {'both' if meta_path else 'neither'}")
    # a meta JSON is InternVL's file, so its validation set is named beside it rather than inside it
    top_valid = _valid(s, None, None, path)
    if meta_path is not None:
        from mindspeed_mm.data.mixture import read_meta

        basics = read_meta(meta_path, s.key("meta_path"))
        valids = (top_valid,) if top_valid else ()
    else:
        if top_valid is not None:
            raise DataSpecError(s.key("valid_data_path"), "belongs in basic_parameters (beside data_path) unless "
                                "the datasets come from meta_path")
        if isinstance(basic_raw, list):
            if not basic_raw:
                raise DataSpecError(s.key("basic_parameters"), "an empty list names no data")
            pairs = [_basic(b, f"{s.key('basic_parameters')}[{i}]") for i, b in enumerate(basic_raw)]
        else:
            pairs = [_basic(basic_raw, s.key("basic_parameters"))]
        basics = tuple(b for b, _ in pairs)
        valids = tuple(v for _, v in pairs if v is not None)
    from mindspeed_mm.data.mixture import name_datasets

    basics = name_datasets(basics)

    tokenizer = tokenizer_config_from_dict(s.get("tokenizer_config", dict), s.key("tokenizer_config"), use_fast=False)

    image_size = s.get("image_size", int, 448, minimum=1)
    pre = Section(s.get("preprocess_parameters", dict, {}), s.key("preprocess_parameters"))
    pre.get("image_reader_type", str, "torchvision", choices=("torchvision", "PIL", "CV2"))
    mean, std, pad = _norm_from_pipeline(pre, image_size)
    pre.done()

    kwargs = {
        "basic_parameters": basics,
        "tokenizer_config": tokenizer,
        "dataset_type": dataset_type,
        "template_name": s.get("template_name", str, "internvl2_5", choices=("internvl2_5",)),
        "image_size": image_size,
        "patch_size": s.get("patch_size", int, 14, minimum=1),
        "down_sample_ratio": s.get("down_sample_ratio", float, 0.5),
        "dynamic_image_size": s.get("dynamic_image_size", bool, True),
        "use_thumbnail": s.get("use_thumbnail", bool, True),
        "min_dynamic_patch": s.get("min_dynamic_patch", int, 1, minimum=1),
        "max_dynamic_patch": s.get("max_dynamic_patch", int, 12),
        "min_num_frame": s.get("min_num_frame", int, 4, minimum=1),
        "max_num_frame": s.get("max_num_frame", int, 12),
        "sampling_method": s.get("sampling_method", str, "rand"),
        "norm_mean": mean,
        "norm_std": std,
        "pad_to_square": pad,
        "skip_truncated_images": s.get("skip_truncated_images", bool, False),
    }
    kwargs["group_by_length"] = s.get("group_by_length", bool, False)
    kwargs["meta_path"] = meta_path
    s.get("use_text_processer", bool, False)
    kwargs["packing"] = _packing_param(s)
    kwargs["valid_parameters"] = valids
    kwargs["dataset_kind"] = s.get("dataset_kind", str, None, nullable=True, choices=DATASET_KINDS)
    s.done()
    if kwargs["dataset_kind"] == "preference" and kwargs["packing"].use_packed_ds:
        from mindspeed_mm.data.preference import check_unpacked

        check_unpacked(DatasetParam(**kwargs), "preference")

    if image_size % kwargs["patch_size"]:
        raise DataSpecError(s.key("image_size"), f"{image_size} is not a multiple of patch_size {kwargs['patch_size']}")
    if not 0 < kwargs["down_sample_ratio"] <= 1:
        raise DataSpecError(s.key("down_sample_ratio"), f"must be in (0, 1], got {kwargs['down_sample_ratio']}")
    grid = image_size // kwargs["patch_size"] * kwargs["down_sample_ratio"]
    if grid != int(grid):
        raise DataSpecError(s.key("down_sample_ratio"), f"{kwargs['down_sample_ratio']} does not divide the "
                            f"{image_size // kwargs['patch_size']}-patch grid of a tile evenly")
    if kwargs["max_dynamic_patch"] < kwargs["min_dynamic_patch"]:
        raise DataSpecError(s.key("max_dynamic_patch"), f"{kwargs['max_dynamic_patch']} is below "
                            f"min_dynamic_patch {kwargs['min_dynamic_patch']}")
    for b in basics:
        if b.max_dynamic_patch is not None and b.max_dynamic_patch < kwargs["min_dynamic_patch"]:
            raise DataSpecError(f"{b.key}.max_dynamic_patch", f"{b.max_dynamic_patch} is below min_dynamic_patch "
                                f"{kwargs['min_dynamic_patch']}", b.source)
    if kwargs["max_num_frame"] < kwargs["min_num_frame"]:
        raise DataSpecError(s.key("max_num_frame"), f"{kwargs['max_num_frame']} is below "
                            f"min_num_frame {kwargs['min_num_frame']}")
    if not SAMPLING_PATTERN.match(kwargs["sampling_method"]) or kwargs["sampling_method"] in ("fps0", "fps0."):
        raise DataSpecError(s.key("sampling_method"), f"{json.dumps(kwargs['sampling_method'])} is not supported; "
                            'expected "rand", "middle" or "fps<rate>" (e.g. "fps0.5")')
    return DatasetParam(**kwargs)


def _dataloader_param(raw: Any, path: str) -> DataloaderParam:
    s = Section(raw, path)
    col = Section(s.get("collate_param", dict), s.key("collate_param"))
    collate = CollateParam(pad_id=col.get("pad_id", int, minimum=0),
                           model_name=col.get("model_name", str, "internvl", choices=("internvl",)))
    col.done()
    out = DataloaderParam(
        collate_param=collate,
        dataloader_mode=s.get("dataloader_mode", str, "sampler", choices=("sampler",)),
        shuffle=s.get("shuffle", bool, True),
        drop_last=s.get("drop_last", bool, True),
        pin_memory=s.get("pin_memory", bool, False),
        sampler_type=s.get("sampler_type", str, "BaseRandomBatchSampler",
                           choices=("BaseRandomBatchSampler", "SequentialSampler")),
    )
    s.done()
    return out


def data_spec_from_dict(raw: Mapping[str, Any], source: str | None = None) -> DataSpec:
    try:
        top = Section(raw, "")
        spec = DataSpec(_dataset_param(top.get("dataset_param", dict), "dataset_param"),
                        _dataloader_param(top.get("dataloader_param", dict), "dataloader_param"), source)
        top.done()
    except ConfigError as e:
        raise (e.in_file(source) if source else e) from None
    return spec


def load_data_spec(src: str | Path | Mapping[str, Any]) -> DataSpec:
    """Parse and validate a data spec from a JSON file or a dict; errors name the file and the key path."""
    if isinstance(src, Mapping):
        return data_spec_from_dict(src)
    return data_spec_from_dict(read_json(src), source=str(src))
