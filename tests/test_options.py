"""The option schema (sharded_rmsprop/options.py) is the one definition the rest reads: the
constructor, torch.optim.RMSprop and every kernel agree with it."""

from __future__ import annotations

import inspect

import torch

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.kernels import rmsprop_cpu_fused_, rmsprop_reference_, rmsprop_triton_
from sharded_rmsprop.options import FLAG_KEYS, IMPLIED, NUMBER_KEYS, OPTION_KEYS, OPTIONS


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
