"""Image -> SOLO patches, step by step as SOLO does it (arXiv 2407.06438, its released code).

1. decode, convert to RGB (:func:`load_image`);
2. target size (:func:`target_size`);
3. PIL bilinear antialiased resize;
4. (in the model, not here) /255 and ImageNet normalisation (:func:`megatron_solo.spec.normalize_patches`);
5. cut into a row-major grid of 32x32 patches, each flattened channel-major (3, 32, 32) -> 3072.

On disk the patches are the resized uint8 pixels (3072 bytes per patch, half of SOLO's float16).

Decisions beyond SOLO (documented in docs/DATA_FORMAT.md):
- EXIF orientation is applied (``exif_transpose=True``): the patches show the photo upright, as a
  viewer (and a captioner) saw it. SOLO's torchvision pipeline ignored EXIF; pass
  ``exif_transpose=False`` (``--no-exif-transpose``) to reproduce that.
- Transparency (RGBA, LA, PA, palette with a transparent index) is composited over white.
  16-bit and 32-bit grayscale are scaled to 8 bits (PIL's ``convert("RGB")`` would clip them).
  CMYK uses PIL's conversion (Adobe-inverted JPEGs are handled by the decoder).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_solo.data.errors import SkipRecord

from megatron_solo.spec import MAX_LONG_SIDE, PATCH_DIM, PATCH_SIZE

DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own bomb limit

try:  # C++ reorder (csrc/patchify.cpp); the numpy path gives the same bytes
    from megatron_solo import _C as _ext

    _HAVE_CPP_PATCHIFY = hasattr(_ext, "patchify")
except ImportError:  # pragma: no cover - the extension is built by setup.py
    _ext = None
    _HAVE_CPP_PATCHIFY = False


def target_size(width: int, height: int) -> tuple[int, int]:
    """SOLO's resize rule: returns (new_width, new_height), both multiples of 32.

    new_L = min(ceil(L/32)*32, 1024); new_S = ceil(floor(new_L*S/L)/32)*32, and 32 where that is 0.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(-(-long_side // PATCH_SIZE) * PATCH_SIZE, MAX_LONG_SIDE)
    new_short = -(-((new_long * short_side) // long_side) // PATCH_SIZE) * PATCH_SIZE
    new_short = max(new_short, PATCH_SIZE)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:  # 8-bit data carried in an int32 image
            scale = 1.0
        elif mode == "I" and arr.max(initial=0) > 65535:
            scale = 1.0 / 16843009.0  # full 32-bit range
        else:
            scale = 1.0 / 257.0  # 16-bit range -> 8 bits
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, I;16 variants handled above


def load_image(data: bytes, *, exif_transpose: bool = True,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image, or raise :class:`SkipRecord` with the reason."""
    return decode_image(data, exif_transpose=exif_transpose, max_image_pixels=max_image_pixels)[0]


def decode_image(data: bytes, *, exif_transpose: bool = True,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Image.Image, str | None, int]:
    """:func:`load_image` plus what the file was: (RGB image, PIL format name, number of frames)."""
    if not data:
        raise SkipRecord("empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise SkipRecord("empty_image", f"{w}x{h}")
            if max_image_pixels is not None and w * h > max_image_pixels:
                raise SkipRecord("decompression_bomb", f"{w}x{h} = {w * h} pixels > {max_image_pixels}")
            img.load()
            fmt, frames = img.format, getattr(img, "n_frames", 1)
            if exif_transpose:  # in place: without an orientation tag the copy would be wasted time
                ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img), fmt, frames
    except SkipRecord:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipRecord("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:  # its text names PIL's BytesIO object, not the file (the caller names that)
        raise SkipRecord("corrupt_image", f"not an image format PIL reads ({len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as e:
        raise SkipRecord("corrupt_image", f"{type(e).__name__}: {e}") from None


def resize_for_patches(img: Image.Image) -> Image.Image:
    """Steps 2-3: resize an RGB image to SOLO's target size (PIL bilinear, antialiased)."""
    size = target_size(*img.size)
    if size == img.size:
        return img
    return img.resize(size, Image.BILINEAR)


def patchify(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 (H, W multiples of 32) -> [n_rows*n_cols, 3072] uint8, row-major grid,
    each patch channel-major (3, 32, 32)."""
    h, w, c = pixels.shape
    if c != 3 or h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"expected [H, W, 3] with H, W multiples of {PATCH_SIZE}, got {pixels.shape}")
    if _HAVE_CPP_PATCHIFY and pixels.dtype == np.uint8:
        return _ext.patchify(np.ascontiguousarray(pixels))
    return patchify_numpy(pixels)


def patchify_numpy(pixels: np.ndarray) -> np.ndarray:
    """The numpy path of :func:`patchify` (kept to test the C++ one against)."""
    h, w, _ = pixels.shape
    r, q = h // PATCH_SIZE, w // PATCH_SIZE
    grid = pixels.reshape(r, PATCH_SIZE, q, PATCH_SIZE, 3).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(grid).reshape(r * q, PATCH_DIM)


def patch_grid(patches: np.ndarray, rows: int, cols: int, gap: int = 0, fill: int = 255) -> np.ndarray:
    """The inverse of :func:`patchify`, for looking at what the model reads: uint8 patches
    ``[rows*cols, 3072]`` -> one ``[H, W, 3]`` picture, with a ``gap``-pixel line of grey level ``fill``
    between patches (``gap=0`` gives back the resized image exactly)."""
    p = np.asarray(patches, dtype=np.uint8).reshape(rows, cols, 3, PATCH_SIZE, PATCH_SIZE).transpose(0, 1, 3, 4, 2)
    step = PATCH_SIZE + gap
    out = np.full((rows * step - gap, cols * step - gap, 3), fill, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            out[r * step:r * step + PATCH_SIZE, c * step:c * step + PATCH_SIZE] = p[r, c]
    return out


def image_to_patches(img: Image.Image) -> tuple[np.ndarray, int, int]:
    """RGB PIL image -> (uint8 [n, 3072], n_rows, n_cols), per SOLO's recipe, docs/DATA_FORMAT.md "Images" (all but normalisation)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    resized = resize_for_patches(img)
    pixels = np.asarray(resized, dtype=np.uint8)
    n_rows, n_cols = pixels.shape[0] // PATCH_SIZE, pixels.shape[1] // PATCH_SIZE
    return patchify(pixels), n_rows, n_cols
