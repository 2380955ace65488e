"""InfiniteID-RT: Infinite-ID (identity-preserving SDXL) from PyTorch to ONNX and TensorRT.

Extras follow the package map in the README:
  runtime - the torch-free runtime (numpy, onnxruntime-gpu, tokenizers, face front end)
  export  - the PyTorch reference and ONNX export (torch, diffusers, transformers, onnx)
  gpu     - TensorRT, polygraphy, Triton and cuda-python for NVIDIA GPU boxes
  train   - training (infiniteid train): export + Hugging Face Accelerate
  test    - what the test suite needs on top of runtime + export
"""
from setuptools import find_packages, setup

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
]
# Training (infiniteid train): Hugging Face Accelerate for DDP / multi-node, on top of export.
TRAIN = ["accelerate>=1.0"]
GPU = [
    "triton>=3.1",
    "polygraphy>=0.49",
    "cuda-python>=12.6.2",
    "tensorrt>=10.9",
]
# tensorrt-lean and cuda-python install without a GPU: the tests check that every
# TensorRT / CUDA name the backend calls exists in the real bindings.
TEST = ["pytest>=8", "triton>=3.1", "tensorrt-lean-cu12>=10.9", "cuda-python>=12.6.2"]

setup(
    name="infiniteid-rt",
    version="0.1.0",
    description="Deployment runtime for Infinite-ID identity-preserving SDXL: ONNX, TensorRT, Triton kernels",
    packages=find_packages(include=["infiniteid", "infiniteid.*"]),
    package_data={"infiniteid": ["data/*"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        "runtime": [],
        "export": EXPORT,
        "gpu": GPU,
        "train": EXPORT + TRAIN,
        "test": EXPORT + TRAIN + TEST,
    },
    entry_points={"console_scripts": ["infiniteid=infiniteid.cli:main"]},
)
