"""TensorRT engines for a bundle: where they live, what they were built from, how to build them.

The pieces, so the part that needs TensorRT stays small:

* :mod:`.names`: the engine folder name (GPU, compute capability, TensorRT version)
  and the JSON sidecar written next to every plan; atomic writes;
* :mod:`.profiles`: optimisation profiles from the manifest's shape ranges;
* :mod:`.engine_check`: refusing engines built for another GPU, another TensorRT
  or from another ONNX file, with the command that rebuilds them;
* :mod:`.trust`: whether a plan may run the host code it carries (version-compatible
  plans, serialised plugin libraries): only when built on this machine or trusted;
* :mod:`.step_graph`: the ONNX graph of guidance + scheduler step that lets the
  denoising loop stay on the GPU;
* :mod:`.plan`: what a build does, component by component (precision checks,
  profiles, up-to-date checks, sidecars), with the TensorRT call injected;
* :mod:`.builder`: the TensorRT builder calls themselves (thin);
* :mod:`.cuda`: the cuda-python calls the runtime needs (thin).

Nothing here imports ``tensorrt`` at import time.
"""
