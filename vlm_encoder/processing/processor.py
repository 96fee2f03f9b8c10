"""`ImageProcessor`: images in any accepted form -> one normalized batch `(B, 3, H, W)`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..pretrained import PROCESSOR_NAME, resolve_pretrained_dir, write_atomic
from .config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ProcessorConfig, ResizeBackend
from .convert import to_rgb
from .from_hf import config_from_hf
from .from_open_clip import config_from_open_clip
from .from_timm import config_from_timm
from .loading import ImageLoadError, load_image
from .transforms import center_crop_or_pad, pad_bottom_right, rescale_and_normalize, resize, resized_size

if TYPE_CHECKING:
    from ..config import VisionConfig

PROCESSOR_CONFIG_NAME = PROCESSOR_NAME  # the file save_pretrained writes beside a model
PROCESSOR_TYPE = "vlm_encoder.ImageProcessor"

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]


def _with_index(err: ValueError | TypeError, index: int) -> ValueError | TypeError:
    """The same kind of error, its message prefixed with the image's index in the list."""
    if isinstance(err, ImageLoadError):  # keeps `source` and `reason`
        wrapped = ImageLoadError(err.source, err.reason)
        wrapped.args = (f"image {index}: {err}",)
        return wrapped
    try:
        return type(err)(f"image {index}: {err}")
    except TypeError:  # a subclass with another constructor
        return (ValueError if isinstance(err, ValueError) else TypeError)(f"image {index}: {err}")


def _check_resize_area(source: tuple[int, int], size: tuple[int, int], cfg: ProcessorConfig) -> None:
    """Refuse a resize that would enlarge an image past `PIL.Image.MAX_IMAGE_PIXELS`.

    `shortest_edge` scales the long side with the short one, so a tiny file of extreme aspect
    ratio (a 1 x 100000 strip) would become a multi-gigabyte intermediate before the crop.
    """
    limit = Image.MAX_IMAGE_PIXELS
    area = size[0] * size[1]
    if limit is None or area <= limit or area <= source[0] * source[1]:
        return
    raise ValueError(
        f"resizing the {source[1]}x{source[0]} image ({cfg.resize_mode} to {cfg.size[1]}x{cfg.size[0]}) would make "
        f"{size[1]}x{size[0]} = {area} pixels, over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS): its aspect "
        "ratio is too extreme for this resize; crop it first, or use resize_mode='exact' or 'longest_edge' "
        "(with crop_size to pad)"
    )


