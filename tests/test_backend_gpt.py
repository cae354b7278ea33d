"""The CPU backend proven on megatron-core's plain GPTModel, before any SOLO code is involved.

Each world of 2 gloo ranks runs several parallel layouts in turn (re-initialising megatron's
groups), so that the expensive process start-up is paid once per comparison group.
"""

import os

import pytest
import torch

from megatron_solo.testing.distributed import run_distributed

SEQ, VOCAB, MBS = 16, 128, 2


def _config(**overrides):
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_solo import cpu_backend

    kw = dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.05,
        pipeline_dtype=torch.float32,
    )
    kw.update(cpu_backend.cpu_config_overrides())
    kw.update(overrides)
    return TransformerConfig(**kw)


def _build_gpt(seed=1234, vp_stage=None, **cfg):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_solo.parallel import set_seed

    set_seed(seed)
    # With use_cpu_initialization, Megatron draws each full weight from the (seeded) CPU generator
    # and keeps this rank's slice, so TP=1 and TP=2 models built from one seed hold equal weights.
    torch.manual_seed(seed)
    return GPTModel(
        config=_config(**cfg),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def _batch(i):
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), pos.contiguous()


def _full_grads(model):
    """Every gradient, gathered to full (TP=1) shape, keyed by parameter name."""
    from megatron.core import parallel_state
    out = {}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else getattr(p, "main_grad", None)
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            dim = p.partition_dim
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            # A strided partition (the gated MLP's [gate; up] fc1) holds `stride` interleaved chunks per rank.
            stride = getattr(p, "partition_stride", 1)
            chunks = [c for part in parts for c in part.chunk(stride, dim=dim)]
            g = torch.cat([chunks[r * stride + k] for k in range(stride) for r in range(tp)], dim=dim)
        out[name] = g.detach().clone()
    return out


def _gather_logits(logits):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits).detach().clone()


def _tp_and_checkpoint_worker(ckpt_dir):
    from megatron.core import dist_checkpointing

    from megatron_solo.parallel import initialize_model_parallel

    results = {}
    tokens, labels, pos = _batch(0)
    for tp in (2, 1):
        initialize_model_parallel(tensor_model_parallel_size=tp)
        model = _build_gpt()
        loss = model(tokens, pos, None, labels=labels)  # [b, s] per-token losses
        loss.mean().backward()
        results[f"tp{tp}_loss"] = loss.detach().clone()
        results[f"tp{tp}_grads"] = _full_grads(model)
        with torch.no_grad():
            results[f"tp{tp}_logits"] = _gather_logits(model(tokens, pos, None))
        if tp == 2:
            dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
            torch.distributed.barrier()

    # The TP=2 checkpoint loads into a TP=1 model built from another seed, giving TP=2's logits.
    initialize_model_parallel(tensor_model_parallel_size=1)
    model = _build_gpt(seed=999)
    with torch.no_grad():
        results["tp1_other_seed_logits"] = _gather_logits(model(tokens, pos, None))
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    with torch.no_grad():
        results["tp1_from_tp2_ckpt_logits"] = _gather_logits(model(tokens, pos, None))
    return results


