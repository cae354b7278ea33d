"""Megatron-style per-iteration log lines, mirrored to TensorBoard and (optionally) a JSON-lines file.

The logger also owns the run's timing and throughput: the loop reports each finished step
(:meth:`TrainingLogger.step_done`) and the logger turns the window since the last line into step time,
tokens/s, images/s (summed over data-parallel ranks) and, on a known GPU, TFLOP/s and MFU."""

from __future__ import annotations

import json
import os
import time

import torch

from megatron_solo import cpu_backend


LINE_WIDTH = 160  # a log line is cut at its " | " separators to fit a terminal this wide


def fit_width(*groups: list[str], width: int = LINE_WIDTH, indent: str = "    ") -> str:
    """Megatron's ``a | b | c |`` log line, its parts kept whole, each group of parts starting a line and
    a group broken at its separators so that no line is wider than ``width`` (the lines after the first
    indented); a part wider than that stays on a line of its own."""
    lines = []
    for parts in groups:
        line = ""
        for part in parts:
            piece = part + " |"
            if line.strip() and len(line) + 1 + len(piece) > width:
                lines.append(line)
                line = ""
            line = f"{line} {piece}" if line.strip() else (indent if lines else "") + piece
        lines.append(line)
    return "\n".join(lines)


def memory_gib() -> dict[str, float]:
    """This process's host RSS and, on a GPU, allocated and peak GPU memory, in GiB."""
    import psutil

    out = {"host RSS": psutil.Process().memory_info().rss / 2**30}
    if not cpu_backend.is_active() and torch.cuda.is_available():
        out.update({"GPU allocated": torch.cuda.memory_allocated() / 2**30,
                    "max": torch.cuda.max_memory_allocated() / 2**30})
    return out


def _memory_text(values: dict[str, str]) -> str:
    return ", ".join(f"{k} {v} GiB" for k, v in values.items())


