"""InfiniteID-RT: Infinite-ID (identity-preserving SDXL) from PyTorch to ONNX and TensorRT.

Extras follow the package map in the README:
  runtime - the torch-free runtime (numpy, onnxruntime-gpu, tokenizers, face front end)
  export  - the PyTorch reference and ONNX export (torch, diffusers, transformers, onnx)
  gpu     - TensorRT, polygraphy, Triton and cuda-python for NVIDIA GPU boxes
  serve   - the HTTP server, its metrics and Ray Serve scale-out (infiniteid serve / bench)
  calibrate - INT8/FP8 calibration of the U-Net (nvidia-modelopt on top of export)
  train   - training (infiniteid train): export + Hugging Face Accelerate
  test    - what the test suite needs on top of runtime + export
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# The version is written once, in infiniteid/__init__.py (infiniteid.__version__, infiniteid --version).
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "infiniteid" / "__init__.py").read_text(), re.M)[1]

RUNTIME = [
    "numpy>=1.26",
    "onnxruntime-gpu>=1.20",
    "tokenizers>=0.20",
    "pillow>=10",
    "tqdm>=4.66",
    "opencv-python-headless>=4.8",
    "scikit-image>=0.22",
    "scipy>=1.11",
    "onnx>=1.17",  # insightface's model router reads ONNX graphs
    "requests>=2.31",  # imported by insightface (downloads are refused; see infiniteid.face.models)
]
EXPORT = [
    "torch>=2.4",
    "diffusers>=0.31",
    "transformers>=4.45",
    "safetensors>=0.4",
    "onnx>=1.17",
    "onnxscript>=0.2",
    "onnxslim>=0.1.40",
    "peft>=0.17",  # diffusers' LoRA backend: export --lora / generate --lora fuse LoRAs with it
]
# Training (infiniteid train): Hugging Face Accelerate for DDP / multi-node, on top of export.
TRAIN = ["accelerate>=1.0"]
GPU = [
    "triton>=3.1",
    "polygraphy>=0.49",
    "cuda-python>=12.6.2",
    "tensorrt>=10.9",
]
SERVE = [
    "fastapi>=0.115",
    "uvicorn[standard]>=0.30",
    "prometheus-client>=0.20",
    "python-multipart>=0.0.18",
    "ray[serve]>=2.40",
]
# nvidia-modelopt's base package only: its [onnx] and [hf] extras conflict with our pins, and
# it imports requests and huggingface_hub without declaring them.
CALIBRATE = ["nvidia-modelopt>=0.47", "requests>=2.31", "huggingface_hub>=0.20"]
# tensorrt-lean and cuda-python install without a GPU: the tests check that every
# TensorRT / CUDA name the backend calls exists in the real bindings.
# polygraphy is pure Python: `check --against polygraphy` runs its onnxruntime runner on a CPU.
# peft: diffusers' IP-Adapter loader applies FaceID's in-file LoRA through it (the
# reference the public-adapter tests compare against; our loader fuses it itself).
# websockets drives headless Chromium over the DevTools protocol in the page test.
TEST = ["pytest>=8", "triton>=3.1", "tensorrt-lean-cu12>=10.9", "cuda-python>=12.6.2", "polygraphy>=0.49", "peft>=0.13", "websockets>=12"] + SERVE

setup(
    name="infiniteid-rt",
    version=VERSION,
    description="Deployment runtime for Infinite-ID identity-preserving SDXL: ONNX, TensorRT, Triton kernels",
    packages=find_packages(include=["infiniteid", "infiniteid.*"]),
    # data/world-model: the demo's model (SDXL folder layout, under 20 MB), three folders deep.
    package_data={"infiniteid": ["data/*", "data/world-model/*", "data/world-model/*/*", "data/world-model/*/*/*"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "runtime": [],
        "export": EXPORT,
        "gpu": GPU,
        "serve": SERVE,
        "calibrate": EXPORT + CALIBRATE,
        "train": EXPORT + TRAIN,
        "test": EXPORT + CALIBRATE + TRAIN + TEST,
    },
    entry_points={"console_scripts": ["infiniteid=infiniteid.cli:main"]},
)