class ImageProcessor:
    """Turns images into the normalized pixel batch an encoder takes: `(B, 3, H, W)` float32.

    Steps: input to RGB (rules below) -> resize (`config.resize_mode`) -> center crop or pad
    (`config.crop_size`) -> `(x * rescale_factor - mean) / std`. Built from a
    `ProcessorConfig`, or from HF / open_clip / timm settings, whose eval transforms it
    reproduces on RGB images (max abs difference <= 1e-6 in the tests).

    Input rules (the channel axis is never guessed):

    - PIL images, any mode. The EXIF orientation is applied first (`exif_transpose`).
      RGBA, LA, PA, RGBa/La (premultiplied) and P/L/RGB with a `transparency` key are
      composited on `config.background` (white by default, as HF does). L and 1 are
      replicated to three channels. P, CMYK, YCbCr, HSV go through `Image.convert('RGB')`.
      16-bit `I;16*` maps 0-65535 onto 0-255 (65535 is white, nothing saturates); `I` is
      read as 16-bit too and must lie in [0, 65535]; their pixels equal to an int
      `transparency` key (a 16-bit PNG's tRNS) take `config.background`. `F` must lie in
      [0, 1] (its transparency key is ignored). 16-bit and float data keep full precision
      through the resize (float32).
    - numpy arrays are channels-last: `(H, W)` grayscale, `(H, W, 1)` or `(H, W, 3)`; so
      `(3, 3, 3)` is a 3x3 RGB image. dtype uint8 (0-255), uint16 (0-65535) or float in [0, 1].
    - torch tensors are channels-first: `(H, W)`, `(1, H, W)` or `(3, H, W)`; so
      `(1, 5, 3)` is a 5x3 grayscale image and `(5, 4, 3)` is an error. dtype uint8, uint16 or
      float in [0, 1]. A 4-D batch is an error (pass a list).
    - A `str` / path is read with `load_image` (clear errors for broken files).

    Any other shape, channel count (e.g. 4: use PIL to composite RGBA), dtype, a float outside
    [0, 1] or NaN raises `ValueError` naming what was given and what is allowed; so do a
    lazily opened PIL image that fails to decode (truncated) and a resize that would enlarge
    an image past `PIL.Image.MAX_IMAGE_PIXELS` (a 1 x 100000 strip under `shortest_edge`).

    Sizes: any input of at least one pixel is accepted (within that limit). With
    `resize_mode='exact'` or a `crop_size` every output has the size `config.output_size`,
    so an encoder at that size gives `prefix + (H/p)(W/p)` tokens whatever the input
    (1x1, 13x13, 10000x50).

    Example:
        >>> processor = ImageProcessor.from_hf_config(json.load(open("preprocessor_config.json")))
        >>> pixels = processor([image_a, image_b])  # (2, 3, 224, 224)
    """

    def __init__(self, config: ProcessorConfig | None = None) -> None:
        self.config = config if config is not None else ProcessorConfig()

    def __repr__(self) -> str:
        return f"ImageProcessor({self.config})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageProcessor) and other.config == self.config

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, data: dict[str, Any], *, backend: ResizeBackend | None = None) -> "ImageProcessor":
        """From a HF `preprocessor_config.json` dict (CLIP, SigLIP, SigLIP2 NaFlex, ViT,
        BiT/DINOv2 processors).

        Args:
            data: The dict.
            backend: `torchvision` (transformers 5's default processors) or `pil`
                (transformers 4 / `...ImageProcessorPil`); default from the class name, else
                `torchvision`.
        """
        return cls(config_from_hf(data, backend=backend))

    @classmethod
    def from_open_clip(cls, cfg: Any) -> "ImageProcessor":
        """From open_clip's `PreprocessCfg` (or its dict): `open_clip.image_transform`'s eval transform."""
        return cls(config_from_open_clip(cfg))

    @classmethod
    def from_timm(cls, data_config: dict[str, Any]) -> "ImageProcessor":
        """From `timm.data.resolve_data_config(...)`: `timm.data.create_transform`'s eval transform."""
        return cls(config_from_timm(data_config))

    @classmethod
    def default_for(cls, config: "VisionConfig") -> "ImageProcessor":
        """A processor for an encoder without preprocessing metadata: squash (bicubic) to its
        native `image_size`, OpenAI CLIP mean/std (the statistics of most VLM vision towers;
        use a converter above when the checkpoint's own settings are known)."""
        return cls(
            ProcessorConfig(
                resize_mode="exact",
                size=config.image_size,
                interpolation="bicubic",
                mean=OPENAI_CLIP_MEAN,
                std=OPENAI_CLIP_STD,
            )
        )

    def at_size(self, size: tuple[int, int]) -> "ImageProcessor":
        """This processor squashing every image to `size` `(H, W)` (no crop), its other steps
        (filter, backend, rescale, mean/std) kept: the fixed-size processor of one image of a
        native-resolution run (`packing.target_size`)."""
        return ImageProcessor(
            self.config.replace(resize_mode="exact", size=tuple(size), crop_size=None, patch_size=None, max_patches=None,
                                min_pixels=None, max_pixels=None, factor=None, pooling_kernel_size=None,
                                max_side=None)
        )

    # ---- serialization ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"processor_type": PROCESSOR_TYPE, **self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageProcessor":
        """From `to_dict()`'s output (unknown keys are an error)."""
        kind = data.get("processor_type", PROCESSOR_TYPE)
        if kind != PROCESSOR_TYPE:
            raise ValueError(
                f"processor_type={kind!r} is not {PROCESSOR_TYPE!r}; "
                "for a HF preprocessor_config.json use from_hf_config"
            )
        return cls(ProcessorConfig.from_dict({k: v for k, v in data.items() if k != "processor_type"}))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `processor_config.json` into `save_directory` atomically.

        Returns:
            The file's path.
        """
        path = Path(save_directory) / PROCESSOR_CONFIG_NAME
        write_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())
        return path

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, revision: str | None = None) -> "ImageProcessor":
        """Read `processor_config.json` from a directory written by `save_pretrained` (or a hub repo id)."""
        directory = resolve_pretrained_dir(source, files=(PROCESSOR_CONFIG_NAME,), revision=revision)
        path = directory / PROCESSOR_CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data)

    # ---- processing ---------------------------------------------------------------------

    def preprocess_one(self, image: ImageInput) -> torch.Tensor:
        """One image after resize and crop, before normalization.

        Returns:
            `(3, H, W)` on the 0-255 scale: uint8, or float32 for 16-bit / float inputs.
        """
        cfg = self.config
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        rgb = to_rgb(image, cfg.background, cfg.exif_transpose)  # (H, W, 3)
        if cfg.resize_mode == "naflex":
            from ..packing.sizing import naflex_size

            size = naflex_size(rgb.shape[0], rgb.shape[1], cfg.patch_size, cfg.max_patches)
        elif cfg.resize_mode == "smart_resize":
            from ..packing.sizing import smart_resize_size

            size = smart_resize_size(rgb.shape[0], rgb.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
        elif cfg.resize_mode == "gemma4":
            from ..packing.sizing import gemma4_size

            size = gemma4_size(rgb.shape[0], rgb.shape[1], cfg.patch_size, cfg.max_patches, cfg.pooling_kernel_size)
        elif cfg.resize_mode == "kimi_k25":
            from ..packing.sizing import kimi_k25_size

            size, padded = kimi_k25_size(rgb.shape[0], rgb.shape[1], cfg.patch_size, cfg.factor, cfg.max_patches,
                                         cfg.max_side)
        else:
            size = resized_size(rgb.shape[0], rgb.shape[1], cfg.resize_mode, cfg.size)
        _check_resize_area(rgb.shape[:2], size, cfg)
        pixels = resize(rgb, size, cfg.interpolation, cfg.backend)  # (3, h, w)
        if cfg.resize_mode == "kimi_k25":  # pad bottom / right to whole merge units
            pixels = pad_bottom_right(pixels, padded, cfg.pad_fill)
        if cfg.crop_size is not None:
            pixels = center_crop_or_pad(pixels, cfg.crop_size, cfg.crop_rounding, cfg.pad_fill)
        return pixels

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Process one image or a list of them (sizes may differ).

        Args:
            images: An image (see the class docstring) or a list/tuple of images.

        Returns:
            `(B, 3, H, W)` float32; `B = 1` for a single image.

        Raises:
            ValueError: An input outside the rules, an empty list, or outputs of different
                sizes (only possible without a crop or exact resize).
        """
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given (an empty list)")
        processed = []
        for index, image in enumerate(batch):
            try:
                processed.append(self.preprocess_one(image))
            except (ValueError, TypeError) as err:
                if len(batch) == 1:
                    raise
                raise _with_index(err, index) from err
        sizes = {tuple(p.shape[-2:]) for p in processed}
        if len(sizes) > 1:
            raise ValueError(
                f"processed images have different sizes {sorted(sizes)} and cannot be stacked; "
                + (f"a {'NaFlex' if self.config.resize_mode == 'naflex' else self.config.resize_mode} processor "
                   "sizes each image to its own grid: process one image at a time and encode the list with "
                   "vlm_encoder.packing.encode_packed (or one image per call)"
                   if self.config.resize_mode in ("naflex", "smart_resize", "gemma4", "kimi_k25")
                   else "set crop_size or resize_mode='exact' for a fixed output size")
            )
        floating = any(p.is_floating_point() for p in processed)
        stacked = torch.stack([p.float() if floating else p for p in processed])  # (B, 3, H, W)
        return rescale_and_normalize(stacked, self.config.rescale_factor, self.config.mean, self.config.std)
