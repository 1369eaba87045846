"""megastack: model growth (G_stack and friends) on Megatron sharded checkpoints, with a DeepSpeed trainer."""

from setuptools import find_packages, setup

setup(
    name="megastack",
    version="0.1.0",
    description="Grow small LLMs into large ones directly on Megatron TP/PP sharded checkpoints",
    packages=find_packages(include=["megastack", "megastack.*"]),
    package_data={"megastack": ["configs/*/*.yaml"]},  # shipped models, recipes, stage configs (by name)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.12",
        "deepspeed>=0.15",
        "sentencepiece",
        "numpy",
        "pyyaml",
        "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
        "safetensors",
        "tqdm",
        "tensorboard",  # event files written by megastack train (torch.utils.tensorboard)
        "matplotlib",
    ],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "transformers", "ruff"],
    },
    entry_points={"console_scripts": ["megastack=megastack.cli:console_main"]},
)
