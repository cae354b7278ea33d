#!/usr/bin/env python
"""Training tokens/s of the tiny SOLO preset (one process, CPU) against transformers' Mistral.

    .venv/bin/python benchmarks/train_step.py [--seq-length 256 --micro-batch-size 4 --repeats 5] [--profile]

ours      megatron_solo's real training step: ``build_model_chunks`` (megatron-core DDP),
          ``build_optimizer_and_scheduler`` (megatron-core Adam, clip, scheduler), ``wire_schedule`` and
          ``train_step`` (megatron-core's forward-backward schedule, SOLO loss), flags parsed by
          ``megatron_solo.training.arguments`` exactly as ``python -m megatron_solo.train`` parses them.
baseline  transformers ``MistralForCausalLM`` of identical shape (padded vocabulary, layers, heads, GQA,
          FFN, sliding window, untied head), weights copied from ours, trained with a plain PyTorch loop:
          forward, masked per-token cross entropy, backward, ``clip_grad_norm_``, ``torch.optim.AdamW``
          with the same lr / betas / eps / weight decay (decay on matrices only, as megatron-core does).

Both train on the same micro-batches (random token documents, one document per row, so that the
causal + sliding-window rule is the same for both; ``--packed`` packs several documents per row and
gives HF the same block-diagonal mask as a 4D mask). The first step's losses are printed: equal losses
show that the two models and batches are the same. After ``--warmup`` steps each, ``--repeats`` timed
windows of ``--steps`` steps alternate between the two (ABAB, so machine noise hits both alike); the
medians of tokens/s and their ratio are printed last. ``--profile`` adds a torch.profiler table of
one of our steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


import torch


# ------------------------------------------------------------------------------------------ batches
def random_batches(n, mbs, seq, vocab, *, packed=False, seed=0, device="cpu"):
    """``n`` micro-batches in the contract of docs/ARCHITECTURE.md: random text documents.

    Token ids avoid the SOLO special ids (< 3 and the image ids 32000..32005), so no row holds a
    ``<vpatch>``; labels are the next token of the same document, loss mask 1 where a label exists.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(3, 32000, (mbs, seq), generator=g)
        if packed:  # 2..5 documents per row, lengths summing to seq
            rows = []
            for _r in range(mbs):
                k = int(torch.randint(2, 6, (1,), generator=g))
                cuts = torch.sort(torch.randperm(seq - 1, generator=g)[: k - 1] + 1).values
                edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])])
                rows.append((edges[1:] - edges[:-1]).int())
            d = max(len(r) for r in rows)
            doc_lengths = torch.zeros(mbs, d, dtype=torch.int32)
            for i, r in enumerate(rows):
                doc_lengths[i, : len(r)] = r
        else:
            doc_lengths = torch.full((mbs, 1), seq, dtype=torch.int32)
        from megatron_solo.model.batch import document_ids, position_ids_from_doc_lengths

        doc = document_ids(doc_lengths, seq)
        same = torch.zeros(mbs, seq, dtype=torch.bool)
        same[:, :-1] = doc[:, 1:] == doc[:, :-1]
        labels = torch.where(same, torch.roll(tokens, -1, 1), torch.zeros_like(tokens))
        out.append({
            "tokens": tokens.to(device), "labels": labels.to(device), "loss_mask": same.float().to(device),
            "position_ids": position_ids_from_doc_lengths(doc_lengths, seq).to(device),
            "doc_lengths": doc_lengths.to(device), "image_doc_mask": torch.zeros(mbs, seq, dtype=torch.bool, device=device),
            "patches": torch.zeros(0, 3072, dtype=torch.uint8, device=device),
        })
    return out


# ------------------------------------------------------------------------------------------ ours
def megatron_setup(argv):
    """Parse training flags and build the Trainer (model chunks, optimizer, scheduler) exactly as a run does;
    the data stays unbuilt (batches are given to ``train_step``)."""
    from megatron_solo import cpu_backend, mcore_fixes
    from megatron_solo.training.arguments import build_parser
    from megatron_solo.training.config import build_train_config
    from megatron_solo.training.trainer import Trainer

    cfg = build_train_config(build_parser().parse_args(argv))
    cpu_backend.ensure()  # the trainer's own first steps on a machine without CUDA (megatron_solo/train.py)
    mcore_fixes.apply()
    return cfg, Trainer(cfg)


def megatron_step_fn(trainer):
    def step(micro_batches):
        result = trainer.train_step(micro_batches)
        assert not result.skipped, result.losses
        return result.losses["lm loss"]

    return step


