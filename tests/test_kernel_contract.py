"""The kernel contract (``sharded_rmsprop.kernels.contract``): one signature, one validator.

Every kernel has :class:`UpdateFn`'s signature, and one table of bad calls gets the same
exception from each of them (the same message, but for the rules a kernel declares). The
validator runs before a kernel looks for its machinery, so the fused kernels' checks run
here even where the CPU kernel cannot be built or triton is not installed. What the kernels
may differ in (the dtypes and layouts a fused kernel takes) is their declared
:class:`KernelRules`, tested at the end.
"""

from __future__ import annotations

import inspect
from typing import Callable

import pytest
import torch
from torch import Tensor

from sharded_rmsprop.kernels import (
    UpdateFn,
    rmsprop_cpu_fused_,
    rmsprop_reference_,
    rmsprop_triton_,
)
from sharded_rmsprop.kernels.cpu_fused import cpu_fused_available
from sharded_rmsprop.kernels.triton_rmsprop import triton_available

KERNELS: dict[str, UpdateFn] = {
    "reference": rmsprop_reference_,
    "cpu_fused": rmsprop_cpu_fused_,
    "triton": rmsprop_triton_,
}
FUSED = ("cpu_fused", "triton")
NAMES = ("param", "grad", "square_avg", "momentum_buffer", "grad_avg")
N = 10
HP = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.1, momentum=0.9, centered=True,
          maximize=False)  # fmt: skip


def test_every_kernel_has_the_signature_of_update_fn() -> None:
    want = list(inspect.signature(UpdateFn.__call__).parameters.values())[1:]  # without self
    for name, kernel in KERNELS.items():
        got = list(inspect.signature(kernel).parameters.values())
        assert got == want, name


def _tensors(dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random tensors, with square_avg > grad_avg**2 (no square root of a negative)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.rand(N, generator=gen) + 0.5).to(dtype) for k in NAMES}
    tensors["grad_avg"] *= 0.1
    return tensors


def _views_of_one_buffer() -> dict[str, Tensor]:
    base = torch.rand(N + 1) + 0.5
    return {"square_avg": base[:N], "grad_avg": base[1:]}


def _bf16(n: int = N, **kwargs) -> Tensor:
    return torch.zeros(n, dtype=torch.bfloat16, **kwargs)


#: A case: (tensors to replace, other keyword arguments, error, message). The tensors start
#: as float32 1-D contiguous CPU tensors of N elements, with momentum and centered on: a call
#: every kernel accepts (test_the_table_starts_from_a_good_call) but for the case's one fault.
#: Each replacement is a function of the tensors, so a case can point into them.
Case = tuple[Callable[[dict], dict], Callable[[dict], dict], type, str]


def _none(_: dict) -> dict:
    return {}


