"""The option schema (sharded_rmsprop/options.py) is the one definition the rest reads: the
constructor, torch.optim.RMSprop and every kernel agree with it."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from spawn import run_ranks

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.kernels import rmsprop_cpu_fused_, rmsprop_reference_, rmsprop_triton_
from sharded_rmsprop.options import (
    FLAG_KEYS,
    IMPLIED,
    NUMBER_KEYS,
    OPTION_KEYS,
    OPTIONS,
    SETTINGS,
)


def test_each_option_is_the_constructors_and_torchs_with_the_same_default() -> None:
    ours = inspect.signature(ShardedRMSprop.__init__).parameters
    theirs = inspect.signature(torch.optim.RMSprop.__init__).parameters
    for option in OPTIONS:
        assert ours[option.name].default == option.default, option.name
        assert theirs[option.name].default == option.default, option.name
    assert set(OPTION_KEYS) == set(NUMBER_KEYS) | set(FLAG_KEYS)
    assert set(IMPLIED) <= set(OPTION_KEYS)


def test_every_kernel_takes_every_option_by_keyword() -> None:
    for kernel in (rmsprop_reference_, rmsprop_cpu_fused_, rmsprop_triton_):
        parameters = inspect.signature(kernel).parameters
        for key in OPTION_KEYS:
            assert parameters[key].kind is inspect.Parameter.KEYWORD_ONLY, (kernel, key)


def test_torchs_checks_come_in_torchs_order_with_torchs_words() -> None:
    """A value below every minimum: the first message is the one torch raises first."""
    bad = {option.name: -1.0 for option in OPTIONS if option.invalid}
    params = [torch.zeros(2, requires_grad=True)]
    for option in [o for o in OPTIONS if o.invalid]:
        for module in (ShardedRMSprop, torch.optim.RMSprop):
            try:
                module(params, **bad)
            except ValueError as error:
                assert str(error) == option.invalid.format(-1.0), (module, str(error))
        bad.pop(option.name)


def test_the_constructors_signature_is_torchs_then_the_settings() -> None:
    """The schema makes the signature: torch.optim.RMSprop's parameters in torch's order
    (positional as in torch), then the library's settings, keyword-only."""
    ours = list(inspect.signature(ShardedRMSprop).parameters.values())
    theirs = list(inspect.signature(torch.optim.RMSprop).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    assert all(p.annotation is not inspect.Parameter.empty for p in ours), "typed, for IDEs"
    rest = ours[len(theirs) :]
    assert [p.name for p in rest] == [setting.name for setting in SETTINGS]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    for setting, parameter in zip(SETTINGS, rest):
        assert parameter.default == setting.default
        assert f"{setting.name} (" in ShardedRMSprop.__doc__, setting.name
    for option in OPTIONS:
        assert f"{option.name} {option.doc.split(':')[0]}" in ShardedRMSprop.__doc__


def test_arguments_bind_as_torchs_do() -> None:
    params = [torch.zeros(2, requires_grad=True)]
    ours = ShardedRMSprop(params, 0.1, 0.9, 1e-6, 0.01, 0.5, True, maximize=True)
    theirs = torch.optim.RMSprop(params, 0.1, 0.9, 1e-6, 0.01, 0.5, True, maximize=True)
    for key in OPTION_KEYS:
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
    for call, words in (
        (lambda: ShardedRMSprop(params, 0.1, lr=0.2), "multiple values for argument 'lr'"),
        (lambda: ShardedRMSprop(params, lr_=0.2), "unexpected keyword argument 'lr_'"),
        (lambda: ShardedRMSprop(params, *range(11)), "too many positional arguments"),
        (lambda: ShardedRMSprop(params, 0.1, 0.9, 1e-6, 0, 0, False, False, None, False, False,
                                None), "too many positional arguments"),  # settings: by name
    ):  # fmt: skip
        with pytest.raises(TypeError, match=words):
            call()


def test_the_package_imports_without_docstrings() -> None:
    """``python -OO`` strips docstrings: the generated Args section must not need one."""
    done = subprocess.run(
        [sys.executable, "-OO", "-c", "import sharded_rmsprop"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def bind_on_rank(rank: int, world_size: int) -> str:
    params = [torch.zeros(4, requires_grad=True)]
    try:
        ShardedRMSprop(params, 0.1, **({"lr_": 1} if rank == 1 else {}))
    except TypeError as error:
        return str(error)
    return "built"


def test_a_call_that_fits_on_one_rank_only_is_an_error_on_every_rank() -> None:
    """The arguments are bound inside the construction's shared failure: a rank whose call
    does not fit does not leave the others waiting in the agreement."""
    theirs, mine = run_ranks(2, bind_on_rank, timeout=60)
    assert mine == "ShardedRMSprop(): got an unexpected keyword argument 'lr_'"
    assert "failed on rank 1" in theirs and mine in theirs
