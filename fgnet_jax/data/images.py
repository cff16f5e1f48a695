"""Checking encoded images before they enter a dataset.

A truncated or corrupt file must never silently become a training example (or silently vanish):
builders and indexers (image folders, TFDS splits) call :func:`inspect_image` (or
:func:`image_problem`) on every file and then either stop with a :class:`CorruptImageError`
naming the file or skip it and report the count, per the caller's ``on_corrupt`` policy
(:func:`sort_out`).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from PIL import Image

from fgnet_jax.data.errors import CorruptImageError

log = logging.getLogger(__name__)

ON_CORRUPT_POLICIES = ("error", "skip")
# How much of each image an indexer checks: everything, the header only, nothing.
VERIFY_MODES = ("decode", "header", "none")

# Formats whose bytes TensorFlow (>= 2.17) decode_image reads as 8-bit RGB(A)/grey: stored as
# they are. PNG: 16-bit ones too (PIL opens 16-bit grey as "I;16"/"I", 16-bit colour as 8-bit
# "RGB(A)"; TensorFlow scales every 16-bit PNG to 8 bits, and PIL's own conversion of "I;16"
# would clip it at 255, so such files are never re-encoded). Anything else PIL reads (TIFF, ...)
# is re-encoded once as 8-bit RGB PNG by builders, and reported by the folder indexer (which
# never rewrites files).
_TF_DECODABLE = {
    "JPEG": None,
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I"},
    "GIF": None,
    "BMP": None,
    "WEBP": None,
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# PIL's messages about an in-memory file name the stream object ("<_io.BytesIO object at 0x...>").
_STREAM_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class ImageInfo(NamedTuple):
    width: int
    height: int
    format: str
    data: bytes  # the bytes to store: the input, or an 8-bit PNG re-encoding of it
    mode: str = ""  # PIL's mode of the input, e.g. "RGB", "I;16"


def check_on_corrupt(on_corrupt: str) -> str:
    if on_corrupt not in ON_CORRUPT_POLICIES:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT_POLICIES}, got {on_corrupt!r}")
    return on_corrupt


def check_verify(verify: str) -> str:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    return verify


def _pil_detail(error: Exception) -> str:
    """PIL's message on one line, without the in-memory stream it names instead of the file."""
    return _STREAM_REPR.sub("the data", " ".join(str(error).split())) or type(error).__name__


def _depth(fmt: str, mode: str) -> str:
    if mode.startswith("I;16"):
        return f"16-bit {fmt}"
    return f"32-bit {fmt}" if mode in ("I", "F") else fmt


def inspect_image(data: bytes, name: str, *, decode: bool = True) -> ImageInfo:
    """Returns the size and storable bytes of one encoded image, or raises CorruptImageError
    saying in words what is wrong: an empty file, not an image, a truncated or corrupt one.

    With ``decode=True`` the whole image is decoded (JPEGs at 1/8 scale through libjpeg's DCT
    scaling, which still reads every entropy-coded byte), so a truncated file is caught; with
    ``decode=False`` only the header is read.
    """
    if not data:
        raise CorruptImageError(name, "empty file (0 bytes), not an image")
    # The pixel limit is checked here, not by turning PIL's DecompressionBombWarning into an error:
    # warnings.catch_warnings swaps the process-wide filters and is not thread-safe, and indexers
    # call this from several threads.
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise CorruptImageError(
            name, f"not an image ({len(data)} bytes in no image format PIL can identify)") from None
    except Image.DecompressionBombError as error:
        raise CorruptImageError(name, f"{_pil_detail(error)} (PIL.Image.MAX_IMAGE_PIXELS sets the limit)") from None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise CorruptImageError(name, f"unreadable image header ({_pil_detail(error)})") from error
    width, height = image.size
    fmt = image.format or "unknown"
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise CorruptImageError(name, f"{fmt} image of {width}x{height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS "
                                      f"({limit}): refused as a possible decompression bomb (raise the limit if "
                                      "you trust the file)")
    if decode:
        try:
            if fmt == "JPEG":
                image.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
            image.load()
        except Exception as error:
            raise CorruptImageError(name, f"truncated or corrupt {fmt} image ({_pil_detail(error)})") from error
    if width < 1 or height < 1:
        raise CorruptImageError(name, f"{fmt} image of {width}x{height} pixels: no pixels")
    modes = _TF_DECODABLE.get(fmt, set())
    if fmt in _TF_DECODABLE and (modes is None or image.mode in modes):
        return ImageInfo(width, height, fmt, data, image.mode)
    mode = image.mode
    if not decode:
        image = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return ImageInfo(width, height, fmt, buffer.getvalue(), mode)


def image_problem(data: bytes, name: str, verify: str) -> CorruptImageError | None:
    """What is wrong with an image an indexer would hand to TensorFlow as it is, or None.

    ``verify="decode"`` decodes it, ``"header"`` reads only its header. An image that PIL
    reads but TensorFlow's decoders cannot (TIFF, ...) is a problem too: indexers never rewrite
    stored files (builders do, through :func:`inspect_image`'s ``data``).
    """
    try:
        info = inspect_image(data, name, decode=verify == "decode")
    except CorruptImageError as error:
        return error
    if info.data is not data:
        return CorruptImageError(name, f"{_depth(info.format, info.mode)} image (PIL mode {info.mode}), which "
                                       "TensorFlow cannot decode; convert it to JPEG or 8-bit PNG")
    return None


def sort_out(names: Sequence[str], problems: Iterable[CorruptImageError | None], on_corrupt: str) -> list[bool]:
    """Which of ``names`` to keep, given each one's problem (or None).

    ``on_corrupt="error"`` raises the first problem; ``"skip"`` logs each and marks it False.
    """
    keep = []
    for name, problem in zip(names, problems, strict=True):
        if problem is not None:
            if on_corrupt == "error":
                raise problem
            log.warning("skipping %s: %s", problem.file, problem.problem)
        keep.append(problem is None)
    return keep
