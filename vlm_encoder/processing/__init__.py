"""Image preprocessing: any image -> the normalized `(B, 3, H, W)` batch an encoder takes.

`ImageProcessor` reproduces the eval transforms of HF (CLIP, SigLIP, ViT, BiT/DINOv2),
open_clip and timm from their own settings; `load_image` reads files with clear errors.
"""

from .config import ProcessorConfig
from .loading import ImageLoadError, load_image
from .processor import ImageProcessor

__all__ = ["ImageLoadError", "ImageProcessor", "ProcessorConfig", "load_image"]
