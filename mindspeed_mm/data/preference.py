"""Preference pairs (InternVL's MMPR records) for DPO / MPO: which datasets hold them and what a pair record is.

A record is ``{"image": path | [paths]?, "video": path?, "clip": [s, e]?, "question": str, "chosen": str,
"rejected": str}``, the fields of InternVL's ``internvl_chat_mpo.py``. The chosen and the rejected answer each
become the two-turn conversation ``[{"from": "human", "value": question}, {"from": "gpt", "value": answer}]``,
tokenised, tiled and truncated exactly as an SFT record with those turns is
(:class:`~mindspeed_mm.data.dataset.InternVLChatDataset`), with one set of tiles for both.

Which kind a mixture is (``dataset_param.dataset_kind``): ``"preference"`` makes every record a pair (a record
that is not: skipped as ``malformed_pair``), ``"sft"`` every record a conversation. Absent, the data decides:
each annotation file's first record with ``chosen``/``rejected`` or ``conversations`` keys says which kind the
file is, and the mixture's files (the validation set's too) must agree, because one micro-batch is either pairs
or SFT samples, never both. A file with no such record (empty, or all broken) does not vote.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mindspeed_mm.data.data_spec import BasicParameters, DatasetParam, DataSpec, DataSpecError

__all__ = ["PAIR_KEYS", "PAIR_SKIP_REASONS", "PairRecordError", "check_unpacked", "is_preference", "mixture_kind",
           "pair_turns", "record_kind"]

PAIR_KEYS = ("question", "chosen", "rejected")
# Why a pair record was skipped, besides the reasons every sample shares (dataset.SKIP_REASONS holds both).
PAIR_SKIP_REASONS = ("malformed_pair", "identical_pair")
# How many records of a file are looked at to find its kind: a file whose first records are all broken is
# broken data, and the skip counts will say so.
_PROBE_RECORDS = 100


class PairRecordError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def record_kind(record: Any) -> str | None:
    """``"preference"``, ``"sft"`` or None (no vote: not an object, or neither kind's keys)."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "conversations" in record:
        return "sft"
    return None


def pair_turns(record: dict) -> tuple[list[dict], list[dict]]:
    """The chosen and the rejected two-turn conversations of a pair record, or :class:`PairRecordError`
    (``malformed_pair``: a field missing or not a string; ``identical_pair``: nothing to prefer)."""
    bad = [k for k in PAIR_KEYS if not isinstance(record.get(k), str)]
    if bad:
        got = ", ".join(f"{k}: {type(record[k]).__name__}" if k in record else f"no {k!r}" for k in bad)
        raise PairRecordError("malformed_pair", f"a preference pair needs string {', '.join(map(repr, PAIR_KEYS))} "
                              f"({got})")
    if record["chosen"] == record["rejected"]:
        raise PairRecordError("identical_pair", "'chosen' and 'rejected' are the same answer")
    question = record["question"]
    return ([{"from": "human", "value": question}, {"from": "gpt", "value": record["chosen"]}],
            [{"from": "human", "value": question}, {"from": "gpt", "value": record["rejected"]}])


def _probe(b: BasicParameters) -> Iterable[Any]:
    """The first records of ``b``'s file, parsed (a jsonl file read only as far as needed)."""
    path = Path(b.data_path)
    if not path.is_file():
        return []
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
        return records[:_PROBE_RECORDS] if isinstance(records, list) else []
    out = []
    with path.open("rb") as f:
        for line in f:
            if len(out) == _PROBE_RECORDS:
                break
            if line.strip():
                try:
                    out.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    out.append(None)
    return out


def _file_kind(b: BasicParameters) -> str | None:
    return next((k for k in map(record_kind, _probe(b)) if k is not None), None)


def mixture_kind(param: DatasetParam, basics: Sequence[BasicParameters] | None = None) -> str:
    """``"preference"`` or ``"sft"`` for the datasets ``basics`` (default: the training and validation files
    of ``param``), by ``dataset_kind`` or, without it, by their records (see the module docstring)."""
    if param.dataset_kind is not None:
        return param.dataset_kind
    if basics is None:
        basics = tuple(param.basic_parameters) + tuple(param.valid_parameters)
    votes = {b.data_path: k for b in basics if (k := _file_kind(b)) is not None}
    kinds = set(votes.values())
    if len(kinds) > 1:
        pref = sorted(p for p, k in votes.items() if k == "preference")
        sft = sorted(p for p, k in votes.items() if k == "sft")
        raise DataSpecError("dataset_param.dataset_kind", f"the data mixes preference pairs ({', '.join(pref)}) "
                            f"and SFT conversations ({', '.join(sft)}); a run trains on one kind")
    return kinds.pop() if kinds else "sft"


def is_preference(data_spec: DataSpec | DatasetParam) -> bool:
    """Whether the run's data are preference pairs: its micro-batches then come from
    :func:`~mindspeed_mm.data.collate.collate_pairs` (2P rows for P pairs) and need a preference loss."""
    param = data_spec.dataset_param if isinstance(data_spec, DataSpec) else data_spec
    source = data_spec.source if isinstance(data_spec, DataSpec) else None
    try:
        kind = mixture_kind(param)
        check_unpacked(param, kind)
    except DataSpecError as e:
        raise (e.in_file(source) if source else e) from None
    return kind == "preference"


def check_unpacked(param: DatasetParam, kind: str) -> None:
    if kind == "preference" and param.packing.use_packed_ds:
        raise DataSpecError("dataset_param.use_packed_ds", "preference pairs are not packed (a pair's two "
                            "sequences share their tiles and stay in one micro-batch); set it to false")

