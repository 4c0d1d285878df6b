"""This data-parallel rank's stream of micro-batches, from the data JSON, resumed at `consumed_samples`."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

__all__ = ["build_train_iterator", "dataset_names"]


def dataset_names(data_spec) -> list[str]:
    """The mixture's dataset names, in the data JSON's (or meta JSON's) order: the keys of
    ``samples_by_dataset`` in the metrics records."""
    return [b.name for b in data_spec.dataset_param.basic_parameters]


def build_train_iterator(data_spec, tokenizer, spec, args, dp_rank: int, dp: int, consumed_samples: int,
                         log: Optional[Callable[[str], None]] = None) -> Iterator[dict]:
    """Every model-parallel rank of a DP rank reads the same micro-batches (each pipeline stage needs the
    token ids; TP ranks need identical inputs), so each builds the same loader. ``log``: the start-up lines
    (each dataset's sample count after ``repeat_time``)."""
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.mixture import length_grouped_order
    from mindspeed_mm.data.sampler import build_dataloader

    dataset = InternVLChatDataset(data_spec, tokenizer, seq_length=args.seq_length,
                                  tokens_per_tile=spec.tokens_per_tile, seed=args.seed)
    param, loader_param = data_spec.dataset_param, data_spec.dataloader_param
    lines = dataset.records.describe()
    order = None
    if param.group_by_length and not getattr(param, "use_packed_ds", False):
        if loader_param.shuffle:
            gbs = args.global_batch_size or args.micro_batch_size * dp
            order = length_grouped_order(dataset.records.lengths(param, dataset.tokens_per_tile), gbs,
                                         args.micro_batch_size, args.seed)
            lines.append(f"group_by_length: each global batch of {gbs} sorted by estimated length into "
                         f"{gbs // args.micro_batch_size} micro-batches")
        else:
            lines.append("group_by_length: ignored, shuffle is false (the order is the file order)")
    for line in lines if log else ():
        log(line)
    loader = build_dataloader(dataset, micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
                              seed=args.seed, consumed_samples=consumed_samples, num_workers=args.num_workers,
                              pad_id=loader_param.collate_param.pad_id, shuffle=loader_param.shuffle,
                              drop_last=loader_param.drop_last, order=order)
    return iter(loader)