BAD: dict[str, Case] = {
    # The state the options need, and only that state: the kernels used to disagree here.
    "momentum-without-buffer": (lambda t: {"momentum_buffer": None}, _none, ValueError,
                                "momentum_buffer is required when momentum > 0"),
    "buffer-without-momentum": (_none, lambda t: {"momentum": 0.0}, ValueError,
                                "momentum_buffer must be None when momentum <= 0"),
    "centered-without-grad_avg": (lambda t: {"grad_avg": None}, _none, ValueError,
                                  "grad_avg is required when centered=True"),
    "grad_avg-without-centered": (_none, lambda t: {"centered": False}, ValueError,
                                  "grad_avg must be None when centered=False"),
    # Tensors.
    "grad-not-a-tensor": (lambda t: {"grad": [0.0] * N}, _none, TypeError,
                          "grad must be a Tensor, got list"),
    "int32-param": (lambda t: {k: v.to(torch.int32) for k, v in t.items()}, _none, TypeError,
                    "supports .* parameters, got torch.int32"),
    "mixed-dtype": (lambda t: {"square_avg": t["square_avg"].double()}, _none, TypeError,
                    "square_avg has dtype torch.float64, expected the param's torch.float32"),
    "other-device": (lambda t: {"grad": torch.zeros(N, device="meta")}, _none, ValueError,
                     "grad is on meta but param is on cpu"),
    "short-grad": (lambda t: {"grad": t["grad"][1:]}, _none, ValueError,
                   r"grad has shape \(9,\), expected "),
    "sparse-grad": (lambda t: {"grad": t["grad"].to_sparse()}, _none, ValueError,
                    "grad must be a dense"),
    "grad-is-param": (lambda t: {"grad": t["param"]}, _none, ValueError,
                      "param and grad overlap in memory"),
    "state-overlaps": (lambda t: _views_of_one_buffer(), _none, ValueError,
                       "square_avg and grad_avg overlap in memory"),
    # The rounded copy of float32 master weights.
    "copy-not-a-tensor": (_none, lambda t: {"low_precision_param": [0.0] * N}, TypeError,
                          "low_precision_param must be a Tensor, got list"),
    "copy-float32": (_none, lambda t: {"low_precision_param": torch.zeros(N)}, TypeError,
                     "low_precision_param has dtype torch.float32, expected torch.bfloat16 or "
                     "torch.float16"),
    "copy-of-bf16-param": (lambda t: {k: v.bfloat16() for k, v in t.items()},
                           lambda t: {"low_precision_param": _bf16()}, TypeError,
                           "low_precision_param needs float32 master weights"),
    "copy-short": (_none, lambda t: {"low_precision_param": _bf16(N - 1)}, ValueError,
                   r"low_precision_param has shape \(9,\), expected "),
    "copy-other-device": (_none, lambda t: {"low_precision_param": _bf16(device="meta")},
                          ValueError, "low_precision_param is on meta but param is on cpu"),
    "copy-in-param": (_none, lambda t: {"low_precision_param": t["param"].view(torch.bfloat16)[:N]},
                      ValueError, "param and low_precision_param overlap in memory"),
    # The gradient's factor.
    "scale-1-d": (_none, lambda t: {"grad_scale": torch.ones(1)}, ValueError,
                  r"grad_scale must be a 0-d tensor, got shape \(1,\)"),
    "scale-int32": (_none, lambda t: {"grad_scale": torch.tensor(2, dtype=torch.int32)},
                    TypeError, "grad_scale must be a .* tensor, got dtype torch.int32"),
    "scale-other-device": (_none, lambda t: {"grad_scale": torch.tensor(0.5, device="meta")},
                           ValueError, "grad_scale is on meta but param is on cpu"),
    "scale-str": (_none, lambda t: {"grad_scale": "0.5"}, TypeError,
                  "grad_scale must be a number, a 0-d tensor or None, got str"),
    "scale-bool": (_none, lambda t: {"grad_scale": True}, TypeError,
                   "grad_scale must be a number, a 0-d tensor or None, got bool"),
    "scale-in-square_avg": (_none, lambda t: {"grad_scale": t["square_avg"][3]}, ValueError,
                            "square_avg and grad_scale overlap in memory"),
    "scale-in-grad": (_none, lambda t: {"grad_scale": t["grad"][0]}, ValueError,
                      "grad and grad_scale overlap in memory"),
}  # fmt: skip


def _snapshot(tensors: list) -> list[tuple[Tensor, Tensor]]:
    """(tensor, a copy of its bytes) for the CPU tensors among ``tensors``."""
    return [
        (t, t.contiguous().view(-1).view(torch.uint8).clone())
        for t in tensors
        if isinstance(t, Tensor) and t.device.type == "cpu" and t.layout == torch.strided
    ]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", list(BAD))