def over_ranks(values: dict[str, float], fmt: str) -> dict[str, str] | None:
    """Each number of every rank (a collective; all ranks call it), shown once: ``x`` when the ranks agree,
    else ``min-max``. Returned on every rank; the logging rank prints it."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    out = {}
    for k in values:
        lo, hi = (format(f(g[k] for g in gathered), fmt) for f in (min, max))
        out[k] = lo if lo == hi else f"{lo}-{hi}"
    return out


def peak_flops_per_gpu() -> float | None:
    """bf16 dense peak of the card, for MFU (None on CPU or an unknown card)."""
    if cpu_backend.is_active() or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("B200", 2250e12)):
        if key in name:
            return peak
    return None


class TrainingLogger:
    def __init__(self, cfg, is_logging_rank: bool):
        """``cfg``: the run's :class:`~megatron_solo.training.config.TrainConfig`."""
        self.schedule, self.world_size = cfg.schedule, cfg.parallel.world_size
        logging = cfg.logging
        self.flops_per_iter = 0.0
        self._window = {"time": 0.0, "iters": 0, "images": 0, "skipped": 0}
        self.is_logging_rank = is_logging_rank
        self.writer = None
        self.jsonl = None
        if is_logging_rank and logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=logging.tensorboard_dir)
        if is_logging_rank and logging.log_file:
            os.makedirs(os.path.dirname(os.path.abspath(logging.log_file)), exist_ok=True)
            self.jsonl = open(logging.log_file, "a")
        self.peak = peak_flops_per_gpu()

    def info(self, msg: str) -> None:
        if self.is_logging_rank:
            print(msg, flush=True)

    def memory_line(self, msg: str) -> None:
        """``msg`` with every rank's memory, printed once (a collective: every rank calls it)."""
        self.info(f"{msg}; {_memory_text(over_ranks(memory_gib(), '.2f'))} per rank")

    def _record(self, kind: str, iteration: int, values: dict) -> None:
        if self.writer:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v == v:
                    self.writer.add_scalar(k, v, iteration)
            self.writer.flush()
        if self.jsonl:
            self.jsonl.write(json.dumps({"kind": kind, "iteration": iteration, **values}) + "\n")
            self.jsonl.flush()

    def start_throughput(self, flops_per_iter: float) -> None:
        self.flops_per_iter = flops_per_iter

    def step_done(self, seconds: float, *, images: int, skipped: bool) -> None:
        w = self._window
        w["time"] += seconds
        w["iters"] += 1
        w["images"] += images
        w["skipped"] += int(skipped)

    def _throughput(self):
        """(step time, tokens/s, images/s, skipped iterations) of the window; resets it. Collective (DP)."""
        from megatron.core import parallel_state

        w, s = self._window, self.schedule
        self._window = {"time": 0.0, "iters": 0, "images": 0, "skipped": 0}
        images = torch.tensor([float(w["images"])])
        torch.distributed.all_reduce(images, group=parallel_state.get_data_parallel_group())
        return (w["time"] / w["iters"], s.global_batch_size * s.seq_length * w["iters"] / w["time"],
                images.item() / w["time"], w["skipped"])

    def iteration_line(self, *, iteration, consumed, lr, losses, grad_norm, skipped_total) -> None:
        """``lr``: the learning rate, or one per parameter group ({"default": ..., "vision": ...})."""
        group_lrs = dict(lr) if isinstance(lr, dict) else {"default": lr}
        lr = group_lrs.pop("default", next(iter(group_lrs.values()), float("nan")))
        step_time, tokens_per_s, images_per_s, skipped_window = self._throughput()
        flops_per_iter = self.flops_per_iter
        if not self.is_logging_rank:
            return
        s = self.schedule
        parts = [
            f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{s.train_iters:8d}",
            f"consumed samples: {consumed:12d}",
            f"elapsed time per iteration (ms): {step_time * 1000:.1f}",
        ]
        # three lines for a 160-column terminal: progress, the optimizer's step, throughput
        step = [
            f"learning rate: {lr:.6E}",
            *(f"{name} learning rate: {v:.6E}" for name, v in group_lrs.items()),
            f"global batch size: {s.global_batch_size:5d}",
        ]
        for key in ("lm loss", "image-doc loss", "text-doc loss"):
            if key in losses and losses.get(key + " tokens", 1) > 0:
                step.append(f"{key}: {losses[key]:.6E}")
        step.append(f"grad norm: {float(grad_norm):.3f}" if grad_norm is not None else "grad norm: skipped")
        rate = [f"number of skipped iterations: {skipped_window:3d}", f"tokens/s: {tokens_per_s:.1f}",
                f"images/s: {images_per_s:.2f}"]
        values = {"lm loss": losses.get("lm loss", float("nan")), "learning-rate": lr,
                  "grad-norm": float(grad_norm) if grad_norm is not None else float("nan"),
                  "skipped-iterations": skipped_total, "tokens-per-sec": tokens_per_s,
                  "images-per-sec": images_per_s, "iteration-time": step_time, "consumed-samples": consumed}
        values.update({f"learning-rate/{name.replace('/', '-')}": v for name, v in group_lrs.items()})
        for key in ("image-doc loss", "text-doc loss"):
            if key in losses:
                values[key] = losses[key]
        if self.peak:
            tflops = flops_per_iter / step_time / self.world_size / 1e12
            rate.append(f"TFLOP/s/GPU: {tflops:.1f}")
            rate.append(f"MFU: {100 * tflops * 1e12 / self.peak:.1f}%")
            values["tflops-per-gpu"] = tflops
        print(fit_width(parts, step, rate), flush=True)
        self._record("train", iteration, values)

    def validation(self, iteration: int, name: str, losses: dict) -> None:
        if not self.is_logging_rank or not losses:
            return
        body = fit_width([f" validation loss at iteration {iteration} on {name}",
                          *(f"{k} value: {v:.6E}" for k, v in losses.items())])
        print("-" * 100 + f"\n{body}\n" + "-" * 100, flush=True)
        self._record("valid", iteration, {f"valid/{name}/{k}": v for k, v in losses.items()})

    def eval_task(self, iteration: int, name: str, metrics: dict) -> None:
        """An evaluation task's figures (--eval-tasks): one line, and ``eval/<task>/<metric>``."""
        if not self.is_logging_rank:
            return
        body = " | ".join(f"{k}: {v:.6f}" for k, v in metrics.items())
        print(f" eval task {name} at iteration {iteration} | {body} |", flush=True)
        self._record("eval", iteration, {f"eval/{name}/{k}": v for k, v in metrics.items()})

    def eval_samples(self, iteration: int, name: str, records: list[dict]) -> None:
        """An evaluation task's per-sample records (as tools/evaluate.py's samples.jsonl), in the log file."""
        if self.is_logging_rank and self.jsonl:
            self.jsonl.write(json.dumps({"kind": "eval_samples", "iteration": iteration, "task": name,
                                         "samples": records}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
