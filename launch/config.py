"""The job's configuration: every field a ``--kebab-case`` flag of ``launch/train.py``.

Grouped as a run is described: the model, the data, the optimizer and its schedule, the run
(launch, logging) and checkpoints. Fault injection for the restart tests is not here: see
``faults.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Config", "build_parser", "parse_config"]


@dataclass
class Config:
    """Everything the job can be told; each field is a ``--kebab-case`` flag."""

    # model
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=128, metadata={"help": "model width (a multiple of --n-head)"})
    block_size: int = field(default=64, metadata={"help": "context length in characters"})
    dtype: str = field(
        default="float32",
        metadata={"help": "parameter dtype; 16-bit ones train with float32 master weights",
                  "choices": ("float32", "bfloat16", "float16")},
    )
    # data
    corpus: str | None = field(
        default=None, metadata={"help": "UTF-8 text file to train on (default: pydoc_data.topics)"}
    )
    val_fraction: float = field(default=0.1, metadata={"help": "share of the text held out"})
    batch_size: int = field(default=32, metadata={"help": "sequences per rank per step"})
    eval_windows: int = field(
        default=256, metadata={"help": "validation windows (spread over the ranks)"}
    )
    eval_every: int = field(
        default=100, metadata={"help": "validation loss every N steps (0: start and end only)"}
    )
    # optimizer and schedule
    max_steps: int = field(default=300, metadata={"help": "optimizer steps in all"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=60, metadata={"help": "linear warm-up steps"})
    final_lr_ratio: float = field(
        default=0.1, metadata={"help": "cosine decay down to this fraction of --lr"}
    )
    alpha: float = field(default=0.99, metadata={"help": "RMSprop smoothing constant"})
    eps: float = field(default=1e-8, metadata={"help": "RMSprop epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "RMSprop L2 penalty"})
    momentum: float = field(default=0.0, metadata={"help": "RMSprop momentum factor"})
    centered: bool = field(default=False, metadata={"help": "centered RMSprop"})
    fused: str = field(
        default="auto",
        metadata={"help": "fused update kernel", "choices": ("auto", "on", "off")},
    )
    master_weights: bool = field(
        default=True,
        metadata={"help": "float32 master weights for 16-bit parameters (no: update in 16 bits)"},
    )
    bucket_numel: int = field(
        default=0,
        metadata={"help": "parameter elements per flat buffer, each synced while the next is "
                  "updated (0: one buffer per dtype)"},
    )
    grad_sync: str = field(
        default="all-reduce",
        metadata={"help": "how the gradients are averaged: DDP's own all-reduce, or "
                  "reduce-scattered into the optimizer's shards by DDP's communication hook "
                  "(with the parameter sync, two thirds of the bytes; as fast here; keeps "
                  "staging buffers of about the parameters' size, twice that on gloo)",
                  "choices": ("all-reduce", "reduce-scatter")},
    )
    param_sync: str = field(
        default="auto",
        metadata={"help": "the collective that brings the other ranks' updated shards (auto: "
                  "broadcasts on gloo, the all-gather on NCCL)",
                  "choices": ("auto", "all-gather", "broadcast")},
    )
    overlap_param_sync: bool = field(
        default=False,
        metadata={"help": "leave the parameter sync running after each step until the next "
                  "forward needs each parameter (opt.overlap_param_sync)"},
    )
    host_shared: bool = field(
        default=False,
        metadata={"help": "ranks of one host map one copy of the flat buffers: the parameter "
                  "sync becomes a barrier (one host only; falls back with a warning)"},
    )
    clip_grad_norm: float = field(
        default=1.0,
        metadata={"help": "clip the gradients to this global norm (0: off)",
                  "aliases": ("--grad-clip",)},
    )
    skip_nonfinite: bool = field(
        default=False, metadata={"help": "skip steps whose gradients hold inf or NaN"}
    )
    seed: int = field(
        default=0, metadata={"help": "init seed; batches come from (seed, rank, step)"}
    )
    # run
    backend: str | None = field(
        default=None,
        metadata={"help": "default: nccl with CUDA, else gloo", "choices": ("gloo", "nccl")},
    )
    init_timeout: float = field(
        default=120.0, metadata={"help": "seconds to wait for the other ranks"}
    )
    threads: int = field(default=1, metadata={"help": "torch CPU threads per rank (0: torch's)"})
    log_every: int = field(default=10, metadata={"help": "log a progress line every N steps"})
    plot: str | None = field(default=None, metadata={"help": "write the loss curve to this PNG"})
    # checkpoints
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "write sharded checkpoints into this directory"}
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest checkpoint in --checkpoint-dir"}
    )
    save_final: str | None = field(
        default=None, metadata={"help": "rank 0 writes the trained parameters to this file"}
    )


# ---------------------------------------------------------------------------------------------
# Command line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(hint: Any) -> Any:
    """``int`` for ``int``, ``str`` for ``str | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a character-level GPT with DDP and ShardedRMSprop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = _value_type(hints[f.name])
        if kind is bool:
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                help=f.metadata["help"],
            )
        else:
            parser.add_argument(
                _flag(f.name), *f.metadata.get("aliases", ()), type=kind, default=f.default,
                help=f.metadata["help"], choices=f.metadata.get("choices"),
            )
    return parser


def _problems(config: Config) -> list[str]:
    """What is wrong with ``config``, as messages naming the flags."""
    problems = []
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_windows",
                 "max_steps", "log_every"):
        if getattr(config, name) < 1:
            problems.append(f"{_flag(name)} must be at least 1, got {getattr(config, name)}")
    for name in ("warmup_steps", "eval_every", "threads", "checkpoint_every"):
        if getattr(config, name) < 0:
            problems.append(f"{_flag(name)} must be at least 0, got {getattr(config, name)}")
    for name in ("lr", "eps", "weight_decay", "momentum", "clip_grad_norm"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"{_flag(name)} must be a finite number >= 0, got {value}")
    for name in ("alpha", "final_lr_ratio"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            problems.append(f"{_flag(name)} must be in [0, 1], got {getattr(config, name)}")
    if not 0.0 < config.val_fraction < 1.0:
        problems.append(f"--val-fraction must be in (0, 1), got {config.val_fraction}")
    if config.n_head >= 1 and config.n_embd % config.n_head:
        problems.append(f"--n-embd {config.n_embd} is not a multiple of --n-head {config.n_head}")
    if not (math.isfinite(config.init_timeout) and config.init_timeout > 0):
        problems.append(f"--init-timeout must be a positive number, got {config.init_timeout}")
    if config.resume and config.checkpoint_dir is None:
        problems.append("--resume needs --checkpoint-dir")
    return problems


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """The config from the command line; usage errors exit with status 2, as argparse does."""
    parser = build_parser()
    config = Config(**vars(parser.parse_args(argv)))
    problems = _problems(config)
    if problems:
        parser.error("; ".join(problems))
    return config
