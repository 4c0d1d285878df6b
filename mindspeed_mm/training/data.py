"""This data-parallel rank's stream of micro-batches, from the data JSON, resumed at `consumed_samples` (or,
packed, at the checkpoint's data state)."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

__all__ = ["build_in_order_loader", "build_train_iterator", "build_valid_loader", "dataset_names", "data_state"]


def dataset_names(data_spec) -> list[str]:
    """The mixture's dataset names, in the data JSON's (or meta JSON's) order: the keys of
    ``samples_by_dataset`` in the metrics records."""
    return [b.name for b in data_spec.dataset_param.basic_parameters]


def build_train_iterator(data_spec, tokenizer, spec, args, dp_rank: int, dp: int, consumed_samples: int,
                         log: Optional[Callable[[str], None]] = None, num_micro: int = 1,
                         state: Optional[dict] = None) -> Iterator[dict]:
    """Every model-parallel rank of a DP rank reads the same micro-batches (each pipeline stage needs the
    token ids; TP ranks need identical inputs), so each builds the same loader. ``log``: the start-up lines
    (each dataset's sample count after ``repeat_time``). With `use_packed_ds` the micro-batch size counts packs
    and every rank runs the same packer (`data.packing`): `state` is the saved packer state (None: the stream's
    start, unless `consumed_samples` says the run was not packed)."""
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.mixture import length_grouped_order
    from mindspeed_mm.data.sampler import build_dataloader

    dataset = InternVLChatDataset(data_spec, tokenizer, seq_length=args.seq_length,
                                  tokens_per_tile=spec.tokens_per_tile, seed=args.seed)
    param, loader_param = data_spec.dataset_param, data_spec.dataloader_param
    packing = param.packing
    lines = dataset.records.describe()
    order = None
    if param.group_by_length and not packing.use_packed_ds:
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
    if packing.use_packed_ds:
        from mindspeed_mm.data.packing import PackedLoader

        if state is None and consumed_samples:
            raise ValueError(f"resuming a packed run at {consumed_samples} consumed packs needs the checkpoint's "
                             "data state (saved by a packed run); this checkpoint has none")
        return PackedLoader(dataset, packing, micro_batch_size=args.micro_batch_size, num_micro=num_micro,
                            dp_rank=dp_rank, dp_size=dp, seed=args.seed, pad_id=loader_param.collate_param.pad_id,
                            shuffle=loader_param.shuffle, num_workers=args.num_workers, state=state)
    loader = build_dataloader(dataset, micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
                              seed=args.seed, consumed_samples=consumed_samples, num_workers=args.num_workers,
                              pad_id=loader_param.collate_param.pad_id, shuffle=loader_param.shuffle,
                              drop_last=loader_param.drop_last, order=order)
    return iter(loader)


def data_state(batches) -> Optional[dict]:
    """What a checkpoint saves of the data iterator: the packer's state, or None (unpacked: the sampler resumes
    from `consumed_train_samples` alone)."""
    get = getattr(batches, "state_dict", None)
    return get() if get is not None else None


def build_valid_loader(data_spec, tokenizer, spec, args, dp_rank: int, dp: int,
                       log: Optional[Callable[[str], None]] = None):
    """This DP rank's loader of the validation set (`valid_parameters`), or None when the data JSON has none.
    The training preprocessing without its data order: no shuffle, no augmentation, never packed (a pack's
    loss is its samples' anyway), and no drop_last, so the stream runs through the files in order and wraps
    to their start. Each ``iter()`` restarts at the set's first sample: every evaluation sees the same
    batches, so the curve compares like with like."""
    import dataclasses

    from mindspeed_mm.data.data_spec import PackingParam
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.sampler import build_dataloader

    param = data_spec.dataset_param
    if not param.valid_parameters:
        return None
    valid_param = dataclasses.replace(param, basic_parameters=param.valid_parameters, packing=PackingParam(),
                                      group_by_length=False, valid_parameters=())
    dataset = InternVLChatDataset(valid_param, tokenizer, seq_length=args.seq_length,
                                  tokens_per_tile=spec.tokens_per_tile, seed=args.seed)
    for line in dataset.records.describe() if log else ():
        log(f"validation {line}")
    return build_dataloader(dataset, micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
                            seed=args.seed, consumed_samples=0, num_workers=args.num_workers,
                            pad_id=data_spec.dataloader_param.collate_param.pad_id, shuffle=False, drop_last=False)


def build_in_order_loader(data_spec, tokenizer, spec, args, dp_rank: int, dp: int):
    """This DP rank's share of the training set in file order, once (no shuffle, no drop): the first pass
    that precomputes preference training's reference log-probabilities."""
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.sampler import build_dataloader

    dataset = InternVLChatDataset(data_spec, tokenizer, seq_length=args.seq_length,
                                  tokens_per_tile=spec.tokens_per_tile, seed=args.seed)
    return build_dataloader(dataset, micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
                            seed=args.seed, consumed_samples=0, num_workers=args.num_workers,
                            pad_id=data_spec.dataloader_param.collate_param.pad_id, shuffle=False, drop_last=False)
