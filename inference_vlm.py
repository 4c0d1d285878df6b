"""Generate with InternVL3: `torchrun --nproc_per_node <tp*pp> inference_vlm.py --mm-model inference.json`.

See mindspeed_mm/inference/config.py for the JSON and examples/internvl3/inference_internvl.sh to run it."""
if __name__ == "__main__":
    import sys

    from mindspeed_mm.inference.cli import main

    sys.exit(main())