def _run_schedule(model, n_micro, forward_only=False):
    """megatron-core's schedule (1F1B when PP>1) over n_micro batches; returns per-microbatch losses."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter([_batch(i) for i in range(n_micro)])
    losses = []

    def forward_step(data_iterator, model):
        tokens, labels, pos = next(data_iterator)
        out = model(tokens, pos, None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            losses.append(loss.detach().clone())
            return loss, {"loss": loss.detach()}

        return out, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model,
        num_microbatches=n_micro,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=forward_only,
    )
    return losses if parallel_state.is_pipeline_last_stage() else None


def _pp_worker(ckpt_dir):
    """Save PP=1 weights, reload them at PP=2, and compare 1F1B against no pipelining."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_solo.parallel import initialize_model_parallel

    n_micro = 4
    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    ref = _build_gpt()
    ref_losses = _run_schedule(ref, n_micro)
    ref_grads = _full_grads(ref)
    # A collective: every rank takes part, megatron-core writes each shard once.
    dist_checkpointing.save(ref.sharded_state_dict(), ckpt_dir)

    initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    model = _build_gpt(seed=4321)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    pp_losses = _run_schedule(model, n_micro)
    # Layer numbering is global in megatron-core's sharded keys, local in named_parameters:
    # map this stage's local layer index back to the global one.
    offset = parallel_state.get_pipeline_model_parallel_rank() * (4 // 2)
    pp_grads = {}
    for name, g in _full_grads(model).items():
        if ".layers." in name:
            head, rest = name.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            name = f"{head}.layers.{int(idx) + offset}.{tail}"
        pp_grads[name] = g
    return {"ref_losses": ref_losses, "pp_losses": pp_losses, "ref_grads": ref_grads, "pp_grads": pp_grads,
            "stage": parallel_state.get_pipeline_model_parallel_rank()}


def _dp_worker(use_distributed_optimizer, n_steps=2):
    """Two optimizer steps of megatron-core DDP + (distributed) Adam; global batch of 4 micro-batches."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_solo.parallel import initialize_model_parallel

    initialize_model_parallel()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    model = _build_gpt(calculate_per_token_loss=True)
    model = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=use_distributed_optimizer,
            average_in_collective=False,
        ),
        module=model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                        use_distributed_optimizer=use_distributed_optimizer),
        [model],
    )
    # Megatron-LM's wiring: the schedule reduces grads across DP and divides by the global token count.
    from megatron.core.distributed import finalize_model_grads

    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = opt.scale_loss
    model.config.no_sync_func = model.no_sync
    initial = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    global_micro = 4
    per_rank = global_micro // dp
    losses = []
    for step in range(n_steps):
        ids = [step * global_micro + dp_rank * per_rank + j for j in range(per_rank)]
        batches = iter([_batch(i) for i in ids])
        model.zero_grad_buffer()
        opt.zero_grad()

        def forward_step(data_iterator, model):
            tokens, labels, pos = next(data_iterator)
            out = model(tokens, pos, None, labels=labels)

            def loss_func(output):
                # Megatron's per-token mode: return (sum, count) and let the schedule average.
                return output.float().sum(), torch.tensor(output.numel(), dtype=torch.int), {}

            return out, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=model,
            num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
        )
        ok, grad_norm, _ = opt.step()
        assert ok
        losses.append(float(grad_norm))
    params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    moved = min(float((params[n] - initial[n]).abs().max()) for n in params)
    return {"grad_norms": losses, "params": params, "min_param_change": moved}


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    return str(d)


def test_tp2_equals_tp1_and_tp2_checkpoint_loads_at_tp1(ckpt_dir):
    r0, r1 = run_distributed(_tp_and_checkpoint_worker, 2, ckpt_dir)
    for r in (r0, r1):
        torch.testing.assert_close(r["tp2_loss"], r["tp1_loss"], rtol=1e-5, atol=1e-6)
        assert r["tp1_grads"].keys() == r["tp2_grads"].keys()
        for name in r["tp1_grads"]:
            torch.testing.assert_close(r["tp2_grads"][name], r["tp1_grads"][name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(r["tp2_logits"], r["tp1_logits"], rtol=1e-5, atol=1e-5)
        # The checkpoint really carried the weights: another seed differs, the loaded model matches.
        assert not torch.allclose(r["tp1_other_seed_logits"], r["tp2_logits"], atol=1e-3)
        torch.testing.assert_close(r["tp1_from_tp2_ckpt_logits"], r["tp2_logits"], rtol=1e-5, atol=1e-5)


def test_pp2_1f1b_equals_pp1(ckpt_dir):
    results = run_distributed(_pp_worker, 2, ckpt_dir)
    last = next(r for r in results if r["stage"] == 1)
    assert len(last["pp_losses"]) == 4
    torch.testing.assert_close(torch.stack(last["pp_losses"]), torch.stack(last["ref_losses"]), rtol=1e-5, atol=1e-6)
    seen = set()
    for r in results:
        for name, g in r["pp_grads"].items():
            torch.testing.assert_close(g, r["ref_grads"][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(results[0]["ref_grads"]), "every PP=1 parameter must live on exactly one stage"


def test_dp2_distributed_optimizer_equals_dp1():
    (dp1,) = run_distributed(_dp_worker, 1, False)
    r0, r1 = run_distributed(_dp_worker, 2, True)
    for r in (r0, r1):
        assert r["grad_norms"] == pytest.approx(dp1["grad_norms"], rel=1e-5)
        for name, p in dp1["params"].items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # Two Adam steps at lr 1e-2 really moved every weight (the comparison is not of untouched params).
    assert dp1["min_param_change"] > 1e-3
