"""Every ```python block of README.md runs, so the README cannot drift from the code.

How it works: the blocks are extracted in order and each is executed (a fresh
namespace) in a working folder laid out like a user's, with tiny stand-ins at the
paths the README uses:

    out/sdxl-fp16, out/tiny        the tiny random-weight bundle (``infiniteid export --tiny``)
    models/antelopev2              a synthetic insightface folder (scripted detector, random ArcFace)
    sdxl-base-1.0, clip-vit-h,     the tiny model saved in the real-weights layout (diffusers SDXL
    infinite-id.safetensors        folder, CLIP image encoder folder, adapter file)
    me.jpg, a.jpg, b.jpg,          drawn faces the synthetic detector finds
    face.jpg, photo.jpg

and with the settings below substituted, so SDXL-sized examples run at the tiny
model's size in seconds (:data:`SUBSTITUTIONS`, applied to the code text).

Conventions for README authors:

* write examples against the paths above (relative, as a user would type them);
* a block that cannot run here (it needs a GPU, TensorRT, real weights, a
  network) must say so, with an HTML comment on the line(s) just before it::

      <!-- not-tested: needs TensorRT engines on a GPU -->
      ```python
      ...

  The reason is printed as the skip reason. Unmarked blocks must run.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

#: text substitutions applied to every block before it runs: SDXL sizes and step counts
#: to the tiny model's (128 px, a couple of steps)
SUBSTITUTIONS = {
    "height=1024, width=1024": "height=128, width=128",
    "height=1024": "height=128",
    "width=1024": "width=128",
    "steps=30": "steps=2",
}

NOT_TESTED = re.compile(r"<!--\s*not-tested:\s*(.*?)\s*-->")


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    code: str
    skip: Optional[str]  # the not-tested reason, if marked


def python_blocks(text: str) -> List[Block]:
    """Every ```python fenced block, with the not-tested reason written just before it (if any)."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = NOT_TESTED.search(lines[k]) if k >= 0 else None
            blocks.append(Block(start + 1, "\n".join(lines[start + 1:j]) + "\n", m.group(1) if m else None))
            i = j + 1
        else:
            i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4 and all(b.code.strip() for b in BLOCKS)


def test_not_tested_marker_is_read():
    text = "intro\n<!-- not-tested: needs a GPU -->\n\n```python\nimport x\n```\n```python\nok = 1\n```\n"
    assert python_blocks(text) == [Block(4, "import x\n", "needs a GPU"), Block(7, "ok = 1\n", None)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A working folder with the files the README's examples name (see the module docstring)."""
    from infiniteid.commands.demo import demo_face, tiny_bundle
    from infiniteid.face import write_synthetic_face_models

    root = tmp_path_factory.mktemp("readme-world")
    bundle = tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False)
    for name in ("sdxl-fp16", "tiny"):
        shutil.copytree(bundle, root / "out" / name)
    write_synthetic_face_models(root / "models" / "antelopev2", seed=0)
    for name, size in (("me.jpg", 256), ("a.jpg", 224), ("b.jpg", 288), ("face.jpg", 256), ("photo.jpg", 240)):
        demo_face(size).save(root / name)
    return root


@pytest.fixture(scope="module")
def weights(world) -> Path:
    """The tiny model in the real-weights layout, at the README's names (needs the export extra)."""
    pytest.importorskip("torch", reason="the PyTorch reference needs the export extra")
    from infiniteid.model.pipeline import InfiniteIDPipeline
    from infiniteid.model.weights_folder import save_weight_folders

    w = save_weight_folders(InfiniteIDPipeline.tiny(seed=0).c, world / ".weights")
    w.base.rename(world / "sdxl-base-1.0")
    w.image_encoder.rename(world / "clip-vit-h")
    w.adapter.rename(world / "infinite-id.safetensors")
    return world


def prepared(code: str) -> str:
    for old, new in SUBSTITUTIONS.items():
        code = code.replace(old, new)
    from infiniteid.devices import cuda_device_count

    if cuda_device_count() == 0:
        code = code.replace('device="cuda"', 'device="cpu"')
    return code


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_python_block_runs(block, world, monkeypatch, request):
    if block.skip:
        pytest.skip(f"README.md:{block.line} is marked not-tested: {block.skip}")
    if "from_pretrained" in block.code:
        request.getfixturevalue("weights")
    monkeypatch.chdir(world)
    code = compile(prepared(block.code), f"README.md:{block.line}", "exec")
    exec(code, {"__name__": f"readme_block_{block.line}"})
