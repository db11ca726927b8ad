"""RMSprop's param-group options, each defined once: what the constructor, the checks, the
ranks' agreement, the Join followers, the state-dict validation and the update all read.

An option is a *number* (a hyperparameter the kernels take at run time: an LR schedule never
recompiles) or a *flag* (a switch that picks the kernels' variant). ``minimum`` and
``invalid`` are torch.optim.RMSprop's check and its message; :data:`OPTIONS` lists the options
in the order torch checks them. ``implied`` is the value a saved param group without the
option gets (torch's own older state dicts lack ``momentum``, ``centered`` and ``maximize``);
an option without one must be in every saved group. ``doc`` is its entry in the constructor's
docstring.

The constructor's signature is torch.optim.RMSprop's (:data:`TORCH_POSITIONAL`, with torch's
implementation switches, :data:`TORCH_SWITCHES`), then any option torch lacks (none yet),
keyword-only, then the library's own settings: :func:`bind` reads the options from its arguments and
:func:`signature` shows them. Adding an option is an entry here and the kernels' keyword
(``docs/architecture.md`` has the recipe).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from .comm import PARAM_SYNCS

__all__ = [
    "FLAG_KEYS",
    "IMPLIED",
    "NUMBER_KEYS",
    "OPTIONS",
    "OPTION_KEYS",
    "SETTINGS",
    "TORCH_POSITIONAL",
    "TORCH_SWITCHES",
    "Option",
    "Setting",
    "bind",
    "documented",
    "signature",
]

_UNSET = object()


@dataclass(frozen=True)
class Option:
    name: str
    default: Any  # the constructor's default
    kind: str  # "number" or "flag" (or "switch": torch's implementation switches)
    doc: str  # for the constructor's docstring: "(type, optional): what it does"
    invalid: str = ""  # torch's message for a value below ``minimum``, "" for no check
    minimum: float = 0.0
    implied: Any = _UNSET  # what a saved group without it holds

    @property
    def has_implied(self) -> bool:
        return self.implied is not _UNSET


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    kind: str  # "flag", "optional flag", "choice" or "any" (see SETTINGS)
    doc: str
    choices: tuple[str, ...] = ()


OPTIONS: tuple[Option, ...] = (
    Option("lr", 1e-2, "number", "(float, Tensor, optional): learning rate",
           "Invalid learning rate: {}"),
    Option("eps", 1e-8, "number", "(float, optional): term added to the denominator to "
           "improve numerical stability", "Invalid epsilon value: {}"),
    Option("momentum", 0, "number", "(float, optional): momentum factor",
           "Invalid momentum value: {}", implied=0),
    Option("weight_decay", 0, "number", "(float, optional): weight decay (L2 penalty)",
           "Invalid weight_decay value: {}"),
    Option("alpha", 0.99, "number", "(float, optional): smoothing constant",
           "Invalid alpha value: {}"),
    Option("centered", False, "flag", "(bool, optional): if ``True``, compute the centered "
           "RMSProp, the gradient is normalized by an estimation of its variance",
           implied=False),
    Option("maximize", False, "flag", "(bool, optional): maximize the objective with respect "
           "to the params, instead of minimizing", implied=False),
)  # fmt: skip

#: torch.optim.RMSprop's implementation switches: taken, checked, and written into the
#: param groups as torch writes them (``arguments.check_torch_implementation``).
TORCH_SWITCHES: tuple[Option, ...] = (
    Option("capturable", False, "switch", "(bool, optional): only False (no CUDA graphs)"),
    Option("foreach", None, "switch", "(bool, optional): accepted; changes nothing"),
    Option("differentiable", False, "switch", "(bool, optional): only False"),
)

#: The library's own settings, keyword-only, the same on every rank (compared at
#: construction). ``kind`` says what ``arguments.checked_settings`` accepts: "flag" (True or
#: False), "optional flag" (None too), "choice" (one of ``choices``), "any" (checked where
#: it is used: the process group when it is resolved, ``bucket_numel`` when buckets are
#: planned).
SETTINGS: tuple[Setting, ...] = (
    Setting("process_group", None, "any", "(ProcessGroup, optional): the data-parallel ranks "
            "that share the state; the default group if ``None``; a single process when "
            "``torch.distributed`` is not initialized"),
    Setting("fused", None, "optional flag", "(bool, optional): ``None`` picks the fastest "
            "update available for the parameters' device, ``False`` forces the reference "
            "update (bit for bit :class:`torch.optim.RMSprop`), ``True`` requires a fused "
            "kernel"),
    Setting("master_weights", None, "optional flag", "(bool, optional): keep a float32 copy "
            "of this rank's shard of the bfloat16 and float16 parameters, run their update in "
            "float32 on it, and write the rounded result into the parameters; ``None`` means "
            "``True``"),
    Setting("skip_nonfinite", False, "flag", "(bool, optional): skip, on every rank, a step "
            "whose gradients hold an inf or a NaN on any rank (each rank reads all of its "
            "gradients, as ``GradScaler`` does); :attr:`skipped_steps` counts them"),
    Setting("host_shared", False, "flag", "(bool, optional): where all ranks run on one host, "
            "keep one copy of each CPU flat buffer in shared memory that every rank maps: the "
            "sync becomes a barrier, and a write to a parameter by one rank is seen by all "
            "(an in-place change that every rank makes is made once per rank: make it on one; "
            "``docs/communication.md``); where it cannot be had, private buffers and a warning"),
    Setting("bucket_numel", None, "any", "(int, optional): lay parameters of one dtype and "
            "device out in consecutive flat buffers of at most this many elements, each "
            "sharded on its own, so that each one's sync overlaps the next one's update; "
            "``None``: one buffer"),
    Setting("param_sync", "auto", "choice", "(str, optional): the collective that brings the "
            "other ranks' updated shards of private buffers: ``\"all_gather\"``, "
            "``\"broadcast\"`` (one per rank), or ``\"auto\"``, the one measured fastest "
            "for the backend (broadcasts on gloo)", choices=PARAM_SYNCS),
)  # fmt: skip

#: torch.optim.RMSprop's positional parameters after ``params``, in its order.
TORCH_POSITIONAL: tuple[str, ...] = (
    "lr", "alpha", "eps", "weight_decay", "momentum", "centered", "capturable", "foreach",
    "maximize", "differentiable",
)  # fmt: skip

#: Every option's name, in :data:`OPTIONS`' order (the order the ranks compare them in).
OPTION_KEYS: tuple[str, ...] = tuple(option.name for option in OPTIONS)
NUMBER_KEYS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.kind == "number")
FLAG_KEYS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.kind == "flag")
#: What a saved param group lacking an option holds for it.
IMPLIED: dict[str, Any] = {o.name: o.implied for o in OPTIONS if o.has_implied}

_BY_NAME: dict[str, Option | Setting] = {o.name: o for o in OPTIONS + TORCH_SWITCHES + SETTINGS}


def _annotation(entry: Option | Setting) -> str:
    """The type its doc names, as an annotation: "(float, Tensor, optional)" is
    ``float | Tensor | None`` where its default is None, else ``float | Tensor``."""
    kinds = [kind.strip() for kind in entry.doc[1 : entry.doc.index(")")].split(",")]
    kinds = [kind for kind in kinds if kind != "optional"]
    return " | ".join(kinds + (["None"] if entry.default is None else []))


def _parameters() -> list[inspect.Parameter]:
    """The constructor's parameters after ``params``: torch's, then the keyword-only options
    torch lacks, then the settings."""
    positional = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=_BY_NAME[name].default,
            annotation=_annotation(_BY_NAME[name]),
        )
        for name in TORCH_POSITIONAL
    ]
    keyword = [
        inspect.Parameter(
            o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=_annotation(o)
        )
        for o in (*OPTIONS, *SETTINGS)
        if o.name not in TORCH_POSITIONAL
    ]
    return positional + keyword


_BINDING = inspect.Signature(_parameters())


def bind(
    args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The options, torch's switches and the settings that the constructor's ``*args`` and
    ``**kwargs`` give, defaults filled in (``TypeError`` as Python words it for a call that
    does not fit)."""
    try:
        bound = _BINDING.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"ShardedRMSprop(): {error}") from None
    bound.apply_defaults()
    values = bound.arguments
    return tuple(  # type: ignore[return-value]
        {entry.name: values[entry.name] for entry in entries}
        for entries in (OPTIONS, TORCH_SWITCHES, SETTINGS)
    )


def signature(init: Callable[..., None]) -> inspect.Signature:
    """``init(self, params, *args, **kwargs)``'s signature, as the schema defines its
    arguments."""
    first = list(inspect.signature(init).parameters.values())[:2]
    return inspect.Signature(first + _parameters())


def documented(indent: str) -> str:
    """Every argument's entry for the constructor's ``Args:``, in signature order."""
    names = [parameter.name for parameter in _parameters()]
    entries = [
        f"{name} {_BY_NAME[name].doc} (default: {_BY_NAME[name].default!r})" for name in names
    ]
    return "\n".join(
        textwrap.fill(entry, 92, initial_indent=indent, subsequent_indent=indent + "    ")
        for entry in entries
    )
