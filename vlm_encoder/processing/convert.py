"""Input normalisation: any accepted image -> one RGB array `(H, W, 3)` on the 0-255 scale.

8-bit inputs stay `uint8` (so the resize is bit-identical to the reference libraries');
16-bit and float inputs become `float32` in `[0, 255]` so no precision is lost before the
resize. The rules are listed in `ImageProcessor`'s docstring; the channel axis is never guessed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

# PIL modes holding 16-bit unsigned samples.
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_UINT16_SCALE = 255.0 / 65535.0


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _gray16_to_rgb(values: np.ndarray, key: object, background: tuple[int, int, int]) -> np.ndarray:
    """16-bit grey values `(H, W)` (0-65535) as float32 RGB in `[0, 255]`; pixels equal to the
    PNG transparency `key` (an int, when given) become `background`, as 8-bit modes are composited."""
    rgb = _gray_to_rgb(values.astype(np.float32) * np.float32(_UINT16_SCALE))
    if isinstance(key, int) and not isinstance(key, bool):
        rgb[values == key] = np.asarray(background, dtype=np.float32)
    return rgb


def _decode(image: Image.Image) -> None:
    """Finish a lazily opened image's decode, as a `ValueError` that says why it failed."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types for corrupt data
        raise ValueError(
            f"PIL image ({image.format or 'unknown format'}, {image.width}x{image.height}, mode {image.mode}) "
            f"cannot be decoded: {type(err).__name__}: {err}; the file is truncated or corrupt "
            "(open files with load_image, which checks them and names the file)"
        ) from None


def _check_unit_range(values: np.ndarray, what: str) -> None:
    low, high = float(values.min()), float(values.max())
    if not (0.0 <= low and high <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{what} has values in [{low}, {high}]; float images must lie in [0, 1] "
            "(scale them, or pass uint8 values 0-255)"
        )


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def pil_to_rgb(image: Image.Image, background: tuple[int, int, int], exif_transpose: bool = True) -> np.ndarray:
    """A PIL image of any mode as `(H, W, 3)` `uint8`, or `float32` in `[0, 255]` for 16-bit/float modes.

    Raises:
        ValueError: A mode with no RGB meaning (named), an `I` / `F` image out of range, or a
            lazily opened image whose data cannot be decoded (truncated or corrupt).
    """
    _decode(image)
    if exif_transpose:
        image = _apply_exif_orientation(image)
    mode = image.mode
    if mode in ("RGBa", "La"):  # premultiplied alpha: undo it before compositing
        image = image.convert("RGBA" if mode == "RGBa" else "LA")
        mode = image.mode
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha and mode not in _UINT16_MODES + ("I", "F"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
    if mode == "RGB":
        return np.asarray(image)
    if mode in _UINT16_MODES:
        return _gray16_to_rgb(np.asarray(image), image.info.get("transparency"), background)
    if mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"PIL mode 'I' image has values in [{low}, {high}]; mode 'I' is read as 16-bit (0-65535, "
                "how PIL stores 16-bit PNG/TIFF data). Rescale it, or convert it to 'L' or 'F' yourself"
            )
        return _gray16_to_rgb(values, image.info.get("transparency"), background)
    if mode == "F":
        values = np.asarray(image)
        _check_unit_range(values, "PIL mode 'F' image")
        return _gray_to_rgb(values * np.float32(255.0))
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(
            f"PIL mode {mode!r} cannot be converted to RGB ({err}); supported: RGB, RGBA, L, LA, 1, P, PA, "
            "CMYK, YCbCr, HSV, I;16, I, F"
        ) from None


def array_to_rgb(array: np.ndarray, kind: str = "numpy") -> np.ndarray:
    """A numpy image, always channels-last: `(H, W)`, `(H, W, 1)` or `(H, W, 3)`.

    dtypes: `uint8` (0-255), `uint16` (0-65535, scaled to 0-255), float in `[0, 1]`.

    Raises:
        ValueError: Another shape (named, with what is allowed), dtype or float range.
    """
    if array.ndim == 3 and array.shape[2] in (1, 3):
        pass
    elif array.ndim != 2:
        raise ValueError(
            f"numpy image has shape {array.shape}; numpy images are channels-last: (H, W) grayscale, "
            "(H, W, 1) or (H, W, 3) RGB. The channel axis is never guessed: transpose a (C, H, W) array "
            "with a.transpose(1, 2, 0); for RGBA use PIL.Image.fromarray(a, 'RGBA') to composite it"
        )
    if 0 in array.shape:
        raise ValueError(f"{kind} image has shape {array.shape}, which has no pixels")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == np.uint8:
        rgb = array
    elif array.dtype == np.uint16:
        rgb = array.astype(np.float32) * np.float32(_UINT16_SCALE)
    elif array.dtype in _FLOAT_DTYPES:
        _check_unit_range(array, f"{kind} {array.dtype} image")
        rgb = array.astype(np.float32) * np.float32(255.0)
    else:
        raise ValueError(
            f"numpy image has dtype {array.dtype}; allowed: uint8 (0-255), uint16 (0-65535), "
            "float16/32/64 in [0, 1]"
        )
    return _gray_to_rgb(rgb) if rgb.ndim == 2 else np.ascontiguousarray(rgb)


def tensor_to_rgb(tensor: torch.Tensor) -> np.ndarray:
    """A torch image, always channels-first: `(H, W)`, `(1, H, W)` or `(3, H, W)`.

    dtypes: `uint8` (0-255), `uint16` (0-65535), float in `[0, 1]`.

    Raises:
        ValueError: Another shape (named, with what is allowed), dtype or float range.
    """
    shape = tuple(tensor.shape)
    if tensor.ndim == 4:
        raise ValueError(
            f"torch image has shape {shape}, a batch; pass one (C, H, W) image or a list of them"
        )
    if not (tensor.ndim == 2 or (tensor.ndim == 3 and shape[0] in (1, 3))):
        raise ValueError(
            f"torch image has shape {shape}; torch images are channels-first: (H, W) grayscale, "
            "(1, H, W) or (3, H, W) RGB. The channel axis is never guessed: permute an (H, W, C) tensor "
            "with t.permute(2, 0, 1)"
        )
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint16:
        array = tensor.to(torch.int32).numpy().astype(np.uint16)
    elif tensor.dtype == torch.uint8:
        array = tensor.numpy()
    elif tensor.is_floating_point():
        array = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32).numpy()
    else:
        raise ValueError(
            f"torch image has dtype {tensor.dtype}; allowed: uint8 (0-255), uint16 (0-65535), float in [0, 1]"
        )
    return array_to_rgb(array if array.ndim == 2 else np.moveaxis(array, 0, -1), "torch")  # (H, W, C)


def to_rgb(image: object, background: tuple[int, int, int], exif_transpose: bool = True) -> np.ndarray:
    """Any accepted image as an RGB array `(H, W, 3)`: `uint8`, or `float32` in `[0, 255]`.

    Raises:
        TypeError: Not a PIL image, numpy array or torch tensor.
        ValueError: A shape, dtype, range or mode outside the rules.
    """
    if isinstance(image, Image.Image):
        rgb = pil_to_rgb(image, background, exif_transpose)
    elif isinstance(image, np.ndarray):
        rgb = array_to_rgb(image)
    elif isinstance(image, torch.Tensor):
        rgb = tensor_to_rgb(image)
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; pass a PIL.Image.Image, a numpy array (H, W[, C]), "
            "a torch tensor ([C,] H, W) or a path (loaded with load_image)"
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image of size {rgb.shape[1]}x{rgb.shape[0]} has no pixels")
    return rgb
