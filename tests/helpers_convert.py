"""Random Hugging Face checkpoints for tests and benchmarks (nothing is downloaded): Mistral, SOLO, and a
tiny base of each family (Llama-3.x, Qwen2, Qwen3) built with the family's own transformers class."""

from __future__ import annotations

import os

import torch

from megatron_solo.spec import BASE_VOCAB_SIZE

# A non-trivial GQA shape: 6 query heads in 2 groups (3 per group), head_dim 16 != hidden/heads.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16)


def mistral_config(**overrides):
    from transformers import MistralConfig

    kw = dict(TINY_SHAPE, vocab_size=BASE_VOCAB_SIZE, max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=256,
              tie_word_embeddings=False, initializer_range=0.05)
    kw.update(overrides)
    return MistralConfig(**kw)


def _randomize(model, seed: int) -> None:
    # transformers initialises norms to 1: randomise everything so a swapped tensor cannot pass.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def make_random_mistral(out_dir: str, seed: int = 0, dtype=torch.float32, **overrides) -> str:
    """A random transformers MistralForCausalLM saved as safetensors (with its 32000-piece tokenizer)."""
    from transformers import MistralForCausalLM

    from megatron_solo.data.tokenizer import mistral_tokenizer_path

    model = MistralForCausalLM(mistral_config(**overrides))
    _randomize(model, seed)
    model.to(dtype).save_pretrained(out_dir)
    import shutil

    shutil.copyfile(mistral_tokenizer_path(), os.path.join(out_dir, "tokenizer.model"))
    return out_dir


