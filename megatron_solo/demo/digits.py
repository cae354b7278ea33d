"""Corpora from scikit-learn's real handwritten digits (``load_digits``: 1797 images of 8x8).

Each digit is upscaled to 64x64 (2x2 SOLO patches, so the image block has a row separator) and
written as a real PNG file, so the preprocessing tool decodes and resizes it as it would a photo.
Two corpora, in the formats a real user has:

- ``pretrain.jsonl``: stage-1 style, "image, then its label in words" (SOLO's ImageNet stage);
- ``sft.jsonl``: chat format, user: image + "Which digit is this?", assistant: the answer;

and ``test.jsonl``: the held-out split (image path + label) that training never sees.
"""

from __future__ import annotations

import json
import os

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "Which digit is this?"


def digit_image(pixels8x8: np.ndarray, size: int = 64):
    """8x8 digit (values 0..16, ink high) -> RGB PIL image, dark ink on white, nearest-upscaled."""
    from PIL import Image

    gray = (255 - np.clip(pixels8x8, 0, 16) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.NEAREST).convert("RGB")


def write_corpora(out_dir: str, test_fraction: float = 0.2, seed: int = 0, size: int = 64) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    test_idx, train_idx = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    for i in range(n):
        path = os.path.join(img_dir, f"digit_{i:04d}.png")
        if not os.path.exists(path):
            digit_image(digits.images[i], size).save(path)

    def image_part(i):
        return {"type": "image_url", "image_url": {"url": f"images/digit_{i:04d}.png"}}

    paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in ("pretrain", "sft", "test")}
    with open(paths["pretrain"], "w") as f:
        for i in train_idx:
            msg = {"role": "assistant", "content": [image_part(i), {"type": "text", "text": WORDS[digits.target[i]]}]}
            f.write(json.dumps({"messages": [msg]}) + "\n")
    with open(paths["sft"], "w") as f:
        for i in train_idx:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [image_part(i), {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": WORDS[digits.target[i]]},
            ]}) + "\n")
    with open(paths["test"], "w") as f:
        for i in test_idx:
            f.write(json.dumps({"image": f"images/digit_{i:04d}.png", "label": int(digits.target[i]),
                                "answer": WORDS[digits.target[i]]}) + "\n")
    return {"train": len(train_idx), "held_out": len(test_idx), **paths, "image_root": out_dir}
