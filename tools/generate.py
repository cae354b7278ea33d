#!/usr/bin/env python3
"""Ask an exported SOLO model about an image (a first taste, and a smoke test of an export).

    .venv/bin/python tools/generate.py --hf-dir hf/solo-sft --image cat.jpg --prompt "What is in this image?"
    .venv/bin/python tools/generate.py --hf-dir hf/solo-base --image cat.jpg --prompt "A photo of" --no-chat

Uses only the exported directory: its modeling code (trust_remote_code) and its processing_solo.py.
Generation stops by itself at the stop token of the template (<|im_end|> for chatml, </s> for solo-inst;
the export's generation_config.json lists both), or after --max-new-tokens, which is then said on stderr.
"""

import argparse
import sys

from megatron_solo import quiet
from megatron_solo.errors import UserError, entry_point


@entry_point  # a missing export file is one error: line, exit 1
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="exported SOLO directory (tools/convert_checkpoint.py megatron-to-hf)")
    ap.add_argument("--image", default=None, help="image file (any format PIL reads); omit for text only")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="upper bound; answers end at the stop token")
    ap.add_argument("--chat-template", choices=["chatml", "solo-inst"], default="chatml",
                    help="the template the model was tuned with (solo-inst: SOLO-7B's released [INST] format)")
    ap.add_argument("--no-chat", action="store_true",
                    help="pre-training format (BOS, image, prompt) instead of a user/assistant chat turn")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (bfloat16 halves memory; float32 is the safe default on CPU)")
    args = ap.parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's and transformers' notes that ask nothing of the user

    # Imported once the flags are parsed: --help answers before torch and transformers load.
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_solo.convert.hf_export_files import load_export_processor

    try:
        P = load_export_processor(args.hf_dir)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    processor = P.SoloProcessor.from_pretrained(args.hf_dir)
    parts = ([P.load_image(args.image)] if args.image else []) + [args.prompt]
    if args.no_chat:
        inputs = processor(parts)
    else:
        inputs = processor.chat([{"role": "user", "content": parts}], template=args.chat_template)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, trust_remote_code=True,
                                                 dtype=getattr(torch, args.dtype)).eval()
    if "vision_patches" in inputs:
        inputs["vision_patches"] = inputs["vision_patches"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    print(processor.decode(new))
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    if not stops.intersection(new):
        print(f"note: no stop token within --max-new-tokens {args.max_new_tokens}; the answer may be cut",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
