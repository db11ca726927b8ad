"""Bad input: torch's errors where torch has them, raised on every rank, nothing modified."""

from __future__ import annotations

import pytest
import torch

from sharded_rmsprop import ShardedRMSprop
from spawn import run_ranks


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lr": -1e-2}, "Invalid learning rate: -0.01"),
        ({"eps": -1.0}, "Invalid epsilon value: -1.0"),
        ({"momentum": -0.5}, "Invalid momentum value: -0.5"),
        ({"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
        ({"alpha": -0.9}, "Invalid alpha value: -0.9"),
        ({"lr": torch.tensor([1e-2, 1e-3])}, "Tensor lr must be 1-element"),
    ],
)
def test_invalid_hyperparameters_raise_torchs_value_error(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        ShardedRMSprop([torch.zeros(3, requires_grad=True)], **options)
    with pytest.raises(ValueError, match=message):  # the same as torch says it
        torch.optim.RMSprop([torch.zeros(3, requires_grad=True)], **options)


@pytest.mark.parametrize("switch", ["capturable", "differentiable"])
def test_torchs_capturable_and_differentiable_are_refused_when_on(switch: str) -> None:
    with pytest.raises(ValueError, match=f"does not support {switch}=True"):
        ShardedRMSprop([torch.zeros(3, requires_grad=True)], **{switch: True})
    ShardedRMSprop([torch.zeros(3, requires_grad=True)], **{switch: False})  # torch's default


@pytest.mark.parametrize("foreach", [None, True, False])
def test_torchs_foreach_is_accepted_and_changes_nothing(foreach) -> None:
    """torch's implementation switch: kept in the param groups as torch keeps it."""
    ours, theirs = (torch.ones(5, requires_grad=True) for _ in range(2))
    opt = ShardedRMSprop([ours], foreach=foreach, fused=False)
    ref = torch.optim.RMSprop([theirs], foreach=foreach)
    for p, o in ((ours, opt), (theirs, ref)):
        p.grad = torch.arange(5.0)
        o.step()
    assert torch.equal(ours, theirs) and opt.param_groups[0]["foreach"] is foreach
    with pytest.raises(TypeError, match="foreach must be None, True or False"):
        ShardedRMSprop([torch.zeros(3, requires_grad=True)], foreach="yes")


def test_bare_tensor_as_params_is_a_type_error() -> None:
    with pytest.raises(
        TypeError, match="params argument given to the optimizer should be an iterable"
    ):
        ShardedRMSprop(torch.zeros(3, requires_grad=True))


def test_empty_parameter_list_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        ShardedRMSprop([])


def test_integer_parameters_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="floating-point or complex parameters.*torch.int64"):
        ShardedRMSprop([torch.zeros(3, dtype=torch.int64)])


def test_parameters_that_overlap_themselves_are_a_value_error() -> None:
    """An expanded view reaches elements more than once: it has no layout of its own to keep
    (any dense or strided one is laid out: tests/test_memory_layouts.py)."""
    expanded = torch.nn.Parameter(torch.randn(3, 1).expand(3, 4))
    with pytest.raises(ValueError, match=r"strides \(1, 0\)\) reaches some of its elements more "
                                         r"than once, e.g. an expanded view"):
        ShardedRMSprop([expanded])
    opt = ShardedRMSprop([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [expanded]})
    assert len(opt.param_groups) == 1


def test_duplicate_parameter_is_a_value_error() -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="same parameter twice"):
        ShardedRMSprop([p, p])


def test_fused_true_without_a_kernel_is_a_clear_error() -> None:
    complex64 = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(
        RuntimeError,
        match=r"`fused=True` requires all the params to be floating point Tensors of supported "
        r"devices: \[.cpu., .cuda.\] but torch.complex64 and cpu \(the CPU kernel takes.*not "
        r"torch.complex64\); pass fused=None or False",
    ):
        ShardedRMSprop([complex64], fused=True)
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        ShardedRMSprop([torch.zeros(3, requires_grad=True)], fused="yes")


def test_process_group_without_torch_distributed_is_a_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ShardedRMSprop([torch.zeros(3, requires_grad=True)], process_group=object())


