"""The tiny model's image geometry, without PyTorch.

:mod:`infiniteid.model.tiny` builds its U-Net from these numbers; the export
command reads them to check ``--tiny`` heights and widths before it imports
PyTorch (a tiny test asserts the two agree).
"""
from __future__ import annotations

from ..generation import VAE_SCALE_FACTOR, resolution_multiple

UNET_SAMPLE_SIZE = 16  # latent side of the native size
UNET_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")

#: (pixels a side must divide by, native side in pixels): (16, 128)
RESOLUTION = (resolution_multiple(len(UNET_DOWN_BLOCKS)), UNET_SAMPLE_SIZE * VAE_SCALE_FACTOR)