# Tiny bases of each family, shaped like the real ones in what their row switches on: Llama-3.2 (tied,
# llama3 RoPE scaling factor 32, theta 500000), Qwen2.5 (QKV bias, untied), Qwen3 (q/k norm, head_dim 16 !=
# hidden/heads, tied). Their vocabularies are the real tokenizers' (tests/helpers_tokenizers.py): Llama-3.2's
# 128257 tokens; Qwen's 151669 tokens in 151936 rows (Qwen pads its matrices past the tokenizer).
# Llama's and Qwen2's configs require hidden = heads x head_dim: 4 heads in 2 groups there.
FAMILY_CONFIGS = {
    "llama": dict(num_attention_heads=4, vocab_size=128257, tie_word_embeddings=True, max_position_embeddings=16384,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
    "qwen2": dict(num_attention_heads=4, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=512,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=512,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
#: the base tokenizer (a key of tests/helpers_tokenizers.PACKAGES) each family's tiny base ships
FAMILY_TOKENIZERS = {"llama": "llama", "qwen2": "qwen", "qwen3": "qwen"}


def make_random_base(out_dir: str, family: str, seed: int = 0, dtype=torch.float32, tokenizer_dir: str | None = None,
                     **overrides) -> str:
    """A random base of ``family`` (its transformers ``*ForCausalLM``) saved as safetensors, with the base
    tokenizer files of ``tokenizer_dir`` (tokenizer.json, tokenizer_config.json) when given."""
    import transformers

    from megatron_solo.convert.families import FAMILIES

    cls = getattr(transformers, FAMILIES[family].hf_class)
    kw = dict(TINY_SHAPE, rms_norm_eps=1e-6, initializer_range=0.05)
    kw.update(FAMILY_CONFIGS[family], **overrides)
    model = cls(cls.config_class(**kw))
    _randomize(model, seed)
    model.to(dtype).save_pretrained(out_dir)
    if tokenizer_dir is not None:
        import shutil

        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(out_dir, f))
    return out_dir


def make_random_solo(out_dir: str, seed: int = 0, dtype=torch.bfloat16, max_shard_size: int = 2**20,
                     family: str = "mistral", tokenizer: str | None = None, choices: dict | None = None,
                     row_separator: bool = True, **overrides) -> str:
    """A random HF SOLO checkpoint laid out exactly as an export (several shards + index): SOLO-7B's
    (Mistral, Mistral's tokenizer) by default, or a tiny SOLO model on ``family``'s base (FAMILY_CONFIGS) with
    ``tokenizer``, SOLO's tokenizer.json over that base (the ``hf_tokenizers`` fixture's ``solo_<base>``).
    ``overrides``: shape fields of the base's config (TINY_SHAPE's); ``choices``: model args of the SOLO line's
    choices (image_attention, image_positions, vision_experts) the export records; ``row_separator``: its
    image layout (False: SAIL's, no ``<vrow_sep>``)."""
    import transformers

    from megatron_solo.convert.families import FAMILIES
    from megatron_solo.convert.hf_config import hf_config_from_model_args, model_args_from_hf_config
    from megatron_solo.convert.hf_export_files import write_hf_support_files
    from megatron_solo.convert.hf_files import configuration_solo, modeling_solo
    from megatron_solo.convert.safetensors_io import StreamingSafetensorsWriter
    from megatron_solo.data.tokenizer import create_solo_tokenizer, derive_vocab, load_tokenizer, mistral_tokenizer_path
    from megatron_solo.spec import MISTRAL_VOCAB

    if family == "mistral":
        base_cfg, vocab = mistral_config(**overrides).to_dict(), MISTRAL_VOCAB
        args = model_args_from_hf_config(base_cfg)
    else:
        if tokenizer is None:
            raise ValueError(f"a SOLO model on a {family} base needs SOLO's tokenizer.json over that base")
        cls = getattr(transformers, FAMILIES[family].hf_class).config_class
        base_cfg = cls(**dict(TINY_SHAPE, rms_norm_eps=1e-6, initializer_range=0.05,
                              **dict(FAMILY_CONFIGS[family], **overrides))).to_dict()
        vocab = derive_vocab(load_tokenizer(tokenizer))
        args = model_args_from_hf_config(base_cfg, vocab_size=vocab.size)
        args["vision_patch_id"] = vocab.vision_patch
    if choices:
        args.update(choices)
    hf_cfg = hf_config_from_model_args(args, torch_dtype=str(dtype).replace("torch.", ""), vocab=vocab,
                                       row_separator=row_separator)
    prefix = "" if family == "mistral" else hf_cfg["architectures"][0][len("Solo"):-len("ForCausalLM")]
    cfg = getattr(configuration_solo, f"Solo{prefix}Config")(
        **{k: v for k, v in hf_cfg.items() if k not in ("architectures", "auto_map", "model_type")})
    model = getattr(modeling_solo, hf_cfg["architectures"][0])(cfg)
    _randomize(model, seed)
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    writer = StreamingSafetensorsWriter(out_dir, [(k, tuple(v.shape), dtype) for k, v in state.items()],
                                        max_shard_size)
    for k, v in state.items():
        writer.write(k, v)
    writer.close()
    if family == "mistral":
        tokenizer = create_solo_tokenizer(mistral_tokenizer_path(), os.path.join(out_dir, ".tok"))
    write_hf_support_files(out_dir, hf_cfg, tokenizer, vocab, row_separator)
    import shutil

    shutil.rmtree(os.path.join(out_dir, ".tok"), ignore_errors=True)
    return out_dir


def safetensors_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory's safetensors shards, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, f)))
    return out


def make_random_solo_over(out_dir: str, family: str, solo_tokenizer: str, seed: int = 0, dtype=torch.float32) -> str:
    """A random HF SOLO export over a tiny base of ``family`` (``FAMILY_CONFIGS``' shapes) and SOLO's tokenizer
    over that base's (``solo_tokenizer``: tests/helpers_tokenizers.py), in one shard: :func:`make_random_solo`."""
    return make_random_solo(out_dir, seed=seed, dtype=dtype, max_shard_size=2**30, family=family,
                            tokenizer=solo_tokenizer)
