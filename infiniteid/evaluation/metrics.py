"""The metrics of the paper's table, on images as uint8 RGB arrays.

* **CLIP-T**: cosine similarity of a generated image's CLIP image embedding and
  its prompt's CLIP text embedding (projected spaces of one CLIP model);
* **CLIP-I**: cosine similarity of the generated image's and the reference
  image's CLIP image embeddings;
* **face similarity**: cosine of the ArcFace embeddings of the two faces (the
  project's face front end: detect, align, embed). An image without a detectable
  face scores ``None`` and is counted, not hidden. A second, independent face
  recogniser (another insightface folder) gives a second column.

The CLIP model is a local transformers folder (``CLIPModel`` weights, a
tokenizer and ``preprocessor_config.json``), e.g. OpenAI's ViT-L/14 that papers
report with; nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np


class MetricsError(ValueError):
    """A metric model folder that is missing or unreadable."""


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``(N, D)`` arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


class ClipScorer:
    """CLIP image and text embeddings from a local transformers folder."""

    def __init__(self, folder: Union[str, Path], device: str = "cpu"):
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise MetricsError(f"CLIP folder not found or incomplete: {folder} (expected a transformers CLIPModel "
                               "folder with config.json, weights, tokenizer files and preprocessor_config.json)")
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise MetricsError(f"cannot load the CLIP model in {folder}: {e}") from None
        self.folder, self.device, self._torch = folder, device, torch

    def image_embeds(self, images: Sequence[np.ndarray]) -> np.ndarray:
        torch = self._torch
        pix = self.processor(images=[np.asarray(i) for i in images], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=pix.to(self.device))
        return _features(out).cpu().numpy()

    def text_embeds(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        max_len = min(int(self.model.config.text_config.max_position_embeddings), 77)
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device))
        return _features(out).cpu().numpy()

    def clip_t(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        return cosine(self.image_embeds(images), self.text_embeds(prompts))

    def clip_i(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> np.ndarray:
        return cosine(self.image_embeds(images), self.image_embeds(references))


def _features(out: Any):
    """transformers returns a tensor, or (in newer versions) an output object holding it."""
    if hasattr(out, "pooler_output") and not hasattr(out, "shape"):
        return out.pooler_output
    return out


class FaceScorer:
    """ArcFace cosine similarity through the project's face front end."""

    def __init__(self, folder: Union[str, Path], det_thresh: float = 0.5):
        from ..face import FaceEmbedder

        self.embedder = FaceEmbedder.from_folder(folder, det_thresh=det_thresh)
        self.folder = Path(folder)

    def embedding(self, image: np.ndarray) -> Optional[np.ndarray]:
        """The face's embedding, or None when no face is found."""
        from ..face.errors import NoFaceError

        try:
            return self.embedder.embed(np.asarray(image)).embedding
        except NoFaceError:
            return None

    def similarity(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> List[Optional[float]]:
        out: List[Optional[float]] = []
        for img, ref in zip(images, references):
            a, b = self.embedding(img), self.embedding(ref)
            out.append(None if a is None or b is None else float(cosine(a[None], b[None])[0]))
        return out


# The paper's Table 1 (AI-written paper notes; treat as leads): CLIP-T, CLIP-I, face similarity.
PAPER_TABLE = {
    "Infinite-ID (paper)": {"clip_t": 0.340, "clip_i": 0.913, "face_sim": 0.689},
    "IP-Adapter-Face (paper)": {"clip_t": 0.313, "clip_i": 0.919, "face_sim": 0.513},
    "PhotoMaker (paper)": {"clip_t": 0.343, "clip_i": 0.814, "face_sim": 0.502},
}
