#!/usr/bin/env python
"""Show what the model sees: write a PNG of each image's patch grid in one stored pack and print its text.

    .venv/bin/python tools/visualize_patches.py --prefix out/cc3m --pack 0 --tokenizer-model tok/tokenizer.model --out pack0.png
"""

import argparse
import sys

from megatron_solo.errors import InputError, entry_point


def render(tokens, patches, gap: int = 2, ids=None):
    """Images of a token stream -> list of [H, W, 3] uint8 patch grids (``gap`` px of white between patches).

    Each ``<vision>`` ... ``</vision>`` block takes the next patches in ``<vpatch>`` order; rows end at
    ``<vrow_sep>`` and ``<vframe_sep>`` (a video's frames are stacked as further rows). ``ids``: the
    prefix's :class:`~megatron_solo.spec.SoloVocab` (default Mistral's).
    """
    from megatron_solo.data.image import patch_grid
    from megatron_solo.spec import MISTRAL_VOCAB

    ids = ids or MISTRAL_VOCAB

    images, k, rows, row_len, inside = [], 0, [], 0, False
    for t in map(int, tokens):
        closes = t == ids.vision_end or (t == ids.vision_start and inside)  # solo-inst closes with <vision>
        if t == ids.vision_start and not closes:
            rows, row_len, start, inside = [], 0, k, True
        elif t == ids.vision_patch:
            row_len += 1
            k += 1
        elif closes or t in (ids.vision_row_sep, ids.vision_frame_sep):
            if row_len:
                rows.append(row_len)
            row_len = 0
            opened_here, inside = inside, inside and not closes
            if closes and rows and opened_here:  # an image the pack opens inside (packing cut it) is left out
                if len(set(rows)) != 1:
                    raise ValueError(f"an image block has rows of {sorted(set(rows))} patches; expected equal rows")
                images.append(patch_grid(patches[start:k], len(rows), rows[0], gap=gap, fill=255))
    return images


def rows_marked(tokens, coords, ids):
    """Tokens of a prefix without row separators (``--row-separator off``) with a ``<vrow_sep>`` put back
    before each patch that starts a new row of its image (``coords``: the patches' (row, col), as
    ``SoloIndexedDataset.pack(..., with_coords=True)`` gives them), so its grids read as SOLO's layout does."""
    import numpy as np

    tokens = np.asarray(tokens)
    coords = np.asarray(coords).reshape(-1, 2)
    patch_at = np.flatnonzero(tokens == ids.vision_patch)
    starts_row = patch_at[(coords[:, 1] == 0) & (coords[:, 0] > 0)]
    return np.insert(tokens, starts_row, ids.vision_row_sep)


def _document_elements(tokens, tok, ids=None):
    """A document's tokens -> [("text", str) | ("image", (rows, cols))] in order; ``ids`` as :func:`render`'s."""
    from megatron_solo.spec import MISTRAL_VOCAB

    ids = ids or MISTRAL_VOCAB

    out, text, rows, row_len, inside = [], [], [], 0, False
    for x in map(int, tokens):
        closes = x == ids.vision_end or (x == ids.vision_start and inside)  # solo-inst closes with <vision>
        if x == ids.vision_start and not closes:
            if text:
                out.append(("text", "".join(text)))
            text, rows, row_len, inside = [], [], 0, True
        elif x == ids.vision_patch:
            row_len += 1
        elif closes or x in (ids.vision_row_sep, ids.vision_frame_sep):
            if row_len:
                rows.append(row_len)
            row_len = 0
            if closes and inside:  # as render(): an image the pack opens inside is not one of its images
                out.append(("image", (len(rows), rows[0] if rows else 0)))
            inside = inside and not closes
        elif ids.vision_start < x <= ids.vision_frame_sep:
            pass
        else:
            # a byte-level BPE piece reads as its text; a SentencePiece one with "▁" as a space
            text.append(tok.decode([x]) if getattr(tok, "kind", None) == "hf" else
                        tok.id_to_piece(x).replace("\u2581", " ").replace("<0x0A>", "\n"))
    if text:
        out.append(("text", "".join(text)))
    return out


