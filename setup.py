"""Build megatron_solo and its C++ extension (megatron_solo._C, pybind11, sources in csrc/)."""

import glob
import os

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

# MEGATRON_SOLO_NO_EXTENSION=1: install without the C++ data extension, for an environment that only serves
# exports (the vLLM plugin, requirements-vllm.txt): nothing there reads or writes datasets.
ext_modules = [] if os.environ.get("MEGATRON_SOLO_NO_EXTENSION") == "1" else [
    Pybind11Extension(
        "megatron_solo._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

# The extension's sources compile at once, one per core (each includes pybind11's headers: seconds apiece);
# NPY_NUM_BUILD_JOBS=N sets how many.
ParallelCompile("NPY_NUM_BUILD_JOBS").install()

setup(
    name="megatron_solo",
    version="0.1.0",
    description="Train SOLO-style single-transformer vision-language models on megatron-core",
    packages=find_packages(include=["megatron_solo", "megatron_solo.*"]),
    package_data={"megatron_solo": ["convert/hf_files/*.py"]},
    python_requires="==3.12.*",
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    # Runtime pins live in requirements.txt (what `make setup` installs); these are the floors.
    install_requires=[
        "torch>=2.14",
        "megatron-core>=0.19.2",
        "sentencepiece",
        "protobuf",
        "numpy",
        "pillow",
        "safetensors",
        "transformers",
        "tokenizers",
        "tqdm",
        "psutil",
        "tensorboard",
    ],
    entry_points={
        # lmms-eval's plugin group: `lmms-eval --model megatron_solo` (docs/EVALUATION.md); only lmms-eval loads it.
        "lmms_eval.models": ["megatron_solo = megatron_solo.eval.lmms_eval_model:manifest"],
        # vLLM's plugin group: SOLO's architectures in vLLM's ModelRegistry (docs/SERVING.md); only vLLM loads it.
        "vllm.general_plugins": ["megatron_solo = megatron_solo.serve.vllm_plugin:register"],
    },
    extras_require={
        # GPU-only: neither installs on a CPU machine (TE's torch extension builds against CUDA).
        "gpu": ["transformer-engine[pytorch]>=2.0", "apex"],
    },
)
