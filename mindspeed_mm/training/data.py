"""This data-parallel rank's stream of micro-batches, from the data JSON, resumed at `consumed_samples` (or,
packed, at the checkpoint's data state)."""
from __future__ import annotations

from typing import Iterator, Optional

__all__ = ["build_train_iterator", "data_state"]


def build_train_iterator(data_spec, tokenizer, spec, args, dp_rank: int, dp: int, consumed_samples: int,
                         num_micro: int = 1, state: Optional[dict] = None) -> Iterator[dict]:
    """Every model-parallel rank of a DP rank reads the same micro-batches (each pipeline stage needs the
    token ids; TP ranks need identical inputs), so each builds the same loader. With `use_packed_ds` the
    micro-batch size counts packs and every rank runs the same packer (`data.packing`): `state` is the saved
    packer state (None: the stream's start, unless `consumed_samples` says the run was not packed)."""
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.sampler import build_dataloader

    dataset = InternVLChatDataset(data_spec, tokenizer, seq_length=args.seq_length,
                                  tokens_per_tile=spec.tokens_per_tile, seed=args.seed)
    loader_param = data_spec.dataloader_param
    packing = data_spec.dataset_param.packing
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
                              pad_id=loader_param.collate_param.pad_id, shuffle=loader_param.shuffle)
    return iter(loader)


def data_state(batches) -> Optional[dict]:
    """What a checkpoint saves of the data iterator: the packer's state, or None (unpacked: the sampler resumes
    from `consumed_train_samples` alone)."""
    get = getattr(batches, "state_dict", None)
    return get() if get is not None else None
