"""Shared fixtures for tests/test_data_*.py: the real extended Mistral tokenizer, real photos, corpora."""

from __future__ import annotations

import base64
import functools
import io
import json
import tempfile

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=1)
def solo_tokenizer_path() -> str:
    from megatron_solo.data.tokenizer import create_solo_tokenizer, mistral_tokenizer_path

    return create_solo_tokenizer(mistral_tokenizer_path(), tempfile.mkdtemp(prefix="solo_tok_"))


@functools.lru_cache(maxsize=1)
def solo_tokenizer():
    from megatron_solo.data.tokenizer import SoloTokenizer

    return SoloTokenizer(solo_tokenizer_path())


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple:
    """sklearn's two real photos (china.jpg, flower.jpg), 640x427, as PIL RGB images."""
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(a) for a in load_sample_images().images)


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def small_photo(i: int, size=(96, 64)) -> Image.Image:
    """A crop of a real photo, resized small (keeps tests fast)."""
    photo = sample_photos()[i % 2]
    x = (i * 37) % 300
    return photo.crop((x, 50, x + 300, 250)).resize(size, Image.BILINEAR)


def write_chat_corpus(path: str, n: int, seed: int = 0, with_bad: bool = False) -> list:
    """n chat-JSONL documents mixing text, 0-2 small photos (data URLs) each."""
    rng = np.random.default_rng(seed)
    docs = []
    words = "the a cat sat on mat photo of red blue tree house river sky".split()
    for i in range(n):
        parts = []
        for _ in range(int(rng.integers(0, 3))):
            w, h = int(rng.integers(20, 130)), int(rng.integers(20, 130))
            parts.append({"type": "image_url", "image_url": {"url": data_url(jpeg_bytes(small_photo(i, (w, h))))}})
        parts.append({"type": "text", "text": " ".join(rng.choice(words, int(rng.integers(3, 40))))})
        docs.append([{"role": "user", "content": "Describe."}, {"role": "assistant", "content": parts}])
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return docs
