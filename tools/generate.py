#!/usr/bin/env python3
"""Ask an exported SOLO model about an image (a first taste, and a smoke test of an export).

    .venv/bin/python tools/generate.py --hf-dir hf/solo-sft --image cat.jpg --prompt "What is in this image?"
    .venv/bin/python tools/generate.py --hf-dir hf/solo-base --image cat.jpg --prompt "A photo of" --no-chat

Several questions with the model loaded once: --input a JSONL file of {"prompt": ..., "image": ...} records
("image" optional; a relative path is read under --image-root, default the current directory). Each answer
is written as that record plus "answer" and "stopped", one JSON line each, in the input's order:

    .venv/bin/python tools/generate.py --hf-dir hf/solo-sft --input questions.jsonl --output answers.jsonl

Uses only the exported directory: its modeling code (trust_remote_code) and its processing_solo.py.
Generation stops by itself at the stop token of the template (<|im_end|> for chatml, </s> for solo-inst,
<|eot_id|> for llama3; the export's generation_config.json lists them), or after --max-new-tokens, which is
then said on stderr.
Every input (the export's files, each image) is checked before the model is loaded: a mistake is one
`error:` line, exit 2.
"""

import argparse
import json
import os
import sys

from megatron_solo import quiet
from megatron_solo.errors import InputError, entry_point


def check_image(path: str, where: str) -> None:
    """``path`` exists and decodes (SOLO's decoder, the one preprocessing uses); else one line naming it."""
    from megatron_solo.data.errors import SkipRecord
    from megatron_solo.data.image import decode_image  # PIL and numpy only: no torch before the inputs are good

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        said = {FileNotFoundError: "does not exist", IsADirectoryError: "is a directory"}.get(
            type(e), f"cannot be read ({e.strerror})")
        raise InputError(f"{where}{path} {said}; give an image file") from None
    try:
        decode_image(data, max_image_pixels=None)
    except SkipRecord as e:
        raise InputError(f"{where}{path} is not an image that can be read ({e.reason}: {e.detail}); give an "
                         "intact image file") from None


def read_requests(args) -> list[dict]:
    """The questions, each {"prompt", "image"?}: the one of --prompt/--image, or each line of --input.
    Every image is resolved (under --image-root) and checked to decode."""
    if args.input is None:
        if args.image:
            check_image(args.image, "--image ")
        return [{"prompt": args.prompt, "image": args.image}]
    try:
        with open(args.input) as f:
            lines = f.readlines()
    except OSError as e:
        raise InputError(f"--input {args.input}: {e.strerror}") from None
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{args.input}:{n}: "
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}not JSON ({e.msg}); each line is one record "
                             '{"prompt": ..., "image": ...}') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise InputError(f'{where}no "prompt" string; each line is one record {{"prompt": ..., "image": ...}}')
        if rec.get("image") is not None:
            path = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(args.image_root, rec["image"])
            check_image(path, f"{where}image ")
            rec = dict(rec, image_path=path)
        requests.append(rec)
    if not requests:
        raise InputError(f"--input {args.input} holds no records")
    return requests


@entry_point  # a missing export file, image or record is one error: line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="exported SOLO directory (tools/convert_checkpoint.py megatron-to-hf)")
    ask = ap.add_mutually_exclusive_group(required=True)
    ask.add_argument("--prompt", help="the question (with --image: about that image)")
    ask.add_argument("--input", help='a JSONL file of {"prompt": ..., "image": ...} records, answered with the '
                                     "model loaded once")
    ap.add_argument("--image", default=None, help="with --prompt: an image file (any format PIL reads); omit for text only")
    ap.add_argument("--image-root", default=".", help="with --input: the directory relative image paths are read from")
    ap.add_argument("--output", default=None, help="with --input: write the answers' JSONL here (default: stdout)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="upper bound; answers end at the stop token")
    ap.add_argument("--chat-template", choices=["chatml", "solo-inst", "llama3"], default=None,
                    help="the template the model was tuned with (default: the export's, which its conversion took "
                         "from the training data; solo-inst: SOLO-7B's released [INST] format; llama3: a Llama-3 "
                         "base's own)")
    ap.add_argument("--no-chat", action="store_true",
                    help="pre-training format (BOS, image, prompt) instead of a user/assistant chat turn")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (bfloat16 halves memory; float32 is the safe default on CPU)")
    args = ap.parse_args(argv)
    if args.input is not None and args.image is not None:
        ap.error("--image goes with --prompt; with --input each record names its image")
    if not os.path.isfile(os.path.join(args.hf_dir, "processing_solo.py")):
        raise InputError(f"--hf-dir {args.hf_dir} is not a SOLO export (no processing_solo.py"
                         f"{'' if os.path.isdir(args.hf_dir) else '; the directory does not exist'}); give the "
                         "directory tools/convert_checkpoint.py megatron-to-hf wrote")
    requests = read_requests(args)
    quiet.filter_known_warnings()  # megatron-core's and transformers' notes that ask nothing of the user

    # Imported once the inputs are checked: --help and a mistake answer before torch and transformers load.
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # a local export loads in a moment: its bar is noise

    from megatron_solo.convert.hf_export_files import load_export_processor

    P = load_export_processor(args.hf_dir)
    processor = P.SoloProcessor.from_pretrained(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, trust_remote_code=True,
                                                 dtype=getattr(torch, args.dtype)).eval()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])

    def answer(prompt: str, image_path) -> tuple[str, bool]:
        parts = ([P.load_image(image_path)] if image_path else []) + [prompt]
        if args.no_chat:
            inputs = processor(parts)
        else:
            # the export's own template unless one is asked for (an older export's chat() has no default of its own)
            chosen = {"template": args.chat_template} if args.chat_template else {}
            inputs = processor.chat([{"role": "user", "content": parts}], **chosen)
        if "vision_patches" in inputs:
            inputs["vision_patches"] = inputs["vision_patches"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        return processor.decode(new), bool(stops.intersection(new))

    if args.input is None:
        text, stopped = answer(args.prompt, args.image)
        print(text)
        if not stopped:
            print(f"note: no stop token within --max-new-tokens {args.max_new_tokens}; the answer may be cut",
                  file=sys.stderr)
        return 0
    out = open(args.output, "w") if args.output else sys.stdout
    cut = 0
    try:
        for rec in requests:
            text, stopped = answer(rec["prompt"], rec.pop("image_path", None))
            cut += not stopped
            out.write(json.dumps({**rec, "answer": text, "stopped": stopped}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if cut:
        print(f"note: {cut} of {len(requests)} answers reached --max-new-tokens {args.max_new_tokens} without a "
              "stop token (\"stopped\": false); they may be cut", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