# ------------------------------------------------------------------------------------------ HF
def hf_model_from_ours(cfg, chunks):
    """MistralForCausalLM of the same shape (padded vocabulary), weights copied from our model."""
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_solo.convert.hf_config import conversion_shapes
    from megatron_solo.convert.mapping import bound_mappings

    m = cfg.model.args
    hf_cfg = MistralConfig(
        vocab_size=cfg.model.padded_vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels,
        max_position_embeddings=m.max_position_embeddings, rope_theta=float(m.rotary_base),
        rms_norm_eps=m.norm_epsilon, sliding_window=m.sliding_window, tie_word_embeddings=False,
        attention_dropout=0.0, torch_dtype=torch.float32)
    hf_cfg._attn_implementation = "sdpa"
    model = MistralForCausalLM(hf_cfg)
    shapes = conversion_shapes(m.to_dict(), padded_vocab_size=cfg.model.padded_vocab_size,
                               vocab_size=cfg.model.padded_vocab_size)
    ours = {n: p for n, p in chunks[0].module.named_parameters()}
    sd = {}
    with torch.no_grad():
        for bm in bound_mappings(m.num_layers, include_solo_only=False):
            sd.update({k: v.clone() for k, v in bm.to_hf(ours[bm.megatron].detach(), shapes).items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    model.train()
    return model


def hf_hf_mask(batch, window):
    """Block-diagonal causal + window mask as HF's 4D boolean mask (True = may attend)."""
    from megatron_solo.model.batch import packed_causal_mask

    return ~packed_causal_mask(batch["doc_lengths"], batch["tokens"].size(1), window)


def hf_step_fn(cfg, model, packed: bool):
    o = cfg.optimizer
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                            foreach=True)
    window = cfg.model.args.window_size

    def step(micro_batches):
        opt.zero_grad(set_to_none=True)
        n_tok = sum(b["loss_mask"].sum() for b in micro_batches)
        total = 0.0
        for b in micro_batches:
            kw = {}
            if packed:
                kw["attention_mask"] = hf_hf_mask(b, window)
            logits = model(input_ids=b["tokens"], position_ids=b["position_ids"], **kw).logits
            ce = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), b["labels"].view(-1),
                                                   reduction="none")
            loss = (ce * b["loss_mask"].view(-1)).sum() / n_tok
            loss.backward()
            total += float(loss)
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        return total

    return step