def test_one_answer_to_every_bad_call(kernel: str, case: str) -> None:
    replace, extra, error, match = BAD[case]
    tensors = _tensors()
    tensors.update(replace(tensors))
    options = {**HP, **extra(tensors)}
    touched = _snapshot([*tensors.values(), *options.values()])
    with pytest.raises(error, match=match):
        KERNELS[kernel](*(tensors[k] for k in NAMES), **options)
    for t, before in touched:
        assert torch.equal(t.contiguous().view(-1).view(torch.uint8), before), "written"


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_the_table_starts_from_a_good_call(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's starting point, with a copy and a scale, runs where the kernel can run.

    (A float16 copy: Triton's interpreter truncates to bfloat16, see test_kernel_triton.py.)
    """
    if kernel == "cpu_fused" and not cpu_fused_available():
        pytest.skip("no fused CPU kernel here")
    if kernel == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if not triton_available(torch.device("cpu")):
            pytest.skip("triton is not installed")
    tensors = _tensors()
    copy = torch.zeros(N, dtype=torch.float16)
    param = tensors["param"].clone()
    KERNELS[kernel](*(tensors[k] for k in NAMES), **HP, grad_scale=torch.tensor(0.5),
                    low_precision_param=copy)  # fmt: skip
    assert not torch.equal(tensors["param"], param)
    assert torch.equal(copy, tensors["param"].half())


#: What torch's RMSprop takes and only the reference does: (tensors, options, the fused
#: kernels' error). The fused kernels declare it in their KernelRules (dtypes, flat, a
#: float32 scale); the validator is still the same one.
REFERENCE_ONLY: dict[str, tuple[Callable[[], dict], dict, type]] = {
    "complex64": (lambda: _tensors(torch.complex64), {}, TypeError),
    "2-d": (lambda: {k: v.view(2, N // 2) for k, v in _tensors().items()}, {}, ValueError),
    "strided": (lambda: {k: torch.stack([v, v], 1)[:, 0] for k, v in _tensors().items()}, {},
                ValueError),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFERENCE_ONLY))
def test_what_only_the_reference_takes(case: str) -> None:
    make, options, error = REFERENCE_ONLY[case]
    rmsprop_reference_(*(make()[k] for k in NAMES), **HP, **options)
    for kernel in FUSED:
        tensors = make()
        with pytest.raises(error):
            KERNELS[kernel](*(tensors[k] for k in NAMES), **HP, **options)


def test_float64_is_the_cpu_kernels_and_not_tritons() -> None:
    """The CPU kernel computes float64 shards (in float64); Triton's refuses them."""
    tensors = _tensors(torch.float64)
    rmsprop_reference_(*(tensors[k] for k in NAMES), **HP)
    if cpu_fused_available():
        KERNELS["cpu_fused"](*(_tensors(torch.float64)[k] for k in NAMES), **HP)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16 parameters, got "
                                        "torch.float64"):
        KERNELS["triton"](*(_tensors(torch.float64)[k] for k in NAMES), **HP)


def test_a_float64_scale_is_the_cpu_kernels_and_not_tritons() -> None:
    """A float64 model's clipping factor is float64: the CPU kernel rounds it to its compute
    type as torch's grad.mul_(scale) does (bit for bit the reference); Triton's refuses it."""
    scale = torch.tensor(0.3, dtype=torch.float64)
    if cpu_fused_available():
        for dtype in (torch.float32, torch.float64):
            ours, theirs = _tensors(dtype), _tensors(dtype)
            KERNELS["cpu_fused"](*(ours[k] for k in NAMES), **HP, grad_scale=scale)
            theirs["grad"].mul_(scale)
            rmsprop_reference_(*(theirs[k] for k in NAMES), **HP)
            torch.testing.assert_close(ours["param"], theirs["param"])
    with pytest.raises(TypeError, match="grad_scale must be a float32 tensor, got dtype "
                                        "torch.float64"):
        KERNELS["triton"](*(_tensors()[k] for k in NAMES), **HP, grad_scale=scale)


def test_unsupported_device_is_not_an_argument_error() -> None:
    """Valid arguments on a device a fused kernel does not run on: RuntimeError (as for a
    kernel that is not there), after the validator; the reference runs torch's meta ops."""
    tensors = {k: torch.zeros(N, device="meta") for k in NAMES}
    rmsprop_reference_(*(tensors[k] for k in NAMES), **HP)
    for kernel in FUSED:
        with pytest.raises(RuntimeError):
            KERNELS[kernel](*(tensors[k] for k in NAMES), **HP)
