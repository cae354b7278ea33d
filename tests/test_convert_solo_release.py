"""The released SOLO-7B layout converts (issue 12): a tiny checkpoint laid out as SOLO's release publishes
it (Mistral's config.json with ``architectures: ["SoloForCausalLM"]``, ``model_type: "mistral"``,
``vision_patch_size: 32``, vocab 33031; Mistral's tensor names plus ``model.embed_vision_patch.weight``
without bias; its tokenizer with SOLO's pieces as NORMAL pieces) goes through ``hf-to-megatron
--verify`` (tensors and logits against the source), trains two SFT iterations with the real trainer,
and exports with ``megatron-to-hf --verify`` (tensors and logits against the trained checkpoint)."""

import json
import os

import torch

from tests.conftest import run_tool


def make_solo_release(out_dir: str, seed: int = 3) -> str:
    """A random SOLO checkpoint in the release's layout, with the `tiny` preset's shape (so the trainer's
    ``--model tiny`` matches it)."""
    from safetensors.torch import save_file

    from megatron_solo.convert.hf_files.configuration_solo import SoloConfig
    from megatron_solo.convert.hf_files.modeling_solo import SoloForCausalLM
    from megatron_solo.data.tokenizer import extend_sentencepiece_model, mistral_tokenizer_path
    from megatron_solo.model import SoloModelArgs
    from tests.helpers_convert import _randomize

    a = SoloModelArgs.from_preset("tiny")
    cfg = {  # Mistral-7B-v0.1's config.json fields, as SOLO-7B's release carries them
        "architectures": ["SoloForCausalLM"], "model_type": "mistral", "vision_patch_size": 32,
        "vocab_size": 33031, "hidden_size": a.hidden_size, "intermediate_size": a.ffn_hidden_size,
        "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_query_groups, "head_dim": a.kv_channels, "hidden_act": "silu",
        "max_position_embeddings": a.max_position_embeddings, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
        "rope_theta": float(a.rotary_base), "sliding_window": a.sliding_window, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "torch_dtype": "bfloat16",
        "attention_dropout": 0.0,
    }
    model = SoloForCausalLM(SoloConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    _randomize(model, seed)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    assert "model.embed_vision_patch.weight" in state and "model.embed_vision_patch.bias" not in state
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(mistral_tokenizer_path(), "rb") as f:
        tok = extend_sentencepiece_model(f.read(), piece_type="NORMAL")
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tok)
    return out_dir


def test_released_solo_layout_imports_trains_and_exports_with_logits_parity(digits_data, tmp_path):
    from tests.test_training import _losses, _run

    src = make_solo_release(str(tmp_path / "SOLO-7B-like"))
    ck, sft, hf = (str(tmp_path / d) for d in ("ckpt", "sft", "hf"))
    r = run_tool(["tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", src, "--save", ck, "--verify"])
    assert "tensors bit-identical" in r.stdout and "verify: logits max abs diff" in r.stdout, r.stdout

    # Two SFT iterations from it, on the demo's chat data, with the release's own (NORMAL-piece) tokenizer.
    out = _run(1, ["--model", "tiny", "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "2",
                   "--train-iters", "2", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
                   "--data-path", digits_data["sft"], "--split", "100,0,0", "--eval-iters", "0",
                   "--log-interval", "1", "--tokenizer-model", os.path.join(src, "tokenizer.model"),
                   "--load", ck, "--finetune", "--save", sft, "--no-save-optim",
                   "--log-file", str(tmp_path / "log.jsonl")])
    assert "weights only, --finetune" in out, out[-3000:]
    losses = _losses(str(tmp_path / "log.jsonl"))
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())

    r = run_tool(["tools/convert_checkpoint.py", "megatron-to-hf", "--load", sft, "--save", hf, "--verify"])
    assert "tensors bit-identical" in r.stdout and "verify: logits max abs diff" in r.stdout, r.stdout
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["vocab_size"] == 33031 and cfg["vision_patch_size"] == 32
    with open(os.path.join(hf, "tokenizer.model"), "rb") as a, open(os.path.join(src, "tokenizer.model"), "rb") as b:
        assert a.read() == b.read()  # the release's tokenizer travels unchanged
