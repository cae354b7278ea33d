#!/usr/bin/env python
"""See what the model is trained on: one pack of a preprocessed prefix, token by token, with the loss mask.

    .venv/bin/python tools/inspect_data.py --prefix out/sft --pack 0 --tokenizer-model tok/tokenizer.model
    .venv/bin/python tools/inspect_data.py --prefix out/sft --pack 0 --json          # one JSON object
    .venv/bin/python tools/inspect_data.py --prefix out/sft --pack 0 --dump dir/     # .npy arrays

The loss mask is the training one: the pack goes through the training sample builder
(``megatron_solo.data.sample.sample_arrays``, which calls ``roles.label_loss_mask``; training turns its arrays
into tensors). The prefix is read with numpy (``megatron_solo.data.index_file``): no torch, an answer in about
a second. It is shown per
token: 1 where predicting that token carries loss. In the text view, trained tokens are wrapped in
[[...]], vision blocks are summarised (``<image RxC>``), and documents inside the pack are separated.
--json prints {"tokens", "loss_mask", "roles", "num_patches", "doc_lengths"}; --dump DIR writes
tokens.npy (int64), loss_mask.npy (uint8), patches.npy (uint8 [n, 3072]).
"""

import argparse
import json
import os
import sys

from megatron_solo.errors import InputError, entry_point


def sample(prefix: str, index: int, loss_role: str, seq_length: int | None):
    """(tokens, per-token loss mask, roles, patches, doc_lengths) of pack ``index`` as training builds it."""
    import numpy as np

    from megatron_solo.data.indexed import SoloIndexedDataset
    from megatron_solo.data.sample import sample_arrays

    ds = SoloIndexedDataset(prefix, mmap=False, reader="numpy")
    if not 0 <= index < len(ds):
        raise IndexError(f"--pack {index} is out of range: {prefix} holds {len(ds)} packs (0 .. {len(ds) - 1})")
    n = ds.pack_length(index) if seq_length is None else min(seq_length, ds.pack_length(index))
    segments = ds.pack(index, max_tokens=n if seq_length is None else n + 1)
    s = sample_arrays(segments, n, loss_role, ds.vocab)
    tokens = s["tokens"]
    label_mask = s["loss_mask"]
    # label_mask[t] is about predicting token t+1: shift it onto the predicted token
    token_mask = np.zeros(n, np.uint8)
    token_mask[1:] = label_mask[:-1] > 0
    roles = np.concatenate([r for _, r, _ in segments])[:n]
    return tokens, token_mask, roles, s["patches"], s["doc_lengths"]


def render_text(tok, tokens, mask, doc_lengths) -> str:
    """Pieces as text (trained ones in [[...]], a trained newline shown as [[\\n]]), vision blocks
    summarised, a line between the documents of the pack."""
    import numpy as np

    ids = tok.vocab
    out, i, starts = [], 0, set(np.cumsum(doc_lengths)[:-1].tolist())
    n = len(tokens)
    while i < n:
        if i in starts:
            out.append("\n--- next document ---\n")
        t = int(tokens[i])
        if t == ids.vision_start and i + 1 < n and int(tokens[i + 1]) in (ids.vision_patch,):
            j, rows, cols, c = i + 1, 1, 0, 0
            while j < n and int(tokens[j]) in (ids.vision_patch, ids.vision_row_sep, ids.vision_frame_sep):
                if int(tokens[j]) == ids.vision_patch:
                    c += 1
                else:
                    rows, cols, c = rows + 1, max(cols, c), 0
                j += 1
            cols = max(cols, c)
            close = tok.id_to_piece(int(tokens[j])) if j < n else "(cut)"
            out.append(f"<image {rows}x{cols} closed by {close}>")
            i = j + 1
            continue
        # a byte-level BPE piece ("Ġthe") reads as its text; a SentencePiece one with "▁" as a space
        piece = tok.decode([t]) if tok.kind == "hf" else tok.id_to_piece(t).replace("\u2581", " ")
        if piece.startswith("<0x") and piece.endswith(">"):
            piece = bytes([int(piece[3:-1], 16)]).decode("latin-1")
        out.append(f"[[{piece}]]".replace("\n", "\\n]]\n[[").replace("[[]]", "") if mask[i] else piece)
        i += 1
    return "".join(out)


@entry_point  # an InputError is one error: line, exit 2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", required=True, help="a prefix of tools/preprocess_data.py (P-tokens/-roles/-patches)")
    ap.add_argument("--pack", "--index", dest="pack", type=int, default=0,
                    help="which pack (one training sample); default 0. --index: its former name, still read "
                         "(tools/visualize_patches.py names it --pack too)")
    ap.add_argument("--loss-role", default="assistant", help="as the trainer's --loss-role (default assistant)")
    ap.add_argument("--seq-length", type=int, default=None,
                    help="cut the pack as training with this --seq-length would (default: the whole pack)")
    ap.add_argument("--tokenizer-model", default=None,
                    help="SOLO's tokenizer.model or tokenizer.json, for the text view (not needed with --json / --dump)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text view")
    ap.add_argument("--dump", metavar="DIR", default=None, help="write tokens.npy, loss_mask.npy, patches.npy")
    a = ap.parse_args(argv)
    if not a.json and not a.dump and not a.tokenizer_model:
        ap.error("the text view needs --tokenizer-model (or use --json / --dump)")
    from megatron_solo.data.indexed import check_prefix_files

    check_prefix_files(a.prefix, "--prefix")  # what to give instead: drop a file suffix, did you mean ...
    try:
        tokens, mask, roles, patches, doc_lengths = sample(a.prefix, a.pack, a.loss_role, a.seq_length)
    except (IndexError, ValueError) as e:
        raise InputError(str(e)) from None
    if a.dump:
        import numpy as np

        os.makedirs(a.dump, exist_ok=True)
        np.save(os.path.join(a.dump, "tokens.npy"), tokens)
        np.save(os.path.join(a.dump, "loss_mask.npy"), mask)
        np.save(os.path.join(a.dump, "patches.npy"), patches)
    if a.json:
        print(json.dumps({"prefix": a.prefix, "pack": a.pack, "tokens": tokens.tolist(),
                          "loss_mask": mask.tolist(), "roles": roles.tolist(), "num_patches": int(len(patches)),
                          "doc_lengths": doc_lengths.tolist()}))
    elif a.tokenizer_model:
        from megatron_solo.data.stats import prefix_vocab
        from megatron_solo.data.tokenizer import TokenizerError, check_tokenizer
        from megatron_solo.spec import vocab_mismatch

        try:
            tok = check_tokenizer(a.tokenizer_model)
        except TokenizerError as e:
            raise InputError(f"--tokenizer-model: {e}") from None
        problem = vocab_mismatch(prefix_vocab(a.prefix), tok.vocab, a.prefix, f"--tokenizer-model {a.tokenizer_model}")
        if problem:
            raise InputError(f"{problem}; pass the tokenizer it was made with")
        print(render_text(tok, tokens, mask, doc_lengths))
        print(f"\n({len(tokens)} tokens, {int(mask.sum())} with loss, {len(patches)} patches; "
              f"[[...]] = trained)", file=sys.stderr)
    if a.dump:
        print(f"wrote {a.dump}/tokens.npy, loss_mask.npy, patches.npy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
