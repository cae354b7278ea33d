"""Workarounds for megatron-core bugs, applied by an explicit call (:func:`apply`) from the entry points.

Importing this module changes nothing. Each fix is idempotent and a no-op where the bug cannot occur.
"""

from __future__ import annotations


def fix_torch_adam_reshardable_load() -> None:
    """megatron-core 0.19.2 bug, without TE/apex only: loading the distributed optimizer's
    ``fully_reshardable`` state copies every tensor of torch Adam's per-parameter state, including
    ``step``, from a source dict that (by design) has no ``step`` (it is restored from param_groups),
    and fails with ``KeyError: 'step'``. Skip keys the source does not carry."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", True) or getattr(dopt.DistributedOptimizer, "_solo_patched", False):
        return
    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    dopt.DistributedOptimizer._solo_patched = True


def apply() -> None:
    """Every workaround this package needs from megatron-core 0.19.2."""
    fix_torch_adam_reshardable_load()
