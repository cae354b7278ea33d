"""``python -m megatron_solo.train ... --dry-run``: plan a job's memory and speed in one CPU process.

How a multi-rank layout is built with no GPU and no other process: torch's ``fake`` process-group
backend (``torch.testing._internal.distributed.fake_pg``; collectives are no-ops) lets this process
join a world of ``WORLD_SIZE`` ranks *as* a chosen rank, so megatron-core's own
``parallel_state.initialize_model_parallel`` builds every group as on the cluster and
``build_solo_model`` builds that rank's chunks (virtual pipeline stages included) exactly as the
trainer does (:mod:`megatron_solo.training.model_setup`), on the ``meta`` device (:mod:`megatron_solo.meta_device`: shapes, no memory). One rank
per pipeline stage is built (TP and DP ranks of a stage hold the same shapes).

Per rank it reports (formulas below; what they assume is printed with them):

* parameters and weight bytes: counted from the built chunks (``params_dtype``: bf16 with --bf16);
* gradients: megatron-core DDP's buffer, fp32 (``grad_reduce_in_fp32``), trainable parameters only;
* optimizer: Adam's two moments plus, in mixed precision, the fp32 main copy: 12 bytes per trainable
  parameter (8 in fp32), divided by DP under ``--use-distributed-optimizer``. Weights + gradients +
  optimizer reproduce Megatron-LM's ``theoretical_memory_usage.py`` accounting (18 bytes per parameter,
  or 6 + 12/DP with the distributed optimizer, for bf16);
* activations: per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models", Table 2), the derivation Megatron-LM's ``theoretical_memory_usage.py`` also
  follows, redone for SOLO's layer (GQA, SwiGLU, no dropout, RMSNorm), 2-byte activations:
  ``8sbh`` (the inputs of both norms and of the QKV and fc1 projections; divided by TP only with
  sequence parallelism) ``+ (4sbh + 4sbgd + 6sbf)/TP`` (Q, the attention output, K and V, fc1's output
  and SwiGLU's output); a fused/flash attention keeps no ``s x s`` matrix (the dot-product attention of
  the local spec adds ``4bns^2/TP`` unless ``--recompute-granularity selective``; the local spec's mask,
  per micro-batch and stage: ``bs^2`` bytes for the dot product's explicit mask, FlexAttention's block
  mask a few KiB; the local spec is planned under ``--transformer-impl local`` and under an image choice
  other than SOLO's, which TE's THD batches cannot express). Full recompute keeps
  only each recomputed layer's input (``2sbh``, /TP with SP), plus one layer's full activations while
  that layer is recomputed in the backward pass. Stage ``p`` of a 1F1B pipeline holds
  ``min(PP - p, micro-batches)`` micro-batches in flight; interleaving multiplies the first stage's by
  ``1 + (PP - 1)/(PP x VPP)`` (Narayanan et al. 2021, as Megatron-LM's accounting). The first stage adds
  the embedding output, the last the output layer's input and fp32 logits (``4sbV/TP``).
* FLOPs per step from :mod:`megatron_solo.training.flops` (the number MFU is computed from) and the step
  time they take at ``--dry-run-mfu`` of ``--dry-run-gpu``'s dense peak (bf16, or FP8 with --fp8-format).

Frozen parameters (``--freeze-lm`` / ``--freeze-vision``) hold weights only: the trainer's own filter
(:func:`megatron_solo.training.param_groups.trainable_parameter_filter`) decides.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_solo import cpu_backend, mcore_fixes
from megatron_solo.meta_device import meta_device
from megatron_solo.parameter_names import is_vision_expert_parameter
from megatron_solo.parallel import set_seed
from megatron_solo.spec import PATCH_DIM, SOLO_SPECIAL_PIECES
from megatron_solo.training import config as train_config
from megatron_solo.training.flops import flops_per_step
from megatron_solo.training.model_setup import build_model_chunks
from megatron_solo.training.param_groups import trainable_parameter_filter

GIB = 2**30

#: Dense peak TFLOP/s per GPU (vendor data sheets, SXM parts): (bf16, fp8).
GPU_PEAK_TFLOPS = {
    "H100": (989.0, 1979.0),
    "H200": (989.0, 1979.0),
    "A100": (312.0, None),
    "B200": (2250.0, 4500.0),
}

#: Memory per GPU in GB (10^9 bytes; data sheets, SXM parts): what a plan is checked against.
GPU_MEMORY_GB = {"H100": 80, "H200": 141, "A100": 80, "B200": 192}

#: Mistral-7B-v0.1's exact parameter count, and what SOLO adds to it (docs/MODEL.md).
MISTRAL_7B_PARAMETERS = 7_241_732_096


def solo_7b_expected_parameters(hidden: int = 4096, new_rows: int = len(SOLO_SPECIAL_PIECES),
                                patch_dim: int = PATCH_DIM) -> int:
    """Mistral-7B + SOLO's 1031 new vocabulary rows in the embedding and the output layer + the patch
    embedding (padding rows excluded)."""
    return MISTRAL_7B_PARAMETERS + new_rows * hidden * 2 + patch_dim * hidden


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int):
    """This process as rank ``rank`` of a world of ``world_size`` (torch's fake backend: no peers)."""
    # Imported here: importing it registers the "fake" backend with torch.distributed (global state).
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("--dry-run runs in a process without a process group (not under torchrun)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_rank_chunks(cfg, rank: int):
    """The model chunks of global rank ``rank`` under ``cfg``'s layout, on the meta device."""
    par = cfg.parallel
    # As megatron_solo.parallel.initialize_model_parallel, without the gloo side groups (a gloo group
    # would rendezvous with peers that do not exist).
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline, context_parallel_size=par.context,
        create_gloo_process_groups=False)
    set_seed(cfg.data.seed)
    # FP8 only changes the kernels (and the peak used for the step time below): the layout is the same,
    # and this CPU has no Transformer Engine, so the chunks are built with the local spec.
    with meta_device():
        return build_model_chunks(cfg, cfg.transformer_config(meta_plan=True), use_te=False)


def local_attention(cfg) -> bool:
    """Whether the planned job runs the local spec's attention: ``--transformer-impl local``, or an image
    choice that TE's fused attention on THD batches cannot express (the run refuses TE for it). The
    default on GPUs is Transformer Engine's fused (flash) attention, whatever this planning machine has."""
    m = cfg.model.args
    return (cfg.dry_run.transformer_impl == "local" or m.image_attention != "causal"
            or m.image_positions != "1d")


def dot_product_attention(cfg) -> bool:
    """Whether the planned job keeps the s x s attention matrix: the local spec with megatron's dot product."""
    return local_attention(cfg) and cfg.model.attention_backend == "dot_product"


def mask_bytes(cfg) -> float:
    """The attention mask of one micro-batch (built once, shared by the layers, kept until its backward):
    the local dot product's explicit bool [b, 1, s, s]; FlexAttention's block mask (int32 counts and
    indices of 128 x 128 blocks, full and partial) and the [2, b, s] int64 ids it is made from; nothing
    on TE's THD path (cu_seqlens)."""
    s, b = cfg.schedule.seq_length // cfg.parallel.context, cfg.schedule.micro_batch_size
    if not local_attention(cfg):
        return 0.0
    if cfg.model.attention_backend == "dot_product":
        return float(b * s * s)
    blocks = -(-s // 128)
    return float(2 * 2 * 4 * b * blocks * (blocks + 1) + 2 * 8 * b * s)


def attention_kind(cfg) -> str:
    if not local_attention(cfg):
        return "fused/flash (Transformer Engine)"
    if dot_product_attention(cfg):
        return "dot-product (s x s kept)"
    return "FlexAttention block mask (local spec, sdpa_flex)"


def _activation_bytes(cfg, stage: int, layers: int, first: bool, last: bool) -> dict:
    m, par, prec = cfg.model.args, cfg.parallel, cfg.precision
    s, b, h, f = cfg.schedule.seq_length // par.context, cfg.schedule.micro_batch_size, m.hidden_size, m.ffn_hidden_size
    tp, pp, vpp = par.tensor, par.pipeline, par.virtual_pipeline
    g, d, n = m.num_query_groups, m.kv_channels, m.num_attention_heads
    sp = bool(par.sequence_parallel)
    sbh = s * b * h
    replicated = 8 * sbh / (tp if sp else 1)
    sharded = (4 * sbh + 4 * s * b * g * d + 6 * s * b * f) / tp
    scores = 0.0
    if dot_product_attention(cfg) and prec.recompute_granularity != "selective":
        scores = 4 * b * n * s * s / tp  # softmax output kept for backward (local spec, no flash attention)
    per_layer = replicated + sharded + scores
    if prec.recompute_granularity == "full":
        n_rec = layers if prec.recompute_method == "uniform" else min(layers, prec.recompute_num_layers or layers)
        per_layer_stage = n_rec * 2 * sbh / (tp if sp else 1) + (layers - n_rec) * per_layer
        # (+ one layer's activations, recomputed during its backward: counted once per stage below)
    else:
        per_layer_stage = layers * per_layer
    extra = mask_bytes(cfg)  # every stage builds the micro-batch's mask
    if first:
        extra += 2 * sbh / (tp if sp else 1)  # embedding output (+ patch embedding's, same size)
    if last:
        extra += 2 * sbh / (tp if sp else 1) + 4 * s * b * cfg.model.padded_vocab_size / tp  # output input, fp32 logits
    in_flight = min(pp - stage, cfg.schedule.num_microbatches) if pp > 1 else 1
    if vpp and stage == 0:
        in_flight *= 1 + (pp - 1) / (pp * vpp)
    working = per_layer if prec.recompute_granularity == "full" else 0.0
    return {"per_microbatch": per_layer_stage + extra, "in_flight_microbatches": in_flight,
            "bytes": (per_layer_stage + extra) * in_flight + working}


def plan(cfg) -> dict:
    """Build each pipeline stage's chunks (as its TP rank 0, DP rank 0) and account memory and time."""
    par, sched, prec = cfg.parallel, cfg.schedule, cfg.precision
    tp, pp, dp, cp, world = par.tensor, par.pipeline, par.data, par.context, par.world_size
    distributed_optimizer = cfg.ddp.use_distributed_optimizer
    padded_vocab = cfg.model.padded_vocab_size
    trains = trainable_parameter_filter(cfg.optimizer)
    mixed = prec.params_dtype != torch.float32
    weight_b = torch.empty((), dtype=prec.params_dtype).element_size()
    opt_b = (12 if mixed else 8) if cfg.optimizer.optimizer == "adam" else (8 if mixed else 4)  # sgd: momentum (+ main)
    stages, total, total_real, padding_rows, expert_params = [], 0, 0, 0, 0
    for stage in range(pp):
        rank = stage * (world // pp)  # megatron-core's order tp-cp-ep-dp-pp: PP is the slowest
        with fake_rank(rank, world):
            chunks = build_rank_chunks(cfg, rank)
            assert parallel_state.get_pipeline_model_parallel_rank() == stage
            named = [(n, p) for c in chunks for n, p in c.named_parameters()]
        params = sum(p.numel() for _, p in named)
        trainable = sum(p.numel() for n, p in named if trains(n))
        layers = sum(len(c.decoder.layers) for c in chunks)
        first, last = stage == 0, stage == pp - 1
        act = _activation_bytes(cfg, stage, layers, first, last)
        mem = {
            "weights": params * weight_b,
            "gradients": trainable * 4,
            "optimizer": trainable * opt_b / (dp * cp if distributed_optimizer else 1),
            "activations": act["bytes"],
        }
        mem["total"] = sum(mem.values())
        stages.append({"pp_rank": stage, "example_rank": rank, "layers": layers, "parameters": params,
                       "trainable_parameters": trainable, "memory_bytes": mem,
                       "in_flight_microbatches": act["in_flight_microbatches"]})
        # Across the TP ranks of the stage: TP-sharded tensors are split, the others (norms) replicated.
        for n, p in named:
            k = p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
            total += k
            if is_vision_expert_parameter(n):
                expert_params += k
            if n.endswith(("word_embeddings.weight", "output_layer.weight")):
                pad = (padded_vocab - cfg.model.args.vocab_size) * p.shape[1]
                padding_rows += pad
                k -= pad
            total_real += k
    step_flops = flops_per_step(cfg)
    gpu, mfu = cfg.dry_run.gpu, cfg.dry_run.mfu
    bf16_peak, fp8_peak = GPU_PEAK_TFLOPS[gpu]
    use_fp8 = bool(prec.fp8_format) and fp8_peak is not None
    peak = (fp8_peak if use_fp8 else bf16_peak) * 1e12
    step_s = step_flops / (world * peak * mfu)
    return {
        "world_size": world, "tp": tp, "pp": pp, "vpp": par.virtual_pipeline,
        "dp": dp, "cp": cp, "sequence_parallel": bool(par.sequence_parallel),
        "distributed_optimizer": bool(distributed_optimizer),
        "recompute": prec.recompute_granularity, "params_dtype": str(prec.params_dtype).replace("torch.", ""),
        "fp8": prec.fp8_format, "micro_batch_size": sched.micro_batch_size, "seq_length": sched.seq_length,
        "global_batch_size": sched.global_batch_size, "num_microbatches": sched.num_microbatches,
        "padded_vocab_size": padded_vocab,
        "parameters_total": total, "parameters_without_padding": total_real, "padding_parameters": padding_rows,
        "vision_experts": cfg.model.args.vision_experts, "vision_expert_parameters": expert_params,
        "stages": stages, "flops_per_step": step_flops, "gpu": gpu, "peak_tflops": peak / 1e12,
        "mfu": mfu, "step_seconds": step_s,
        "attention": attention_kind(cfg), "mask_bytes_per_microbatch": mask_bytes(cfg),
        "tokens_per_second": sched.global_batch_size * sched.seq_length / step_s,
    }


def report(p: dict, model_args) -> str:
    """The human-readable plan, ending with one JSON line (what scripts read)."""
    g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    lines = [
        f"dry run: world {p['world_size']} = TP {p['tp']} x PP {p['pp']} x DP {p['dp']}"
        + (f" x CP {p['cp']}" if p["cp"] > 1 else "")
        + (f", VPP {p['vpp']}" if p["vpp"] else "") + (", sequence parallel" if p["sequence_parallel"] else "")
        + (", distributed optimizer" if p["distributed_optimizer"] else "")
        + (f", recompute {p['recompute']}" if p["recompute"] else "") + f", {p['params_dtype']} weights"
        + (f", FP8 {p['fp8']}" if p["fp8"] else ""),
        f"  batch: micro {p['micro_batch_size']} x seq {p['seq_length']}, global {p['global_batch_size']} "
        f"({p['num_microbatches']} micro-batches per DP rank); attention {p['attention']}"
        + (f", mask {p['mask_bytes_per_microbatch'] / 2**20:.1f} MiB per micro-batch"
           if p["mask_bytes_per_microbatch"] else ""),
        f"  parameters: {p['parameters_total']:,} ({p['parameters_without_padding']:,} without the "
        f"{p['padding_parameters']:,} of vocabulary padding to {p['padded_vocab_size']} rows)",
    ]
    if p["vision_experts"] != "none":
        dense = p["parameters_without_padding"] - p["vision_expert_parameters"]
        lines.append(f"  vision experts ({p['vision_experts']}): {p['vision_expert_parameters']:,} parameters "
                     f"(+{p['vision_expert_parameters'] / dense:.1%} over the dense model's {dense:,}); FLOPs per "
                     "token unchanged (each token goes through one path)")
    if model_args.hidden_size == 4096 and model_args.num_layers == 32 and model_args.ffn_hidden_size == 14336:
        want = solo_7b_expected_parameters()
        ok = "matches" if p["parameters_without_padding"] - p["vision_expert_parameters"] == want else "DOES NOT MATCH"
        lines.append(f"  check: Mistral-7B {MISTRAL_7B_PARAMETERS:,} + 1031 new rows x 4096 x 2 + patch embedding "
                     f"3072 x 4096 = {want:,}: {ok}")
    lines.append("  per rank (all TP and DP ranks of a pipeline stage are alike):")
    for s in p["stages"]:
        m = s["memory_bytes"]
        lines.append(f"    PP stage {s['pp_rank']} (e.g. rank {s['example_rank']}): {s['layers']} layers, "
                     f"{s['parameters']:,} parameters ({s['trainable_parameters']:,} trained)")
        lines.append(f"      weights {g(m['weights'])}  grads {g(m['gradients'])}  optimizer {g(m['optimizer'])}  "
                     f"activations {g(m['activations'])} ({s['in_flight_microbatches']:.2f} micro-batches in "
                     f"flight)  total {g(m['total'])}")
    lines.append(f"  model FLOPs per step: {p['flops_per_step']:.4g}; at {p['mfu']:.0%} MFU of "
                 f"{p['world_size']} x {p['gpu']} ({p['peak_tflops']:.0f} TFLOP/s dense "
                 f"{'FP8' if p['fp8'] else 'bf16'}): {p['step_seconds']:.2f} s per step, "
                 f"{p['tokens_per_second']:,.0f} tokens/s")
    summary = {
        "parameters_total": p["parameters_total"],
        "parameters_without_padding": p["parameters_without_padding"],
        "vision_expert_parameters": p["vision_expert_parameters"],
        "parameters_per_rank": [s["parameters"] for s in p["stages"]],
        "memory_gib_per_rank": [round(s["memory_bytes"]["total"] / GIB, 3) for s in p["stages"]],
        "memory_gib_per_rank_detail": [{k: round(v / GIB, 3) for k, v in s["memory_bytes"].items()}
                                       for s in p["stages"]],
        "flops_per_step": p["flops_per_step"], "step_seconds": round(p["step_seconds"], 4),
        "gpu": p["gpu"], "mfu": p["mfu"], "world_size": p["world_size"],
    }
    lines.append(json.dumps(summary))
    return "\n".join(lines)


def _busiest_rank_bytes(p: dict) -> float:
    return max(s["memory_bytes"]["total"] for s in p["stages"])


def _alternatives(cfg) -> list[tuple[str, dict]]:
    """One change at a time, then together: the usual ways to a smaller rank (as flags)."""
    f, par = cfg.flags, cfg.parallel
    out = []
    if not f["recompute_granularity"]:
        out.append(("--recompute-granularity full", dict(recompute_granularity="full")))
    if not f["use_distributed_optimizer"] and par.data > 1:
        out.append(("--use-distributed-optimizer", dict(use_distributed_optimizer=True)))
    for flag, name, size in (("tensor_model_parallel_size", "TP", par.tensor),
                             ("pipeline_model_parallel_size", "PP", par.pipeline)):
        out.append((f"--{flag.replace('_', '-')} {size * 2} ({name}={size * 2})", {flag: size * 2}))
    if len(out) > 1 and not f["recompute_granularity"]:
        out.append((" ".join(label.split(" (")[0] for label, _ in out[:2]), {**out[0][1], **out[1][1]}))
    return out


def fit_advice(cfg, p: dict) -> list[str]:
    """A plan whose busiest rank exceeds the card: a warning line, then each alternative's need."""
    have = GPU_MEMORY_GB[cfg.dry_run.gpu] * 1e9
    need = _busiest_rank_bytes(p)
    if need <= have:
        return []
    lines = [f"warning: the busiest rank needs {need / GIB:.1f} GiB, more than the "
             f"{GPU_MEMORY_GB[cfg.dry_run.gpu]} GB ({have / GIB:.1f} GiB) of one {cfg.dry_run.gpu}; alternatives (same world size "
             f"{cfg.parallel.world_size}):"]
    for label, change in _alternatives(cfg):
        try:
            alt = train_config.build_train_config(argparse.Namespace(**{**cfg.flags, **change}))
        except train_config.ArgumentError as e:
            lines.append(f"  {label}: not possible ({e})")
            continue
        alt_need = _busiest_rank_bytes(plan(alt))
        lines.append(f"  {label}: {alt_need / GIB:.1f} GiB per rank, {'fits' if alt_need <= have else 'does not fit'}")
    return lines


def run_dry_run(cfg) -> int:
    """The ``--dry-run`` entry point (called by ``megatron_solo.train``'s ``main`` in place of training)."""
    cpu_backend.ensure()
    mcore_fixes.apply()
    p = plan(cfg)
    lines = ([cfg.model.source_note] if cfg.model.source_note else []) + report(p, cfg.model.args).split("\n")
    print("\n".join(lines[:-1] + fit_advice(cfg, p) + lines[-1:]), flush=True)  # the JSON line stays last
    return 0