# ------------------------------------------------------------------------------------------ timing
def time_window(step, batches, steps, offset):
    """(wall seconds, process CPU seconds) of ``steps`` steps. On a shared machine the CPU seconds are
    the steadier measure of the work done (they do not count time spent waiting for a core)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(steps):
        step(batches[(offset + k) % len(batches)])
    return time.perf_counter() - t0, time.process_time() - c0


def profile_step(step, batches, label, rows=25):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for b in batches:
            step(b)
    print(f"\n== torch.profiler: {label}, {len(batches)} steps, top {rows} by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return prof


def print_medians(t_ours, t_hf, c_ours, c_hf, steps, hf_name):
    """The last lines of a step benchmark: medians of tokens/s (wall and per process CPU-second), the ratio."""
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    per_repeat = statistics.median([x / y for x, y in zip(t_ours, t_hf)])
    print(f"\nmedian tokens/s over {len(t_ours)} windows of {steps} steps: ours {m_ours:.0f}, HF {hf_name} {m_hf:.0f}")
    cm_ours, cm_hf = statistics.median(c_ours), statistics.median(c_hf)
    print(f"median tokens per process CPU-second: ours {cm_ours:.0f}, HF {cm_hf:.0f}, ratio {cm_ours / cm_hf:.3f}")
    print(f"RATIO ours / HF = {m_ours / m_hf:.3f} tokens/s (median of per-window ratios {per_repeat:.3f}; goal >= 0.9)")


def alternate_windows(steps: dict, names: tuple[str, str], tokens: int, a) -> tuple[dict, dict]:
    """Timed windows of two steps in alternation (``steps[name] = (step, batches, ...)``), ``a.repeats``
    each, a line per repeat: tokens/s and tokens per process CPU-second per name (what
    :func:`print_comparison` reads)."""
    base, other = names
    tps, cps = {n: [] for n in names}, {n: [] for n in names}
    for r in range(a.repeats):
        for name in names:
            step, batches = steps[name][:2]
            w, c = time_window(step, batches, a.steps, r * a.steps)
            tps[name].append(tokens / w)
            cps[name].append(tokens / c)
        print(f"  repeat {r + 1}: {base} {tps[base][-1]:8.0f} tok/s   {other} {tps[other][-1]:8.0f} tok/s   "
              f"ratio {tps[other][-1] / tps[base][-1]:.3f} (per CPU-second {cps[other][-1] / cps[base][-1]:.3f})",
              flush=True)
    return tps, cps


def print_comparison(tps: dict, cps: dict, names: tuple[str, str], steps: int, goal: float) -> None:
    """The last lines of an alternating comparison: medians (wall and per CPU-second) and the ratio."""
    base, other = names
    med = {k: statistics.median(v) for k, v in tps.items()}
    per_window = statistics.median([x / b for x, b in zip(tps[other], tps[base])])
    c_base, c_other = statistics.median(cps[base]), statistics.median(cps[other])
    print(f"median tokens/s over {len(tps[base])} windows of {steps} steps: {base} {med[base]:.0f}, "
          f"{other} {med[other]:.0f}")
    print(f"median tokens per process CPU-second: {base} {c_base:.0f}, {other} {c_other:.0f}, "
          f"ratio {c_other / c_base:.3f}")
    print(f"RATIO {other} / {base} = {med[other] / med[base]:.3f} tokens/s (median of per-window ratios "
          f"{per_window:.3f}; goal >= {goal})")


def trainer_flags(a) -> list[str]:
    """The trainer's flags of a step benchmark that runs the real trainer's setup (lora_step.py,
    vision_experts_step.py): the tiny preset under ``--shape``, one micro-batch per step, a constant
    learning rate (the step's cost, not the schedule's), no data read (the benchmark makes its batches)."""
    return ["--model", "tiny", "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.micro_batch_size),
            "--global-batch-size", str(a.micro_batch_size), "--train-iters", "1000000", "--lr", "1e-4",
            "--min-lr", "1e-4", "--lr-decay-style", "constant", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--data-path", "unused", "--transformer-impl", "local", *a.shape.split()]


def add_shape_flags(ap: argparse.ArgumentParser) -> None:
    """``--image-share`` and ``--shape``, shared by the step benchmarks with images."""
    ap.add_argument("--image-share", type=float, default=0.5, help="share of each row that is <vpatch> tokens")
    ap.add_argument("--shape", default="", help="architecture flags over the tiny preset, e.g. "
                    "'--hidden-size 512 --ffn-hidden-size 1536 --num-attention-heads 8 --num-query-groups 4 --kv-channels 64'")


def timing_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every step benchmark shares (this one and qwen3_step.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed window")
    ap.add_argument("--repeats", type=int, default=5, help="timed windows per side (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of both steps")
    return ap


def main(argv=None):
    from megatron_solo import quiet

    quiet.filter_known_warnings()  # megatron-core's and torch's import-time notes, as the tools do
    ap = timing_parser(__doc__)
    ap.add_argument("--num-microbatches", type=int, default=1)
    ap.add_argument("--packed", action="store_true", help="several documents per row (HF gets a 4D mask)")
    ap.add_argument("--attention-backend", default="dot_product", choices=["dot_product", "sdpa_flex"])
    ap.add_argument("--model", default="tiny")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    gbs = a.micro_batch_size * a.num_microbatches
    train_argv = ["--model", a.model, "--seq-length", str(a.seq_length), "--micro-batch-size",
                  str(a.micro_batch_size), "--global-batch-size", str(gbs), "--train-iters", "1000000",
                  "--lr", "1e-4", "--min-lr", "1e-4", "--lr-decay-style", "constant", "--weight-decay", "0.1",
                  "--clip-grad", "1.0", "--data-path", "unused", "--attention-backend", a.attention_backend]
    cfg, trainer = megatron_setup(train_argv)
    chunks = trainer.model_chunks
    n_params = sum(p.numel() for p in chunks[0].module.parameters())
    hf = hf_model_from_ours(cfg, chunks)
    ours = megatron_step_fn(trainer)
    base = hf_step_fn(cfg, hf, packed=a.packed)

    n_batches = 8
    batches = [random_batches(a.num_microbatches, a.micro_batch_size, a.seq_length, cfg.model.padded_vocab_size,
                              packed=a.packed, seed=i) for i in range(n_batches)]
    tokens_per_step = gbs * a.seq_length
    print(f"train_step: model {a.model} ({n_params / 1e6:.2f}M params, padded vocab {cfg.model.padded_vocab_size}), "
          f"seq {a.seq_length}, micro-batch {a.micro_batch_size} x {a.num_microbatches}, "
          f"{'packed' if a.packed else 'one document per row'}, attention {a.attention_backend}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    # Same weights, same batch: the first losses must agree (same model, same loss).
    l_ours, l_hf = ours(batches[0]), base(batches[0])
    print(f"first-step loss: ours {l_ours:.6f}  HF {l_hf:.6f}  |diff| {abs(l_ours - l_hf):.2e}", flush=True)
    for k in range(1, a.warmup):
        ours(batches[k % n_batches])
        base(batches[k % n_batches])

    t_ours, t_hf, c_ours, c_hf = [], [], [], []
    n_tok = tokens_per_step * a.steps
    for r in range(a.repeats):
        w, c = time_window(ours, batches, a.steps, r * a.steps)
        t_ours.append(n_tok / w)
        c_ours.append(n_tok / c)
        w, c = time_window(base, batches, a.steps, r * a.steps)
        t_hf.append(n_tok / w)
        c_hf.append(n_tok / c)
        print(f"  repeat {r + 1}: ours {t_ours[-1]:8.0f} tok/s ({c_ours[-1]:6.0f} per CPU-s)   HF {t_hf[-1]:8.0f} "
              f"tok/s ({c_hf[-1]:6.0f} per CPU-s)   ratio {t_ours[-1] / t_hf[-1]:.3f} (CPU {c_ours[-1] / c_hf[-1]:.3f})",
              flush=True)

    if a.profile:
        profile_step(ours, batches[:3], "ours (megatron-core train_step)")
        profile_step(base, batches[:3], "HF Mistral, plain loop")

    print_medians(t_ours, t_hf, c_ours, c_hf, a.steps, "MistralForCausalLM")
    from megatron_solo import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
