"""Model FLOPs per iteration (what MFU is computed from), Megatron-LM's formula for a GQA/SwiGLU GPT.

Per token and layer, forward, counted as 2 FLOPs per multiply-add:
- QKV and output projections: 2*h*(h + 2*g*d) + 2*h*h   (h hidden, g query groups, d head dim, n heads)
- attention scores and values: 2 * 2 * s * n * d, halved for the causal mask
- SwiGLU MLP: 2 * 3 * h * f
- output layer: 2 * h * V (padded vocabulary); patch projection: 2 * 3072 * h per patch (ignored: < 0.1%)
Backward costs twice the forward, so the total is 3x the forward. Recompute is not counted (model
FLOPs, as in MFU).
"""


def num_floating_point_operations(m, *, seq_length: int, global_batch_size: int, padded_vocab_size: int) -> float:
    """FLOPs of one step of ``global_batch_size`` samples of ``seq_length`` tokens for model args ``m``."""
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    n, g, d = m.num_attention_heads, m.num_query_groups, m.kv_channels
    s = seq_length
    window = min(s, m.sliding_window) if m.sliding_window else s
    tokens = global_batch_size * s
    per_token_layer = (
        2 * h * (n * d + 2 * g * d) + 2 * n * d * h      # projections
        + 2 * 2 * window * n * d / 2                     # causal attention (half the score matrix)
        + 2 * 3 * h * f                                  # gated MLP
    )
    forward = tokens * (L * per_token_layer + 2 * h * padded_vocab_size)
    return 3.0 * forward


def flops_per_step(cfg) -> float:
    """:func:`num_floating_point_operations` of a run's :class:`~megatron_solo.training.config.TrainConfig`."""
    return num_floating_point_operations(cfg.model.args, seq_length=cfg.schedule.seq_length,
                                         global_batch_size=cfg.schedule.global_batch_size,
                                         padded_vocab_size=cfg.model.padded_vocab_size)
