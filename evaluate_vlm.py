"""Score InternVL3 on benchmark files: `torchrun --nproc_per_node <instances*tp*pp> evaluate_vlm.py --mm-model
inference.json --benchmark MMBench_DEV_EN.tsv --work-dir eval_out`.

See mindspeed_mm/evaluation/cli.py and docs/evaluation.md."""
if __name__ == "__main__":
    import sys

    from mindspeed_mm.evaluation.cli import main

    sys.exit(main())