def labelled_sheet(images, labels, min_width: int = 720):
    """Stack image panels, each upscaled (nearest: patch edges stay sharp) to a readable size, under a
    title line and between the text that precedes and follows it in the document."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    line_h, margin = 20, 12
    panels = []
    for im, (title, before, after) in zip(images, labels):
        scale = max(1, min(8, 320 // max(im.shape[0], im.shape[1], 1)))  # small images grow to ~320 px
        pic = Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), Image.NEAREST)
        width = max(min_width, pic.width + 2 * margin)
        wrap = max(20, (width - 2 * margin) // 8)
        lines_before = textwrap.wrap(f"before: {before.strip() or '(nothing)'}", wrap)[-3:]
        lines_after = textwrap.wrap(f"after: {after.strip() or '(nothing)'}", wrap)[:3]
        height = margin + line_h * (1 + len(lines_before)) + pic.height + line_h * len(lines_after) + 2 * margin
        panel = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(panel)
        y = margin
        d.text((margin, y), title, fill="black", font=font)
        y += line_h
        for line in lines_before:
            d.text((margin, y), line, fill=(60, 60, 140), font=font)
            y += line_h
        panel.paste(pic, (margin, y + 4))
        y += pic.height + 8
        for line in lines_after:
            d.text((margin, y), line, fill=(60, 60, 140), font=font)
            y += line_h
        panels.append(panel)
    sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), (235, 235, 235))
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    return sheet


@entry_point  # a missing prefix or a pack out of range is one error: line, exit 2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", required=True, help="dataset prefix (tools/preprocess_data.py --output-prefix)")
    ap.add_argument("--pack", "--index", dest="pack", type=int, default=0,
                    help="which pack (one training sample) of the prefix to show; default 0 (--index: the same, "
                         "as tools/inspect_data.py used to name it)")
    ap.add_argument("--tokenizer-model", required=True, help="SOLO's tokenizer.model or tokenizer.json")
    ap.add_argument("--out", required=True,
                    help="PNG path: one labelled panel per image (grid size, image index, the text around it)")
    a = ap.parse_args(argv)  # before the heavy imports: --help answers at once

    import numpy as np

    from megatron_solo.data.indexed import SoloIndexedDataset, check_prefix_files
    from megatron_solo.data.tokenizer import load_tokenizer
    from megatron_solo.spec import PATCH_DIM

    check_prefix_files(a.prefix, "--prefix")
    ds = SoloIndexedDataset(a.prefix, reader="numpy")  # numpy's reader: no torch, an answer in about a second
    if not 0 <= a.pack < len(ds):
        raise InputError(f"--pack {a.pack} is out of range: {a.prefix} holds {len(ds)} packs (0 .. {len(ds) - 1})")
    tok = load_tokenizer(a.tokenizer_model)
    segs = ds.pack(a.pack, with_coords=not ds.row_separator)
    if not ds.row_separator:  # SAIL's layout: the rows come from the patches' coordinates
        segs = [(rows_marked(t, c, ds.vocab), r, p) for t, r, p, c in segs]
    tokens = np.concatenate([t for t, _, _ in segs])
    patches = np.concatenate([p for _, _, p in segs]) if segs else np.zeros((0, PATCH_DIM), np.uint8)
    labels = []
    for i, (t, r, _) in enumerate(segs):
        elements = _document_elements(t, tok, ds.vocab)
        print(f"--- document {i} ({len(r)} tokens, roles {sorted(set(r.tolist()))}) ---")
        print("".join(v if kind == "text" else "[IMAGE ]" for kind, v in elements))
        for j, (kind, v) in enumerate(elements):
            if kind == "image":
                before = elements[j - 1][1] if j and elements[j - 1][0] == "text" else ""
                after = elements[j + 1][1] if j + 1 < len(elements) and elements[j + 1][0] == "text" else ""
                labels.append((f"pack {a.pack}, document {i}, image {len(labels)}: {v[0]} x {v[1]} patches "
                               f"of 32x32 px ({v[0] * v[1]})", before[-240:], after[:240]))
    images = render(tokens, patches, ids=ds.vocab)
    if not images:
        print("(no images in this pack)")
        return 0
    sheet = labelled_sheet(images, labels)
    sheet.save(a.out)
    print(f"wrote {a.out} ({sheet.width}x{sheet.height}): {len(images)} image(s), {len(patches)} patches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
