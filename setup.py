"""Packaging for sparselm.

Install torch first (``make setup`` does): an unpinned torch requirement resolved with no torch
present pulls several GB of CUDA wheels.  DeepSpeed must be installed with
``--no-build-isolation`` or its build environment fetches its own torch.
"""
from setuptools import find_packages, setup

# Tested together; see README "Tested versions".
TORCH_VERSION = "2.13.0"
DEEPSPEED_VERSION = "0.19.8"
MEGATRON_CORE_VERSION = "0.16.1"

setup(
    name="sparselm",
    version="0.1.0",
    description="Trainer for wide, sparsely activated language models (MoE, PKM, sparse all-attention)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparselm", "sparselm.*"]),
    package_data={"sparselm": ["configs/*.yaml"]},
    install_requires=[
        f"torch>={TORCH_VERSION}",
        f"deepspeed=={DEEPSPEED_VERSION}",
        f"megatron-core=={MEGATRON_CORE_VERSION}",
        "numpy",
        "pyyaml",
        "tokenizers",
        "safetensors",
        "xxhash",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "transformers", "product-key-memory==0.3.0", "wandb"],
        "hf": ["transformers"],
        "wandb": ["wandb"],
    },
    entry_points={
        "console_scripts": [
            "sparselm-train=sparselm.train:main",
            "sparselm-generate=sparselm.generate:main",
            "sparselm-evaluate=sparselm.evaluate:main",
        ]
    },
)
