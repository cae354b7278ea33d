"""A tiny random base of a family, saved as its Hugging Face checkpoint, for the quick start on a modern base
(``BASE=qwen3 make demo``): the family's own transformers class (``Qwen3ForCausalLM``, ...; byte-level BPE bases, whose tokenizer is a tokenizer.json) at the tiny
preset's shape with that family's architecture switches, transformers' own initialisation, and the base's
real tokenizer files beside it, so the demo goes through the same conversion a Qwen3-8B-Base would.

    python -m megatron_solo.demo.tiny_base --family qwen3 --tokenizer-dir DIR --output OUT
"""

import argparse
import os
import shutil

from megatron_solo import quiet
from megatron_solo.convert.families import FAMILIES
from megatron_solo.presets import PRESETS

# The family's own config fields that the tiny preset does not fix (read by convert/hf_config.py as from any
# base): Qwen3's ties its embeddings up to 4B and its RoPE theta is 1e6; Llama-3.2's small models tie too.
FAMILY_FIELDS = {
    "qwen3": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "llama": dict(tie_word_embeddings=True, rope_theta=500000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tiny_base(family: str, tokenizer_dir: str, output: str, seed: int = 0) -> str:
    """``output``: a random ``family`` model at the tiny preset's shape, vocabulary = the tokenizer's length."""
    # Imported here, not at the top: --help and a missing tokenizer answer before transformers loads.
    import torch
    import transformers

    tiny = PRESETS["tiny"]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"))
    cls = getattr(transformers, FAMILIES[family].hf_class)
    fields = dict(FAMILY_FIELDS[family])
    rope_theta = fields.pop("rope_theta")
    cfg = cls.config_class(
        vocab_size=len(tok), hidden_size=tiny["hidden_size"], intermediate_size=tiny["ffn_hidden_size"],
        num_hidden_layers=tiny["num_layers"], num_attention_heads=tiny["num_attention_heads"],
        num_key_value_heads=tiny["num_query_groups"], head_dim=tiny["kv_channels"],
        max_position_embeddings=tiny["max_position_embeddings"], rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **fields)
    torch.manual_seed(seed)
    cls(cfg).save_pretrained(output)
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(output, f))
    return output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(FAMILY_FIELDS))
    p.add_argument("--tokenizer-dir", required=True, help="the base's tokenizer.json and tokenizer_config.json")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(a.tokenizer_dir, f))]
    if missing:
        p.exit(2, f"error: --tokenizer-dir {a.tokenizer_dir} has no {', '.join(missing)}\n")
    quiet.filter_known_warnings()  # megatron-core's import-time notes (TE/apex absent) say nothing to do here
    print(f"wrote {write_tiny_base(a.family, a.tokenizer_dir, a.output, a.seed)} ({a.family}, tiny preset shape)")


if __name__ == "__main__":
    main()
