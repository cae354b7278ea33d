#!/usr/bin/env python3
"""Extend a base tokenizer with SOLO's pieces, writing the same kind it read.

SentencePiece (Mistral-7B-v0.1's tokenizer.model: SOLO's ids 32000..33030):
    .venv/bin/python tools/create_solo_tokenizer.py --base /path/to/mistral/tokenizer.model --output DIR
    .venv/bin/python tools/create_solo_tokenizer.py --base mistral-common --output DIR   # the copy in mistral-common
Hugging Face tokenizer.json (Llama-3.x, Qwen2/2.5/3; its tokenizer_config.json must be beside it):
    .venv/bin/python tools/create_solo_tokenizer.py --base /path/to/Qwen3-8B-Base --output DIR

SOLO's pieces follow the base's full length, in SOLO's order; a base's own <|im_start|>/<|im_end|> special
tokens are reused (docs/DATA_FORMAT.md, "Tokenizer"). A directory holding both files uses tokenizer.model.
"""

import argparse
import sys

from megatron_solo.data.tokenizer import check_tokenizer, create_solo_tokenizer, mistral_tokenizer_path
from megatron_solo.errors import UserError, entry_point
from megatron_solo.spec import SOLO_SPECIAL_PIECES, pad_vocab_size


@entry_point  # a base that cannot be read or extended is one error: line, exit 1
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True,
                    help="base tokenizer.model, tokenizer.json, or a model directory holding one; "
                         "'mistral-common' for the packaged Mistral-7B-v0.1 tokenizer.model")
    ap.add_argument("--output", required=True, help="directory to write the extended tokenizer into")
    args = ap.parse_args(argv)
    try:
        base = mistral_tokenizer_path() if args.base == "mistral-common" else args.base
        path = create_solo_tokenizer(base, args.output)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    tok = check_tokenizer(path)
    v = tok.vocab
    added = v.size - v.base_size
    reused = len(SOLO_SPECIAL_PIECES) - added
    print(f"wrote {path}: {tok.vocab_size} pieces ({added} added: "
          f"{SOLO_SPECIAL_PIECES[0]}={v.vision_start} .. {SOLO_SPECIAL_PIECES[-1]}={v.im_end}"
          f"{f'; {reused} reused from the base' if reused else ''}); "
          f"padded vocab {pad_vocab_size(tok.vocab_size)} at TP=1, {pad_vocab_size(tok.vocab_size, 2)} at TP=2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
