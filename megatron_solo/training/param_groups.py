"""Recipe controls of an encoder-free model: per-group learning rates and freezing.

A SOLO model starts with one freshly initialised layer (the patch embedding ``vision_patch_embed.weight``)
inside a pretrained LLM. Two controls let a recipe treat it differently from the rest:

* **Parameter groups**, expressed in megatron-core's own mechanism: :func:`config_overrides` returns the
  ``{ParamKey: ParamGroupOverride}`` dict that ``get_megatron_optimizer`` takes. It starts from
  megatron-core's standard overrides (no weight decay on biases and 1-D parameters; Megatron-LM's
  ``--decoupled-lr``/``--decoupled-min-lr`` for the word embedding and output layer) and adds the
  vision group (``--vision-lr``, ``--vision-min-lr``, ``--vision-weight-decay``). Every group follows the
  one scheduler (warm-up, decay style, decay steps) between its own peak and final learning rate.
* **Freezing**: :func:`apply_freezing` sets ``requires_grad=False`` on the frozen parameters *before* the
  DDP wrap, so megatron-core gives them no gradient buffer, no fp32 main copy and no optimizer state.
  ``--freeze-lm`` trains only the image side: the patch embedding and, in a model with vision experts
  (``--vision-experts``), the experts (Mono-InternVL's "delta tuning"); ``--freeze-vision`` everything but it;
  ``--lora-rank`` only the LoRA adapters (``model/lora.py``).

Checkpoints keep every weight (frozen ones included); the optimizer part holds the trainable ones
only, so resuming with a different set of trainable parameters or groups needs ``--finetune`` (weights
only) or ``--no-load-optim`` (:func:`check_resume`).
"""

from __future__ import annotations

import fnmatch
from typing import Callable

from megatron_solo.parameter_names import is_lora_parameter, is_vision_expert_parameter

VISION_PARAM_PATTERN = "*vision_patch_embed.*"  # matches with or without the DDP wrapper's "module." prefix
GROUP_KEY = "group_name"  # our tag in a ParamGroupOverride; megatron-core copies it into the param group

# The flags that decide which parameters the optimizer holds and how they are grouped.
GROUP_FLAGS = ("freeze_lm", "freeze_vision", "vision_lr", "vision_min_lr", "vision_weight_decay",
               "decoupled_lr", "decoupled_min_lr")


def is_vision_parameter(name: str) -> bool:
    return fnmatch.fnmatch(name, VISION_PARAM_PATTERN) or name.startswith("vision_patch_embed.")


def is_image_side_parameter(name: str) -> bool:
    """The patch embedding and the vision experts: what ``--freeze-lm`` trains and ``--freeze-vision`` freezes."""
    return is_vision_parameter(name) or is_vision_expert_parameter(name)


def trainable_parameter_filter(cfg) -> Callable[[str], bool]:
    """``name -> True`` when the parameter trains under this run's ``--freeze-*`` / ``--lora-rank`` flags.

    Works on any object with ``freeze_lm``/``freeze_vision``/``lora_rank`` attributes (the config's optimizer
    section or the parsed flags), and
    on names with or without the DDP ``module.`` prefix: the dry run counts memory with it."""
    freeze_lm, freeze_vision = bool(getattr(cfg, "freeze_lm", False)), bool(getattr(cfg, "freeze_vision", False))
    if getattr(cfg, "lora_rank", 0):
        return is_lora_parameter

    def trains(name: str) -> bool:
        return not (freeze_vision if is_image_side_parameter(name) else freeze_lm)

    return trains


def apply_freezing(model_chunks, cfg) -> tuple[int, int]:
    """Set ``requires_grad=False`` on the frozen parameters of unwrapped model chunks (call before DDP).

    Returns (trainable, frozen) element counts on this rank."""
    trains = trainable_parameter_filter(cfg)
    trainable = frozen = 0
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if trains(name):
                trainable += p.numel()
            else:
                p.requires_grad_(False)
                frozen += p.numel()
    return trainable, frozen


def vision_min_lr(cfg) -> float:
    """``--vision-min-lr``, else ``--min-lr`` (Megatron-LM's rule for ``--decoupled-min-lr``)."""
    return cfg.min_lr if cfg.vision_min_lr is None else cfg.vision_min_lr


