"""Padded vocabulary rows never win (issue 12): the same weights padded to two different sizes give the
same losses and the same greedy picks, at TP=2 (the padding sits in the second vocab-parallel shard,
so the per-shard offset is exercised). The padded rows are given large weights: unmasked, they would
dominate the softmax."""

import torch

from megatron_solo.testing.distributed import run_distributed
from tests.test_model_parallel import as_bytes, from_bytes, mixed_batch, model_args


def _full(shard: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(shard.t().contiguous()).t().contiguous()


def _worker():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_solo.model import build_solo_model, build_transformer_config, model_forward_kwargs
    from megatron_solo.parallel import initialize_model_parallel, set_seed

    initialize_model_parallel(tensor_model_parallel_size=2)
    rank, tp = parallel_state.get_tensor_model_parallel_rank(), 2
    args = model_args()
    config = build_transformer_config(args, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    batch = mixed_batch()
    out = {}
    ref = None
    for padded in (args.padded_vocab_size(tp), args.padded_vocab_size(tp) + 256 * 3):
        set_seed(1234)
        torch.manual_seed(1234)
        model = build_solo_model(args, config, padded_vocab_size=padded)
        if ref is None:
            ref = {k: v.clone() for k, v in model.state_dict().items() if v is not None and torch.is_tensor(v)}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    real = _full(ref[name])[:args.vocab_size]
                    pad = torch.full((padded - args.vocab_size, p.shape[1]), 3.0)  # rows that would win
                    full = torch.cat([real, pad])
                    p.copy_(full.chunk(tp)[rank])
                else:
                    p.copy_(ref[name])
            kw = model_forward_kwargs(batch, config)
            losses = model(**kw).clone()
            kw.pop("labels", None)
            logits = gather_from_tensor_model_parallel_region(model(**kw))  # [b, s, padded]
        out[padded] = {"losses": losses, "argmax": logits.argmax(-1),
                       "padded_max": logits[..., args.vocab_size:].max(), "real": logits[..., :args.vocab_size]}
    return out


def test_two_paddings_give_equal_losses_and_greedy_picks_at_tp2():
    r0, _ = [from_bytes(r) for r in run_distributed(as_bytes, 2, _worker, timeout=600)]
    (a, ra), (b, rb) = sorted(r0.items())
    assert a == 33280 and b == 33280 + 768
    torch.testing.assert_close(ra["losses"], rb["losses"])
    torch.testing.assert_close(ra["real"], rb["real"])
    assert torch.equal(ra["argmax"], rb["argmax"]) and int(ra["argmax"].max()) < 33031
    assert float(ra["padded_max"]) == float(rb["padded_max"]) == torch.finfo(torch.float32).min
