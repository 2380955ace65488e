"""InfiniteID-RT: Infinite-ID (identity-preserving SDXL) from PyTorch to ONNX, TensorRT and a torch-free runtime.

Subpackages (see the README's package map): ``model`` (PyTorch reference),
``export`` (ONNX bundles), ``kernels`` (Triton mixed attention), ``trt``
(TensorRT engines), ``runtime`` (torch-free generation), ``face`` (face front
end), ``commands`` (the CLI). Importing this package imports nothing else.
"""

__version__ = "0.1.0"  # the one place the version is written; setup.py reads it from here
