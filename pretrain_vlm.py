"""Finetune InternVL3 with megatron-core: `torchrun ... pretrain_vlm.py $GPT_ARGS $MM_ARGS $OUTPUT_ARGS`.

The reference recipe's flags are accepted as written (`python pretrain_vlm.py --help` lists them all)."""
if __name__ == "__main__":  # dist_checkpointing-style spawned helpers must not re-run the launch
    import sys

    from mindspeed_mm.training.train import main

    sys.exit(main())
