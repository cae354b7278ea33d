#!/usr/bin/env python3
"""Evaluate an exported SOLO model on the held-out digits (megatron_solo/demo/evaluate.py) through
Hugging Face ``generate``; write eval.json and a PNG of test digits with the model's answers.

    .venv/bin/python tools/evaluate_digits.py --hf-dir demo_out/hf --test demo_out/corpus/test.jsonl --output-dir demo_out
"""

import argparse
import json
import os
import sys

from megatron_solo import quiet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="exported SOLO directory")
    ap.add_argument("--test", required=True, help="test.jsonl of tools/make_digits_corpus.py")
    ap.add_argument("--image-root", default=None, help="image paths are relative to this (default: test's dir)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=8,
                    help="upper bound; a chat answer ends by itself at <|im_end|>")
    ap.add_argument("--prompt-format", choices=["chat", "pretrain"], default="chat",
                    help="chat: the SFT question in a user turn; pretrain: BOS + image (a stage-1 model)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N test digits")
    ap.add_argument("--examples", type=int, default=32,
                    help="digits in the answers PNG (right and wrong in the proportion of the whole test)")
    a = ap.parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's and transformers' notes that ask nothing of the user

    # Imported once the flags are parsed: --help answers before torch and transformers load.
    from megatron_solo.convert.hf_export_files import load_export_processor
    from megatron_solo.demo.evaluate import evaluate
    from megatron_solo.demo.plots import plot_answers

    image_root = a.image_root or os.path.dirname(os.path.abspath(a.test))
    res = evaluate(a.hf_dir, a.test, image_root, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                   limit=a.limit, prompt_format=a.prompt_format, progress=lambda s: print(f"   {s}", flush=True))
    os.makedirs(a.output_dir, exist_ok=True)
    with open(os.path.join(a.output_dir, "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    P = load_export_processor(a.hf_dir)
    png = plot_answers(res["predictions"], image_root, P.image_to_patches, P.load_image,
                       os.path.join(a.output_dir, "test_digits.png"), n=a.examples)
    print("   examples (label -> the model's answer):")
    for p in res["predictions"][:6]:
        mark = "ok" if p["predicted"] == p["answer"] else "WRONG"
        print(f"     {p['image']}: {p['answer']:>5} -> {p['predicted']!r} (generated {p['output']!r}) {mark}")
    print(f"   wrote {png} and {os.path.join(a.output_dir, 'eval.json')}")
    for reason, n in res["skipped"].items():
        print(f"   skipped {n} test digit(s): {reason}")
    print(f"   {res['stopped']}/{res['total']} answers ended by themselves (stop token before --max-new-tokens)")
    print(f"ACCURACY {res['accuracy']:.1%} ({res['correct']}/{res['total']} held-out digits; chance {res['chance']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
