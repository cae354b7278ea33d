"""Image -> patches against a plain, separate re-implementation of SOLO's recipe (docs/DATA_FORMAT.md "Images"; PIL + numpy)."""

import math

import numpy as np
import pytest
from PIL import Image

from megatron_solo.data.image import (
    image_to_patches,
    load_image,
    patchify,
    patchify_numpy,
    target_size,
)
from megatron_solo.spec import normalize_patches
from tests.data_fixtures.helpers import jpeg_bytes, sample_photos

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def ref_size(w, h):
    """SOLO's resize rule (step 2), written out with floats as the spec states it."""
    L, S = max(w, h), min(w, h)
    new_L = min(math.ceil(L / 32) * 32, 1024)
    new_S = math.ceil(math.floor(new_L * S / L) / 32) * 32
    if new_S == 0:
        new_S = 32
    return (new_L, new_S) if w >= h else (new_S, new_L)


def ref_solo_patches(img):
    """SOLO's float16 patches: RGB, resize (PIL bilinear), /255, normalise, grid, channel-major."""
    img = img.convert("RGB")
    w, h = ref_size(*img.size)
    img = img.resize((w, h), Image.BILINEAR)
    a = np.asarray(img).astype(np.float32) / np.float32(255)
    a = ((a - MEAN) / STD).transpose(2, 0, 1)  # C, H, W
    out = []
    for r in range(h // 32):
        for c in range(w // 32):
            out.append(a[:, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].reshape(-1))
    return np.stack(out).astype(np.float16), h // 32, w // 32


def synthetic(w, h, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(w, dtype=np.uint8)[None, :]
    y = np.arange(h, dtype=np.uint8)[:, None]
    base = np.stack([x * 7 + y * 3, x * 2 + y * 11, x ^ y], -1)  # uint8 arithmetic wraps mod 256
    return Image.fromarray(base + rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("w,h,expect", [(500, 375, (512, 384)), (2048, 1536, (1024, 768)), (40, 10, (64, 32)),
                                        (375, 500, (384, 512)), (3000, 1, (1024, 32)), (1, 3000, (32, 1024)),
                                        (1, 1, (32, 32)), (31, 33, (64, 64)), (1024, 1024, (1024, 1024))])
def test_target_size_examples(w, h, expect):
    assert target_size(w, h) == expect
    assert ref_size(w, h) == expect


def test_target_size_matches_reference_everywhere():
    rng = np.random.default_rng(0)
    for w, h in rng.integers(1, 5000, size=(3000, 2)):
        assert target_size(int(w), int(h)) == ref_size(int(w), int(h)), (w, h)


def _check_against_solo(img):
    patches, rows, cols = image_to_patches(img)
    ref, ref_rows, ref_cols = ref_solo_patches(img)
    assert (rows, cols) == (ref_rows, ref_cols)
    assert patches.dtype == np.uint8 and patches.shape == (rows * cols, 3072)
    ours = normalize_patches(patches).numpy()
    assert ours.dtype == np.float32
    # the values the model sees equal SOLO's stored float16 values within float16 rounding
    tol = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(ours - ref.astype(np.float32)) <= tol)
    assert np.array_equal(ours.astype(np.float16), ref)


@pytest.mark.parametrize("i", [0, 1])
def test_real_photos_match_solo(i):
    photo = sample_photos()[i]
    assert photo.size == (640, 427)
    _check_against_solo(photo)
    # decoded through the loader from JPEG bytes too
    _check_against_solo(load_image(jpeg_bytes(photo)))


@pytest.mark.parametrize("w,h", [(1, 3000), (3000, 1), (31, 33), (1024, 1024), (4000, 3000)])
def test_extreme_shapes_match_solo(w, h):
    _check_against_solo(synthetic(w, h))


def test_patch_layout_is_row_major_channel_major():
    # every pixel carries its own coordinates: check where each byte lands
    h, w = 64, 96
    yy, xx = np.mgrid[0:h, 0:w]
    pix = np.stack([yy, xx, (yy + xx) % 256], -1).astype(np.uint8)
    p = patchify(pix)
    assert p.shape == (6, 3072)
    for k in range(6):
        r, c = divmod(k, 3)
        chw = p[k].reshape(3, 32, 32)
        assert np.array_equal(chw[0], yy[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32])
        assert np.array_equal(chw[1], xx[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32])
    assert np.array_equal(p, patchify_numpy(pix))


def test_cpp_patchify_equals_numpy():
    from megatron_solo import _C

    rng = np.random.default_rng(1)
    for h, w in [(32, 32), (96, 1024), (1024, 64)]:
        pix = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        assert np.array_equal(_C.patchify(pix), patchify_numpy(pix))
    with pytest.raises(ValueError):
        _C.patchify(np.zeros((33, 32, 3), np.uint8))
