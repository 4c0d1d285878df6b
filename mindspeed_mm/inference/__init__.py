"""Inference: an inference JSON (the reference schema) -> prompts and pixels -> KV-cache generation on any
TP/PP layout of a converted checkpoint.

config.py    the inference JSON as typed dataclasses, errors naming the key path
sampling.py  greedy / temperature / top-k / top-p choice of the next token
stages.py    one forward through this rank's pipeline stages (p2p between them), vocab gathered over TP
generate.py  the decode loop: prefill, then one token per step against megatron's static KV cache
loading.py   process groups and model chunks for the checkpoint's layout, weights loaded
pipeline.py  requests (image, images, video, text) -> prompt ids and tiles -> generation -> results
cli.py       `inference_vlm.py` / `examples/internvl3/inference_internvl.sh`
"""