def config_overrides(cfg, optimizer_config) -> dict:
    """megatron-core's ``config_overrides`` for ``get_megatron_optimizer``: its standard ones (weight-decay
    skips, decoupled embedding/output learning rate from ``optimizer_config``) plus the vision group."""
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(optimizer_config)
    decoupled = ParamKey(attr="is_embedding_or_output_parameter")
    if decoupled in overrides:
        overrides[decoupled] = ParamGroupOverride(**overrides[decoupled], **{GROUP_KEY: "embedding/output"})
    vision = {}
    if cfg.vision_lr is not None:
        vision.update(max_lr=cfg.vision_lr, min_lr=vision_min_lr(cfg))
    if cfg.vision_weight_decay is not None:
        # The scheduler keeps weight decay constant; a group's own start/end replaces --weight-decay.
        vision.update(start_wd=cfg.vision_weight_decay, end_wd=cfg.vision_weight_decay)
    if vision:
        overrides[ParamKey(name=VISION_PARAM_PATTERN)] = ParamGroupOverride(**vision, **{GROUP_KEY: "vision"})
    return overrides


def group_learning_rates(optimizer) -> dict[str, float]:
    """The current learning rate of each named group: ``default`` first, then ``vision`` and
    ``embedding/output`` when the run has them. Every rank holds every group (megatron-core aligns the
    groups across ranks, empty where a stage has none of its parameters), so the logging rank can read
    the vision group's rate on the last pipeline stage too."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        name = group.get(GROUP_KEY, "default")
        if name not in out:
            lr = group["lr"]
            out[name] = float(lr.item() if hasattr(lr, "item") else lr)
    return dict(sorted(out.items(), key=lambda kv: kv[0] != "default"))


def check_args(args, fail) -> None:
    """One-line checks of the recipe flags (``fail(msg)`` raises the ArgumentError)."""
    if args.freeze_lm and args.freeze_vision:
        fail("--freeze-lm and --freeze-vision together leave nothing to train; give at most one")
    _check_lora_args(args, fail)
    for flag in ("vision_lr", "vision_min_lr", "vision_weight_decay", "decoupled_lr", "decoupled_min_lr"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            fail(f"--{flag.replace('_', '-')} must be >= 0, got {v}")
    if args.vision_min_lr is not None and args.vision_lr is None:
        fail("--vision-min-lr needs --vision-lr (the vision group's peak learning rate)")
    if args.vision_lr is not None and vision_min_lr(args) > args.vision_lr:
        fail(f"the vision group's final learning rate ({vision_min_lr(args)}, --vision-min-lr or else --min-lr) "
             f"is larger than --vision-lr ({args.vision_lr}); set --vision-min-lr")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        fail("--decoupled-min-lr needs --decoupled-lr")
    if args.decoupled_lr is not None:
        d_min = args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr
        if d_min > args.decoupled_lr:
            fail(f"the embedding/output group's final learning rate ({d_min}, --decoupled-min-lr or else --min-lr) "
                 f"is larger than --decoupled-lr ({args.decoupled_lr}); set --decoupled-min-lr")
    if args.freeze_vision and (args.vision_lr is not None or args.vision_weight_decay is not None):
        fail("--vision-lr/--vision-weight-decay have no effect with --freeze-vision; drop one of them")
    if args.freeze_lm and args.decoupled_lr is not None:
        fail("--decoupled-lr has no effect with --freeze-lm (the embedding and output layer are frozen)")


def _check_lora_args(args, fail) -> None:
    rank = getattr(args, "lora_rank", 0)
    if rank < 0:
        fail(f"--lora-rank must be >= 0 (0: no adapters), got {rank}")
    if not rank:
        if args.lora_alpha is not None or args.lora_dropout:
            fail("--lora-alpha/--lora-dropout need --lora-rank (the adapters' rank)")
        return
    if not 0.0 <= args.lora_dropout < 1.0:
        fail(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        fail(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if args.freeze_lm or args.freeze_vision:
        fail("--lora-rank trains the adapters only (every base weight is frozen); drop --freeze-lm/--freeze-vision")


def check_resume(args, resume, fail) -> None:
    """A resume that loads the optimizer needs the checkpoint's trainable set and groups: the optimizer
    state holds exactly those parameters and groups. ``fail(msg)`` raises the one-line error naming the way out."""
    if resume.info is None or resume.finetune or args.no_load_optim or not resume.info.get("has_optimizer"):
        return
    saved = resume.info.get("args", {})
    changed = [f for f in GROUP_FLAGS if saved.get(f, None if f.startswith(("vision", "decoupled")) else False)
               != getattr(args, f)]
    if changed:
        names = ", ".join("--" + f.replace("_", "-") for f in changed)
        fail(
            f"{resume.load_dir} was saved with different {names} (checkpoint: "
            f"{', '.join(f'{f}={saved.get(f)}' for f in changed)}); its optimizer state holds other parameters "
            f"or groups: add --no-load-optim (keep iteration and schedule, fresh optimizer state) or "
            f"--finetune (weights only, a new stage)")
