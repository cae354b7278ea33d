"""A run's model as the trainer and ``--dry-run`` both build it: one ``SoloModel`` per virtual pipeline
stage of this rank, from the config's ``TransformerConfig``; the trainer then freezes and wraps them in
megatron-core DDP. Its own module so that neither the trainer nor the dry run imports the other."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel

from megatron_solo.model import build_solo_model
from megatron_solo.training import param_groups


def build_model_chunks(cfg, model_config, *, use_te: bool) -> list:
    """This rank's unwrapped model chunks, one per virtual pipeline stage (one without VPP). ``use_te`` is
    ``cfg.model.use_te`` for training; the dry run plans with the local spec."""
    vpp = cfg.parallel.virtual_pipeline
    return [build_solo_model(cfg.model.args, model_config, vp_stage=v if vpp else None,
                             padded_vocab_size=cfg.model.padded_vocab_size, use_te=use_te,
                             core_attention=cfg.model.attention_backend, lora=cfg.model.lora)
            for v in range(vpp or 1)]


def build_trained_chunks(cfg, model_config) -> list[DistributedDataParallel]:
    """The chunks the trainer trains: frozen parameters marked, then each chunk wrapped in megatron-core DDP."""
    chunks = build_model_chunks(cfg, model_config, use_te=cfg.model.use_te)
    # Before the DDP wrap: frozen parameters get no gradient buffer, main copy or optimizer state (under
    # --lora-rank every base weight is frozen: the optimizer holds the adapters only).
    param_groups.apply_freezing(chunks, cfg.optimizer)
    ddp_config = cfg.ddp_config()
    return [DistributedDataParallel(config=model_config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=(i > 0))  # Megatron-LM: only chunk 0 overlaps
            for i, chunk in enumerate(chunks)]


def count_parameters(model_chunks, trainable_only: bool = False) -> int:
    return sum(p.numel() for c in model_chunks for p in c.module.parameters() if p.requires_grad or not trainable_only)
