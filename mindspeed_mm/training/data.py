"""This data-parallel rank's stream of micro-batches, from the data JSON, resumed at `consumed_samples`."""
from __future__ import annotations

from typing import Iterator

__all__ = ["build_train_iterator"]


def build_train_iterator(data_spec, tokenizer, spec, args, dp_rank: int, dp: int, consumed_samples: int
                         ) -> Iterator[dict]:
    """Every model-parallel rank of a DP rank reads the same micro-batches (each pipeline stage needs the
    token ids; TP ranks need identical inputs), so each builds the same loader."""
    from mindspeed_mm.data.dataset import InternVLChatDataset
    from mindspeed_mm.data.sampler import build_dataloader

    dataset = InternVLChatDataset(data_spec, tokenizer, seq_length=args.seq_length,
                                  tokens_per_tile=spec.tokens_per_tile, seed=args.seed)
    loader_param = data_spec.dataloader_param
    loader = build_dataloader(dataset, micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
                              seed=args.seed, consumed_samples=consumed_samples, num_workers=args.num_workers,
                              pad_id=loader_param.collate_param.pad_id, shuffle=loader_param.shuffle)
    return iter(loader)