def test_add_param_group_rejects_a_parameter_already_present() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = ShardedRMSprop([p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_is_a_runtime_error_and_changes_nothing() -> None:
    dense, sparse_param = torch.randn(4, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    opt = ShardedRMSprop([dense, sparse_param], momentum=0.9)
    dense.grad = torch.ones(4)
    sparse_param.grad = torch.eye(5, 2).to_sparse()
    before = [dense.detach().clone(), sparse_param.detach().clone()]
    with pytest.raises(RuntimeError, match="RMSprop does not support sparse gradients"):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(sparse_param, before[1])
    assert len(opt.state) == 0


def test_gradient_of_the_wrong_shape_is_a_runtime_error() -> None:
    p = torch.randn(4, requires_grad=True)
    opt = ShardedRMSprop([p])
    p.grad = torch.ones(4)
    p.grad.data = torch.ones(2, 2)
    with pytest.raises(
        RuntimeError, match=r"gradient has shape \(2, 2\) but its parameter has shape \(4,\)"
    ):
        opt.step()


# -- ranks that disagree -----------------------------------------------------------------------


def outcome(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test reports what each rank raised
        return type(error).__name__, str(error)
    return "ok", ""


def mismatch_on_rank(rank: int, world_size: int, case: str) -> dict:
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    options: dict = {}
    if rank == 1 and case == "shape":
        params[1] = torch.randn(8, requires_grad=True)
    if rank == 1 and case == "count":
        params.append(torch.randn(2, requires_grad=True))
    if rank == 1 and case == "dtype":
        params[0] = params[0].detach().double().requires_grad_()
    if rank == 1 and case == "options":
        options["momentum"] = 0.9
    if rank == 1 and case == "bucket_numel":
        options["bucket_numel"] = 16
    if rank == 1 and case == "bad_lr":
        options["lr"] = -1.0
    if rank == 1 and case == "group_without_params":
        params = [{"lr": 0.1}]
    tensors = [p for p in params if isinstance(p, torch.Tensor)]
    storages = [p.untyped_storage().data_ptr() for p in tensors]
    error = outcome(lambda: ShardedRMSprop(params, **options))
    untouched = storages == [p.untyped_storage().data_ptr() for p in tensors]
    return {"error": error, "untouched": untouched}


@pytest.mark.parametrize(
    "case, difference",
    [
        (
            "shape",
            "the parameters: parameter 1 is 'float32 (7,) on cpu, param group 0' on rank 0 "
            "but 'float32 (8,) on cpu, param group 0' on rank 1",
        ),
        (
            "count",
            "the parameters: parameter 2 is absent on rank 0 but 'float32 (2,) on cpu, "
            "param group 0' on rank 1",
        ),
        (
            "dtype",
            "the parameters: parameter 0 is 'float32 (4, 3) on cpu, param group 0' on "
            "rank 0 but 'float64 (4, 3) on cpu, param group 0' on rank 1",
        ),
        (
            "options",
            "the param-group options: the momentum of param group 0 is 0 on rank 0 but "
            "0.9 on rank 1",
        ),
        (
            "bucket_numel",
            "the optimizer's settings: bucket_numel is None on rank 0 but 16 on rank 1",
        ),
    ],
)
def test_ranks_with_different_parameters_all_raise(case: str, difference: str) -> None:
    for rank, result in enumerate(run_ranks(2, mismatch_on_rank, case, timeout=120)):
        kind, message = result["error"]
        assert kind == "RuntimeError", f"rank {rank}: {result['error']}"
        assert f"ShardedRMSprop.__init__(): the ranks disagree on {difference}" in message
        assert result["untouched"]


def test_a_rank_rejecting_its_arguments_does_not_hang_the_others() -> None:
    rank0, rank1 = run_ranks(2, mismatch_on_rank, "bad_lr", timeout=120)
    assert rank1["error"] == ("ValueError", "Invalid learning rate: -1.0")
    assert rank0["error"] == (  # the same type, naming the rank that rejected its arguments
        "ValueError",
        "ShardedRMSprop.__init__() failed on rank 1: Invalid learning rate: -1.0 (nothing was "
        "changed on any rank)",
    )


def test_a_rank_failing_in_an_unforeseen_way_does_not_hang_the_others() -> None:
    """torch's own KeyError for a group without "params": any error, not only ValueError."""
    rank0, rank1 = run_ranks(2, mismatch_on_rank, "group_without_params", timeout=120)
    assert rank1["error"] == ("KeyError", "'params'")
    assert rank0["error"] == (
        "RuntimeError",
        "ShardedRMSprop.__init__() failed on rank 1: 'params' (nothing was changed on any rank)",
    )


def add_group_mismatch_on_rank(rank: int, world_size: int) -> dict:
    opt = ShardedRMSprop([torch.randn(5, requires_grad=True)])
    extra = torch.randn(3 + rank, requires_grad=True)
    error = outcome(lambda: opt.add_param_group({"params": [extra]}))
    return {"error": error, "groups": len(opt.param_groups)}


def test_add_param_group_mismatch_raises_on_every_rank_and_adds_nothing() -> None:
    for result in run_ranks(2, add_group_mismatch_on_rank, timeout=120):
        assert result["error"][0] == "RuntimeError"
        assert (
            "add_param_group(): the ranks disagree on the parameters: parameter 1"
            in result["error"][1]
        )
        assert result["groups"] == 1
