#!/usr/bin/env python
"""Show what the model sees: write a PNG of each image's patch grid in one stored pack and print its text.

    python tools/visualize_patches.py --prefix out/cc3m --pack 0 --tokenizer-model tok/tokenizer.model --out pack0.png
"""

import argparse
import sys


def render(tokens, patches, gap: int = 2):
    """Images of a token stream -> list of [H, W, 3] uint8 patch grids (``gap`` px of white between patches).

    Each ``<vision>`` ... ``</vision>`` block takes the next patches in ``<vpatch>`` order; rows end at
    ``<vrow_sep>`` and ``<vframe_sep>`` (a video's frames are stacked as further rows).
    """
    from megatron_solo.data.image import patch_grid
    from megatron_solo.spec import SOLO_IDS

    images, k, rows, row_len = [], 0, [], 0
    for t in map(int, tokens):
        if t == SOLO_IDS.vision_start:
            rows, row_len, start = [], 0, k
        elif t == SOLO_IDS.vision_patch:
            row_len += 1
            k += 1
        elif t in (SOLO_IDS.vision_row_sep, SOLO_IDS.vision_frame_sep, SOLO_IDS.vision_end):
            if row_len:
                rows.append(row_len)
            row_len = 0
            if t == SOLO_IDS.vision_end and rows:
                if len(set(rows)) != 1:
                    raise ValueError(f"an image block has rows of {sorted(set(rows))} patches; expected equal rows")
                images.append(patch_grid(patches[start:k], len(rows), rows[0], gap=gap, fill=255))
    return images


def main(argv=None) -> int:
    import numpy as np
    from PIL import Image

    from megatron_solo.data.indexed import SoloIndexedDataset
    from megatron_solo.data.tokenizer import SoloTokenizer
    from megatron_solo.spec import PATCH_DIM, SOLO_IDS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--pack", type=int, default=0)
    ap.add_argument("--tokenizer-model", required=True)
    ap.add_argument("--out", required=True, help="PNG path (one file; several images are stacked vertically)")
    a = ap.parse_args(argv)
    ds = SoloIndexedDataset(a.prefix)
    tok = SoloTokenizer(a.tokenizer_model)
    segs = ds.pack(a.pack)
    tokens = np.concatenate([t for t, _, _ in segs])
    patches = np.concatenate([p for _, _, p in segs]) if segs else np.zeros((0, PATCH_DIM), np.uint8)
    for i, (t, r, _) in enumerate(segs):
        shown = []
        for x in t:
            x = int(x)
            if x == SOLO_IDS.vision_start:
                shown.append("[IMAGE ")
            elif x == SOLO_IDS.vision_end:
                shown.append("]")
            elif SOLO_IDS.vision_patch <= x <= SOLO_IDS.vision_frame_sep:
                shown.append({SOLO_IDS.vision_patch: "", SOLO_IDS.vision_row_sep: "", SOLO_IDS.vision_frame_sep: "|"}[x])
            else:
                shown.append(tok.id_to_piece(x).replace("▁", " ").replace("<0x0A>", "\n"))
        print(f"--- document {i} ({len(t)} tokens, roles {sorted(set(r.tolist()))}) ---")
        print("".join(shown))
    images = render(tokens, patches)
    if not images:
        print("(no images in this pack)")
        return 0
    width = max(im.shape[1] for im in images)
    canvas = np.full((sum(im.shape[0] + 8 for im in images), width, 3), 255, np.uint8)
    y = 0
    for im in images:
        canvas[y:y + im.shape[0], :im.shape[1]] = im
        y += im.shape[0] + 8
    Image.fromarray(canvas).save(a.out)
    print(f"wrote {a.out}: {len(images)} image(s), {len(patches)} patches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
