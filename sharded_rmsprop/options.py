"""RMSprop's param-group options, each defined once: what the checks, the ranks' agreement,
the Join followers, the state-dict validation and the update all read.

An option is a *number* (a hyperparameter the kernels take at run time: an LR schedule never
recompiles) or a *flag* (a switch that picks the kernels' variant). ``minimum`` and
``invalid`` are torch.optim.RMSprop's check and its message; ``OPTIONS`` lists the numbers in
the order torch checks them. ``implied`` is the value a saved param group without the option
gets (torch's own older state dicts lack ``momentum``, ``centered`` and ``maximize``); an
option without one must be in every saved group.

Adding an option: an entry here; the parameter (with its docstring) in
``ShardedRMSprop.__init__``, whose signature is torch's; the keyword in the kernels
(``kernels/reference.py``, ``cpu_fused.py`` with its C++ loop, ``triton_rmsprop.py``), which
the kernel call passes every option to; a buffer it needs in ``shards.py``'s
``state_keys_for``; the README. The checks, the ranks' agreement, Join and the state-dict
validation follow from the entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FLAG_KEYS", "IMPLIED", "NUMBER_KEYS", "OPTIONS", "OPTION_KEYS", "Option"]

_UNSET = object()


@dataclass(frozen=True)
class Option:
    name: str
    default: Any  # the constructor's default
    kind: str  # "number" or "flag"
    invalid: str = ""  # torch's message for a value below ``minimum``, "" for no check
    minimum: float = 0.0
    implied: Any = _UNSET  # what a saved group without it holds

    @property
    def has_implied(self) -> bool:
        return self.implied is not _UNSET


OPTIONS: tuple[Option, ...] = (
    Option("lr", 1e-2, "number", "Invalid learning rate: {}"),
    Option("eps", 1e-8, "number", "Invalid epsilon value: {}"),
    Option("momentum", 0, "number", "Invalid momentum value: {}", implied=0),
    Option("weight_decay", 0, "number", "Invalid weight_decay value: {}"),
    Option("alpha", 0.99, "number", "Invalid alpha value: {}"),
    Option("centered", False, "flag", implied=False),
    Option("maximize", False, "flag", implied=False),
)

#: Every option's name, in :data:`OPTIONS`' order (the order the ranks compare them in).
OPTION_KEYS: tuple[str, ...] = tuple(option.name for option in OPTIONS)
NUMBER_KEYS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.kind == "number")
FLAG_KEYS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.kind == "flag")
#: What a saved param group lacking an option holds for it.
IMPLIED: dict[str, Any] = {o.name: o.implied for o in OPTIONS if o.has_implied}
