"""Packaging. Beam ships this multi-package project to remote workers with --setup_file=./setup.py."""
from setuptools import find_packages, setup

CORE = [
    "apache-beam>=2.77,<2.78",
    "numpy>=2.0,<3",
    "pillow>=11,<13",          # Beam 2.77 caps pillow below 13
    "pyarrow>=20",
    "pycocotools>=2.0.8",
    "scikit-image>=0.25",
    "webdataset>=1.0.2,<1.1",
    "jsonschema>=4.20",
    "fastjsonschema>=2.19",    # records checked as they are assembled (jsonschema names every error)
    "pyyaml>=6",
    "matplotlib>=3.8",         # the dataset card's plots
]
EXTRAS = {
    # Segment Anything. torch/torchvision: the registry's default builds (see README, "Extras").
    "sam": ["torch==2.14.0", "torchvision==0.29.0", "segment-anything==1.0", "opencv-python-headless>=4.8"],
    # Captioning with a vLLM (OpenAI-compatible) server; the server itself lives in its own env.
    "vllm": ["openai[aiohttp]>=3.50,<4"],
    # In-process captioning with Hugging Face transformers (small runs; same caption programs).
    "hf": ["transformers==5.23.0", "torch==2.14.0", "torchvision==0.29.0"],
    "test": ["pytest>=8", "pytest-xdist>=3", "datasets>=4", "aiohttp>=3.10", "openai[aiohttp]>=3.50,<4",
             "duckdb>=1.1", "wids>=0.1.11"],
    # The RegionCLIP trainer (trainer/): open_clip towers, optional LLM text encoder, plots.
    "train": ["open-clip-torch==3.3.0", "torch==2.14.0", "torchvision==0.29.0", "transformers==5.23.0",
              "safetensors>=0.4", "fsspec>=2023.1", "matplotlib>=3.8"],
}

setup(
    name="multigran",
    version="0.1.0",
    description="Build multi-granularity (image / box / mask) image-text datasets with Apache Beam.",
    packages=find_packages(include=["annotators*", "pipelines*", "schemas*", "settings*",
                                    "trainer*"]),
    package_data={"annotators.caption": ["programs/*.yaml"], "trainer": ["model_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
