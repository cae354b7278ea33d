#!/usr/bin/env python3
"""Convert checkpoints between Hugging Face (a Mistral, Llama-3.x, Qwen2/2.5 or Qwen3 base; SOLO) and megatron_solo.

    # Mistral-7B -> SOLO initialisation (extends the tokenizer, adds vocabulary rows and the patch embedding)
    .venv/bin/python tools/convert_checkpoint.py hf-to-megatron --hf-dir Mistral-7B-v0.1 \\
        --tokenizer-model Mistral-7B-v0.1/tokenizer.model --save ckpt/solo-init --target-tensor-parallel-size 2
    # Qwen3-8B-Base / Llama-3.1-8B -> a SOLO-style initialisation (the directory's own tokenizer.json is used)
    .venv/bin/python tools/convert_checkpoint.py hf-to-megatron --hf-dir Qwen3-8B-Base --save ckpt/qwen3-init
    # a HF SOLO checkpoint -> megatron_solo (continue training it)
    .venv/bin/python tools/convert_checkpoint.py hf-to-megatron --hf-dir SOLO-7B --save ckpt/solo-7b
    # a megatron_solo checkpoint (any TP/PP; latest iteration by default) -> HF SOLO
    .venv/bin/python tools/convert_checkpoint.py megatron-to-hf --load ckpt/sft --save hf/solo-sft --verify
    # a LoRA run's checkpoint -> a PEFT adapter directory (for the export of its base), or the merged model
    .venv/bin/python tools/convert_checkpoint.py megatron-to-hf --load ckpt/lora --save hf/solo-lora-adapter
    .venv/bin/python tools/convert_checkpoint.py megatron-to-hf --load ckpt/lora --save hf/solo-lora --merge-lora

TP/PP are not arguments of the conversion: megatron-core's dist_checkpointing reshards on load, so a
converted checkpoint loads at any TP/PP whose TP divides its padded vocabulary
(--target-tensor-parallel-size sets that padding, Megatron's rule: a multiple of 128 x TP).
See docs/CONVERSION.md.
"""

import argparse
import sys

from megatron_solo import quiet
from megatron_solo.errors import entry_point


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    h = sub.add_parser("hf-to-megatron", help="HF base (Mistral, Llama-3.x, Qwen2/2.5, Qwen3) or SOLO safetensors -> "
                                              "megatron_solo checkpoint")
    h.add_argument("--hf-dir", required=True, help="transformers checkpoint directory (safetensors)")
    h.add_argument("--save", required=True, help="megatron_solo checkpoint directory to write")
    h.add_argument("--tokenizer-model", default=None,
                   help="default: the directory's own tokenizer (tokenizer.model, else tokenizer.json); needed when "
                        "it has none (a Mistral: its 32000-piece tokenizer.model or 'mistral-common'); one of "
                        "another base than the directory's is refused")
    h.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="pad the vocabulary for this TP (and any TP dividing it); default 1")
    h.add_argument("--padded-vocab-size", type=int, default=None, help="explicit padded vocabulary size")
    h.add_argument("--params-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written model tensors (default: the source's own, e.g. bf16 stays bf16)")
    h.add_argument("--iteration", type=int, default=0, help="iteration number of the written checkpoint")
    h.add_argument("--seed", type=int, default=1234, help="seed of the new patch embedding (base source)")
    h.add_argument("--vision-experts", choices=("none", "ffn", "full"), default=None,
                   help="give image tokens their own weights (docs/MODEL.md), each a copy of its text twin; "
                        "default: the source's (none for a base)")
    h.add_argument("--verify", action="store_true",
                   help="re-read the written checkpoint tensor by tensor and check it against the source (bit for "
                        "bit), plus a logits check when both models fit in memory")
    h.add_argument("--verify-logits", action="store_true",
                   help="with --verify: run the logits check even when the models may not fit in memory")

    m = sub.add_parser("megatron-to-hf", help="megatron_solo checkpoint (any TP/PP) -> HF SOLO directory")
    m.add_argument("--load", required=True, help="megatron_solo checkpoint directory")
    m.add_argument("--save", required=True, help="HF directory to write")
    m.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    m.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of the exported tensors (default: the checkpoint's own; SOLO-7B's is bfloat16)")
    m.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    m.add_argument("--tokenizer-model", default=None,
                   help="SOLO tokenizer (tokenizer.model or tokenizer.json; default: the one recorded in the "
                        "checkpoint)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --save directory")
    m.add_argument("--chat-template", default=None, choices=["chatml", "llama3", "solo-inst"],
                   help="the template the export's tokenizer and processor write (default: the one the checkpoint's "
                        "chat data used, else chatml)")
    m.add_argument("--verify", action="store_true",
                   help="check the exported tensors against the checkpoint tensor by tensor (bit for bit), plus the "
                        "exported model's logits when both models fit in memory")
    m.add_argument("--verify-logits", action="store_true",
                   help="with --verify: run the logits check even when the models may not fit in memory")
    m.add_argument("--merge-lora", action="store_true",
                   help="a checkpoint with LoRA adapters: export the model with the adapters merged into its weights "
                        "(default for such a checkpoint: a PEFT adapter directory, adapter_config.json + "
                        "adapter_model.safetensors, for the export of its base)")
    return ap


@entry_point  # a ConversionError is one error: line, exit 1
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    quiet.filter_known_warnings()  # megatron-core's and transformers' notes that ask nothing of the user
    # Imported once the flags are parsed: --help answers before torch loads (these import it); megatron-core
    # (megatron_io) only after a HF directory has been checked.
    from megatron_solo import cpu_backend, mcore_fixes, parallel
    from megatron_solo.convert.hf_config import check_hf_checkpoint

    try:
        if args.command == "hf-to-megatron":
            check_hf_checkpoint(args.hf_dir)  # refuse bad input before megatron is imported
            mcore_fixes.apply()  # megatron-core's workarounds, before it is imported (one must precede that)
            cpu_backend.ensure()  # megatron-core on this machine's CPU when CUDA is absent
            from megatron_solo.convert.megatron_io import hf_to_megatron  # megatron-core loads here

            out = hf_to_megatron(
                args.hf_dir, args.save, tokenizer_model=args.tokenizer_model,
                target_tensor_parallel_size=args.target_tensor_parallel_size,
                padded_vocab_size=args.padded_vocab_size, params_dtype=args.params_dtype,
                iteration=args.iteration, seed=args.seed, verify=args.verify or args.verify_logits,
                verify_logits=True if args.verify_logits else None, vision_experts=args.vision_experts,
            )
        else:
            mcore_fixes.apply()
            cpu_backend.ensure()
            from megatron_solo.convert.megatron_io import megatron_to_hf  # megatron-core loads here

            out = megatron_to_hf(
                args.load, args.save, iteration=args.iteration, dtype=args.dtype,
                max_shard_size=args.max_shard_size, tokenizer_model=args.tokenizer_model,
                overwrite=args.overwrite, verify=args.verify or args.verify_logits,
                verify_logits=True if args.verify_logits else None, merge_lora=args.merge_lora,
                chat_template=args.chat_template,
            )
    finally:
        if "megatron.core" in sys.modules:
            parallel.destroy()
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
