"""What the benchmarks optimize: ``bench_step.py``'s parameter sets and ``bench_training.py``'s
models and data.

- :func:`build_set` (:data:`SETS`): the parameters of one optimizer step, as a module whose
  forward nothing runs: ``wide``, 24 x Linear(1024, 1024); ``many-small``, 400 x
  Linear(256, 256) (``small``, 4 of them, is the GPU check's rehearsal on a CPU, in no
  table); ``gpt2``, GPT-2-shaped (a 50257x384 token embedding, a 1024x384 position
  embedding, six pre-LayerNorm blocks, a final LayerNorm and an untied 50257x384 head).
- :func:`build_model` (:data:`MODELS`), :func:`batch_for` and :func:`loss_of`: a model that
  trains, this rank's batch of an iteration (on a device, if given), and its loss: ``gpt``,
  ``launch/gpt.py``'s GPT (:data:`GPT_SHAPE`), or the Linears of ``wide`` / ``many-small``
  (or ``small``) in sequence (:class:`Chain`).

The launch folder goes on ``sys.path`` here, so that ``gpt`` imports as the scripts do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "launch"))

# -- parameter sets (bench_step.py) --------------------------------------------------------------

SETS = ("wide", "many-small", "gpt2")


class _Block(nn.Module):
    """A GPT-2 block's parameters (pre-LayerNorm attention and 4x MLP)."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)


class _GPT2Shaped(nn.Module):
    def __init__(
        self, vocab: int = 50257, block_size: int = 1024, n_layer: int = 6, n_embd: int = 384
    ):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(_Block(n_embd) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)


def build_set(name: str) -> nn.Module:
    """The parameter set ``name`` as a module (on the CPU; nothing runs its forward)."""
    if name == "wide":
        return nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(24)))
    if name == "many-small":
        return nn.Sequential(*(nn.Linear(256, 256) for _ in range(400)))
    if name == "small":  # the GPU check's rehearsal on a CPU (in no table)
        return nn.Sequential(*(nn.Linear(256, 256) for _ in range(4)))
    if name == "gpt2":
        return _GPT2Shaped()
    raise ValueError(f"unknown parameter set {name!r}; choose from {SETS}")


def describe_set(name: str) -> dict:
    module = build_set(name)
    shapes = [tuple(p.shape) for p in module.parameters()]
    return dict(params=len(shapes), numel=sum(p.numel() for p in module.parameters()))


def set_numels(name: str) -> list[int]:
    """The number of elements of each tensor of the parameter set ``name``, in order."""
    return [p.numel() for p in build_set(name).parameters()]


# -- models and data (bench_training.py) ---------------------------------------------------------

MODELS = ("gpt", "wide", "many-small")
GPT_SHAPE = dict(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=256)
GPT_BATCH = 16
LINEAR_BATCH = 8


class Chain(nn.Module):
    """The Linears of a ``bench_step`` parameter set, applied in sequence."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for every contender and rank
    if name == "gpt":
        from gpt import GPT, GPTConfig

        return GPT(GPTConfig(**GPT_SHAPE))
    if name in ("wide", "many-small", "small"):
        return Chain(build_set(name))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def micro_batch(name: str) -> int:
    """The sequences (``gpt``) or rows (the Linears) of one rank's batch."""
    return GPT_BATCH if name == "gpt" else LINEAR_BATCH


def batch_for(
    name: str, rank: int, step: int, device: torch.device | None = None
) -> tuple[torch.Tensor, ...]:
    """This rank's batch of iteration ``step`` (different on every rank), on ``device`` (the
    CPU if None: it is drawn there either way)."""
    gen = torch.Generator().manual_seed(1_000_003 * step + 7919 * rank + 17)
    if name == "gpt":
        shape = (GPT_BATCH, GPT_SHAPE["block_size"])
        idx = torch.randint(0, GPT_SHAPE["vocab_size"], shape, generator=gen)
        targets = torch.randint(0, GPT_SHAPE["vocab_size"], shape, generator=gen)
        return idx.to(device), targets.to(device)
    width = 1024 if name == "wide" else 256
    return (torch.randn(LINEAR_BATCH, width, generator=gen).to(device),)


def loss_of(model: nn.Module, name: str, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if name == "gpt":
        return model(*batch)
    return model(*batch).square().mean()
