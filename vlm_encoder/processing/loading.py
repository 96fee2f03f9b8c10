"""`load_image`: open, verify and fully decode one image file, with errors that say why not."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

# Signatures of text files often saved under an image name (a web page, an error message).
_TEXT_PREFIXES = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{", b"[")


class ImageLoadError(ValueError):
    """An image file that cannot be used: its `source` and the `reason`."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def _describe(source: str | os.PathLike | bytes | bytearray | memoryview) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def _read_bytes(source: str | os.PathLike | bytes | bytearray | memoryview, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image takes a path or bytes, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(name, "no such file")
    if not path.is_file():
        raise ImageLoadError(name, "not a regular file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageLoadError(name, f"cannot be read ({err})") from None


def _not_an_image_reason(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith(_TEXT_PREFIXES):
        return f"not an image: the file is text (starts with {data[:32]!r}), e.g. a web page saved under an image name"
    return f"not an image in a format PIL can read (starts with {data[:16]!r})"


def load_image(
    source: str | os.PathLike | bytes | bytearray | memoryview, *, max_pixels: int | None = None
) -> Image.Image:
    """Open, verify and fully decode an image, so later code never meets a lazy decode error.

    The image is returned as stored (its mode and EXIF orientation untouched; `ImageProcessor`
    handles both). PIL's global settings are not changed: the decompression-bomb limit is
    checked here for this image only.

    Args:
        source: A file path, or the file's bytes.
        max_pixels: Refuse images with more pixels than this; defaults to
            `PIL.Image.MAX_IMAGE_PIXELS` (it cannot loosen PIL's own limit; `None` there
            disables the check).

    Returns:
        The decoded `PIL.Image.Image`, detached from the file.

    Raises:
        ImageLoadError: The file is missing, empty, not an image (e.g. HTML saved as `.jpg`),
            truncated or corrupt, or larger than the pixel limit; the message names the
            source and the reason.
    """
    name = _describe(source)
    data = _read_bytes(source, name)
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    def too_large(size: tuple[int, int]) -> ImageLoadError:
        return ImageLoadError(
            name,
            f"image of {size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds the limit of {limit} pixels "
            "(a possible decompression bomb); pass max_pixels or raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted",
        )

    with warnings.catch_warnings():
        # The size is checked below against `limit`; PIL's own warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                size = probe.size
                if limit is not None and size[0] * size[1] > limit:
                    raise too_large(size)
                probe.verify()
            image = Image.open(io.BytesIO(data))
            image.load()
        except ImageLoadError:
            raise
        except Image.DecompressionBombError as err:
            raise ImageLoadError(name, f"exceeds PIL's decompression-bomb limit ({err})") from None
        except Image.UnidentifiedImageError:
            raise ImageLoadError(name, _not_an_image_reason(data)) from None
        except (MemoryError, RecursionError) as err:
            raise ImageLoadError(name, f"corrupt image: decoding failed ({type(err).__name__})") from None
        except Exception as err:  # noqa: BLE001 - PIL's decoders raise many types for corrupt data
            reason = str(err) or type(err).__name__
            if "truncated" in reason.lower():
                raise ImageLoadError(name, f"truncated image file ({reason})") from None
            raise ImageLoadError(name, f"corrupt or unreadable image ({type(err).__name__}: {reason})") from None
    if image.width * image.height == 0:
        raise ImageLoadError(name, f"image has no pixels (size {image.width}x{image.height})")
    return image
