"""mindspeed_mm: Megatron-style parallel training for InternVL3 on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="mindspeed_mm",
    version="0.1.0",
    description="Megatron-core parallel training, conversion and inference for InternVL3",
    packages=find_packages(include=["mindspeed_mm", "mindspeed_mm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The CPU wheel 2.13.0 must satisfy this range; install it first so pip does not
        # pull a CUDA build (see README).
        "torch>=2.6,<2.15",
        # device.py patches megatron-core internals and checks their source: pin exactly.
        "megatron-core==0.16.1",
        "safetensors>=0.4",
        "numpy>=1.24",
        "transformers>=4.52,<6",  # tokenizers and the numerical oracle (InternVLForConditionalGeneration)
        "tokenizers>=0.19",
        # SentencePiece tokenizer.model files (InternLM3, InternVL3-9B): transformers reads them with both
        "sentencepiece>=0.2",
        "protobuf>=4",
        "psutil>=5.9",  # megatron dist_checkpointing
        "pillow>=10",
        "einops>=0.7",
        "jsonargparse>=4.30",
        "tqdm>=4.60",
        # Video frames: decord where it has wheels (x86_64), else PyAV, which also writes the test videos.
        "decord>=0.6; platform_machine == 'x86_64'",
        "av>=12",
    ],
    extras_require={
        "test": ["pytest>=8", "scikit-image>=0.22", "peft>=0.13",  # scikit-image: real sample photos for the tiling tests
                 # the preference losses' oracle: DPOTrainer's loss code as 1.16 lays it out (fused LM head outputs)
                 "trl>=1.16; python_version >= '3.11'"],
        # Optional GPU accelerators: never imported unless present and asked for.
        "gpu": ["transformer-engine", "apex"],
    },
    entry_points={
        "console_scripts": [
            "mm-convert=mindspeed_mm.cli.mm_convert:main",
        ],
    },
)
