"""Megatron-LM-style command line of ``python -m megatron_solo.train`` and its start-up checks.

Every bad flag or combination is an :class:`ArgumentError` (one line, printed as ``error: ...`` with exit
code 2 by the entry point) raised before anything heavy is built, never a traceback from deep inside
megatron-core: :func:`validate_args` checks what needs nothing derived, and
:func:`megatron_solo.training.config.build_train_config` what needs a derived size.
"""

from __future__ import annotations

import argparse
import os

from megatron_solo.errors import InputError
from megatron_solo.parameter_names import DEFAULT_LORA_TARGETS, LORA_TARGETS
from megatron_solo.presets import PRESETS
from megatron_solo.spec import IMAGE_ATTENTION_CHOICES, IMAGE_POSITIONS_CHOICES
from megatron_solo.training import param_groups


class ArgumentError(InputError, ValueError):
    """A bad flag or combination: the entry point's one ``error:`` line, exit 2 (megatron_solo.errors)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Megatron-LM's habit: every flag's help ends with its default (unless the text already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.required else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_solo.train",
        description="Train a SOLO model (stage 1/2/3 pre-training or SFT) with megatron-core. Flags follow "
                    "Megatron-LM; the launchers in examples/ set them (bash examples/sft.sh --help).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="preset (megatron_solo.model.PRESETS: solo-7b, tiny, qwen3-8b, ...); default: the architecture "
                        "of the checkpoint the run starts from (--load, or --save when resuming), else tiny")
    for name, typ in (("num-layers", int), ("hidden-size", int), ("ffn-hidden-size", int),
                      ("num-attention-heads", int), ("num-query-groups", int), ("kv-channels", int),
                      ("max-position-embeddings", int), ("rotary-base", int), ("norm-epsilon", float),
                      ("sliding-window", int), ("init-method-std", float)):
        g.add_argument(f"--{name}", type=typ, default=None, help=f"override the preset's {name.replace('-', '_')} (None: the preset's)")
    g.add_argument("--no-sliding-window", action="store_true", help="full causal attention")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="the architecture of the --load checkpoint (e.g. a converted base of any family) even when "
                        "--model is given (Megatron-LM's flag; without --model that is the default)")
    g.add_argument("--vision-experts", choices=("none", "ffn", "full"), default=None,
                   help="image tokens' own weights in every layer (docs/MODEL.md): none (SOLO), ffn (own MLP "
                        "and its norm) or full (also own input norm, QKV and output projection); None: the "
                        "preset's or checkpoint's")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (Megatron's rule)")
    g.add_argument("--image-attention", default=None, choices=IMAGE_ATTENTION_CHOICES,
                   help="causal (SOLO) or bidirectional: the tokens of one image block, <vision> to </vision>, "
                        "see each other (docs/MODEL.md); needs the local spec (default: the --load "
                        "checkpoint's, else causal)")
    g.add_argument("--image-positions", default=None, choices=IMAGE_POSITIONS_CHOICES,
                   help="1d (SOLO) or mrope: megatron-core's multimodal RoPE, patches at (temporal, row, column) "
                        "(docs/MODEL.md); needs the local spec (default: the --load checkpoint's, else 1d)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel size (TP): each layer's weights split over this many ranks")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline-parallel size (PP): the layers split into this many stages")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual stage: interleaved 1F1B (needs PP > 1)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split layer norms and dropout over the TP ranks along the sequence (needs TP > 1)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="context-parallel size (GPU + Transformer Engine only)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the gradient reduce-scatter with the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the parameter all-gather with the forward pass (needs --use-distributed-optimizer)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="timeout of collective operations")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--seq-length", type=int, required=True,
                   help="tokens per sample (one pack, cut or padded); required")
    g.add_argument("--micro-batch-size", type=int, default=1,
                   help="samples per forward-backward pass on one data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step over all data-parallel ranks (None: micro x DP); micro-batches per step = global / (micro x DP)")
    g.add_argument("--train-iters", type=int, default=None,
                   help="optimizer steps to train for (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train for (iterations = samples / global batch)")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="optimizer")
    g.add_argument("--lr", type=float, default=5e-5,
                   help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0,
                   help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant", "WSD"],
                   help="learning-rate decay after warm-up")
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="iterations of linear warm-up from --lr-warmup-init to --lr")
    g.add_argument("--lr-warmup-init", type=float, default=0.0,
                   help="learning rate at the start of warm-up")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iterations the decay spans (None: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="decoupled weight decay (AdamW)")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm to this")
    g.add_argument("--adam-beta1", type=float, default=0.9,
                   help="Adam's beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999,
                   help="Adam's beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8,
                   help="Adam's epsilon")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many consecutive iterations skipped for a NaN/inf loss or gradient")

    g = p.add_argument_group("parameter groups and freezing (megatron_solo/training/param_groups.py)")
    g.add_argument("--vision-lr", type=float, default=None,
                   help="peak learning rate of the patch embedding, same schedule as --lr (default: None, --lr)")
    g.add_argument("--vision-min-lr", type=float, default=None,
                   help="final learning rate of the patch embedding (default: None, --min-lr)")
    g.add_argument("--vision-weight-decay", type=float, default=None,
                   help="weight decay of the patch embedding (default: None, --weight-decay)")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="peak learning rate of the word embedding and output layer, as Megatron-LM "
                        "(default: None, --lr)")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="final learning rate of the word embedding and output layer (default: None, --min-lr)")
    g.add_argument("--freeze-lm", action="store_true",
                   help="train only the patch embedding (and the vision experts, with --vision-experts); every "
                        "other weight stays as loaded, with no gradient buffer and no optimizer state (the "
                        "alignment stage; default: off)")
    g.add_argument("--freeze-vision", action="store_true",
                   help="train everything except the patch embedding (and the vision experts) (default: off)")

    g = p.add_argument_group("LoRA adapters (megatron_solo/model/lora.py, docs/TRAINING.md)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank on --lora-targets and nothing else (the base, from --load "
                        "with --finetune, stays as loaded); 0: off")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA scaling numerator: an adapter adds (alpha / rank) * B A x (default: None, the rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on an adapter's input")
    g.add_argument("--lora-targets", nargs="+", choices=LORA_TARGETS, default=list(DEFAULT_LORA_TARGETS),
                   help="layers that get adapters: attention QKV and output projection, MLP in and out, the patch "
                        "embedding (the vision experts' twins of a targeted layer too)")

    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision (fp32 main weights and gradients)")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 mixed precision with dynamic loss scaling")
    g.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"],
                   help="FP8 format of Transformer Engine's linear layers (needs TE and --bf16)")
    g.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
                   help="FP8 scaling recipe")
    g.add_argument("--fp8-margin", type=int, default=0,
                   help="FP8 scaling margin")
    g.add_argument("--fp8-interval", type=int, default=1,
                   help="FP8 scaling-factor update interval")
    g.add_argument("--fp8-amax-history-len", type=int, default=1,
                   help="length of the FP8 amax history")
    g.add_argument("--fp8-amax-compute-algo", default="most_recent", choices=["most_recent", "max"],
                   help="how the FP8 amax is taken from its history")
    g.add_argument("--no-fp8-wgrad", action="store_true",
                   help="compute weight gradients in higher precision than FP8")
    g.add_argument("--fp8-param-gather", action="store_true",
                   help="keep parameters in FP8 for the all-gather")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                   help="activation recomputation: full layers, or the attention core (selective)")
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                   help="full recompute: uniform (every N layers) or block (the first N per stage)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="layers per recompute unit (uniform) or recomputed layers per stage (block)")
    g.add_argument("--transformer-impl", default=None, choices=["transformer_engine", "local"],
                   help="layer spec (default: TE when it imports on a GPU, else local)")
    g.add_argument("--attention-backend", default="dot_product", choices=["dot_product", "sdpa_flex"],
                   help="core attention of the local spec: megatron's dot product, or torch SDPA/FlexAttention")

    g = p.add_argument_group("data and loss")
    # Required unless --dry-run (checked in validate_args, so a plan needs no data).
    g.add_argument("--data-path", nargs="+", default=None, help="'P' or 'w1 P1 w2 P2 ...' (Megatron syntax)")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="validation prefixes; the loss is reported per prefix")
    g.add_argument("--split", default="969,30,1",
                   help="train,valid,test weights of each --data-path prefix's packs (100,0,0: no validation)")
    g.add_argument("--data-cache-path", default=None,
                   help="where megatron-core caches dataset indices (unused: indices are recomputed in memory)")
    g.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader worker processes per rank that read, decode and patchify the training "
                        "samples ahead of the step (0: in the training process); same batches either way")
    g.add_argument("--tokenizer-model", default=None, help="SOLO's tokenizer.model or tokenizer.json (checked against SOLO's ids and the data's)")
    g.add_argument("--loss-role", default="assistant", choices=["assistant", "user", "system", "all"],
                   help="role whose tokens carry the loss (all: every non-image token)")
    g.add_argument("--seed", type=int, default=1234,
                   help="random seed (initialisation, data order)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None,
                   help="checkpoint directory to write")
    g.add_argument("--load", default=None,
                   help="checkpoint directory to start from (the newest complete iteration)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every this many iterations (and at the end)")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only; reset iteration, optimizer and scheduler (a new stage)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load the optimizer state")
    g.add_argument("--no-load-rng", action="store_true",
                   help="do not load the RNG state")
    # Megatron-LM's names (both spellings). Without either, a resumed run keeps the checkpoint's schedule.
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
                   dest="override_opt_param_scheduler",
                   help="on resume, the learning-rate schedule of the flags (--lr, --min-lr, warm-up, decay, "
                        "--weight-decay) replaces the checkpoint's; the iteration count carries over")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="on resume, keep the checkpoint's learning-rate schedule (the default, said explicitly)")
    g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration instead of the latest")
    g.add_argument("--keep-last-checkpoints", type=int, default=None,
                   help="keep only this many newest checkpoints in --save (None: all)")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save the model without the optimizer state")

    g = p.add_argument_group("evaluation, logging and exit")
    g.add_argument("--eval-interval", type=int, default=1000,
                   help="evaluate on the validation set every this many iterations")
    g.add_argument("--eval-iters", type=int, default=10,
                   help="global batches per evaluation")
    g.add_argument("--eval-tasks", default=None,
                   help="evaluation task files FILE[,FILE] (docs/EVALUATION.md) scored on the model in training")
    g.add_argument("--eval-tasks-interval", type=int, default=None,
                   help="score --eval-tasks every this many iterations (default: --eval-interval)")
    g.add_argument("--log-interval", type=int, default=100,
                   help="print a log line every this many iterations")
    g.add_argument("--tensorboard-dir", default=None,
                   help="write TensorBoard scalars here")
    g.add_argument("--log-file", default=None, help="also append the log lines as JSON to this file")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM/SIGINT, save a checkpoint at the end of the iteration and exit")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit after an iteration that is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit after this many minutes")

    g = p.add_argument_group("planning (megatron_solo/training/dry_run.py)")
    g.add_argument("--dry-run", action="store_true",
                   help="build each rank's model on the meta device in this one process (world size from "
                        "WORLD_SIZE), print parameters, memory per rank, FLOPs and step time, and exit; "
                        "no GPU, data or process group needed")
    g.add_argument("--dry-run-gpu", default="H100", choices=["H100", "H200", "A100", "B200"],
                   help="GPU whose dense peak the step time is computed for (default: H100)")
    g.add_argument("--dry-run-mfu", type=float, default=0.45,
                   help="model FLOPs utilisation assumed for the step time (default: 0.45)")
    return p


def fail(msg: str):
    raise ArgumentError(msg)


def validate_args(args) -> None:
    """Check the flags and their combinations that need nothing derived; ``args`` is not changed. The
    checks that need a derived size (world size, the model's shape, the layer spec) are made where that
    size is derived, in :func:`megatron_solo.training.config.build_train_config`."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    for name, v in (("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                    ("context-parallel-size", cp), ("micro-batch-size", args.micro_batch_size),
                    ("seq-length", args.seq_length)):
        if v < 1:
            fail(f"--{name} must be >= 1, got {v}")
    if args.num_workers < 0:
        fail(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.model is not None and args.model not in PRESETS:  # named by its flag, so a launcher adds the variable
        fail(f"--model {args.model}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")
    if not args.data_path and not args.dry_run:
        fail("the following arguments are required: --data-path")  # argparse's words, said as one line
    if args.train_iters is not None and args.train_samples is not None or (
            args.train_iters is None and args.train_samples is None and not args.dry_run):  # a plan: one step
        fail("give exactly one of --train-iters and --train-samples")
    if args.bf16 and args.fp16:
        fail("choose at most one of --bf16 and --fp16")
    if args.fp8_format and not (args.bf16 or args.fp16):
        fail("--fp8-format needs --bf16 (or --fp16) for the non-FP8 parts")
    if cp > 1:
        import torch  # here, not at the top: --help answers before torch loads

        if not torch.cuda.is_available():
            fail("--context-parallel-size > 1 needs GPUs with Transformer Engine; this machine has no CUDA")
    if args.sequence_parallel and tp == 1:
        fail("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        fail("--overlap-param-gather needs --use-distributed-optimizer")
    if args.recompute_method and args.recompute_granularity != "full":
        fail("--recompute-method applies to --recompute-granularity full only")
    if args.min_lr > args.lr:
        fail(f"--min-lr ({args.min_lr}) is larger than --lr ({args.lr})")
    param_groups.check_args(args, fail)
    if args.save_interval is not None and not args.save:
        fail("--save-interval needs --save")
    if args.finetune and not args.load:
        fail("--finetune needs --load (the checkpoint to start from)")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        fail("--override-opt_param-scheduler (the flags' learning-rate schedule) and "
             "--use-checkpoint-opt_param-scheduler (the checkpoint's) contradict each other: give one of them")
    if args.exit_signal_handler and not args.save:
        fail("--exit-signal-handler needs --save (it saves before exiting)")
    # a plan reads no tokenizer (nor data): a job is planned before its inputs exist
    if args.tokenizer_model and not args.dry_run and os.path.isdir(args.tokenizer_model):
        inside = [f for f in ("tokenizer.model", "tokenizer.json")
                  if os.path.isfile(os.path.join(args.tokenizer_model, f))]
        fail(f"--tokenizer-model {args.tokenizer_model} is a directory; pass the tokenizer file "
             + (f"in it: {os.path.join(args.tokenizer_model, inside[0])}" if inside
                else "(tokenizer.model or tokenizer.json), e.g. from tools/create_solo_tokenizer.py"))
    if args.tokenizer_model and not args.dry_run and not os.path.isfile(args.tokenizer_model):
        fail(f"--tokenizer-model {args.tokenizer_model} does not exist")
    if args.log_interval < 1 or args.eval_interval < 1:
        fail("--log-interval and --eval-interval must be >= 1")
    if args.eval_tasks_interval is not None and args.eval_tasks_interval < 1:
        fail("--eval-tasks-interval must be >= 1")
    if args.num_layers_per_virtual_pipeline_stage is not None and pp < 2:
        fail("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
