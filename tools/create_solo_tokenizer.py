#!/usr/bin/env python3
"""Append SOLO's special pieces to a SentencePiece model (e.g. Mistral-7B-v0.1's tokenizer.model).

    .venv/bin/python tools/create_solo_tokenizer.py --base /path/to/mistral/tokenizer.model --output DIR
    .venv/bin/python tools/create_solo_tokenizer.py --base mistral-common --output DIR   # the copy in mistral-common
"""

import argparse
import sys

from megatron_solo.data.tokenizer import SoloTokenizer, create_solo_tokenizer, mistral_tokenizer_path
from megatron_solo.spec import SOLO_SPECIAL_PIECES, pad_vocab_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True,
                    help="base SentencePiece .model (32000 pieces), or 'mistral-common' for the packaged one")
    ap.add_argument("--output", required=True, help="directory to write tokenizer.model into")
    args = ap.parse_args(argv)
    base = mistral_tokenizer_path() if args.base == "mistral-common" else args.base
    try:
        path = create_solo_tokenizer(base, args.output)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = SoloTokenizer(path)
    print(f"wrote {path}: {tok.vocab_size} pieces ({len(SOLO_SPECIAL_PIECES)} added: "
          f"{SOLO_SPECIAL_PIECES[0]}={tok.piece_to_id(SOLO_SPECIAL_PIECES[0])} .. "
          f"{SOLO_SPECIAL_PIECES[-1]}={tok.piece_to_id(SOLO_SPECIAL_PIECES[-1])}); "
          f"padded vocab {pad_vocab_size(tok.vocab_size)} at TP=1, {pad_vocab_size(tok.vocab_size, 2)} at TP=2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
