"""torch.optim.Optimizer's contract, as torch's own generic optimizer tests state it.

Our own tests of the behaviours PyTorch's ``test/test_optim.py`` checks for every optimizer
(hooks, state-dict round trips, param groups, printing, ...), with ShardedRMSprop in place of
torch.optim.RMSprop. Tests that run in this process run twice, at world size 1 without a
process group and with a gloo group of one rank; tests marked ``across_ranks`` spawn ranks.
Error inputs in torch's wording are in test_errors.py, fused against reference per dtype in
test_parity.py, uneven inputs under Join in test_join.py, resharding in test_checkpoint.py.

Behaviours deliberately not followed, and why:

- A parameter listed twice in one param group is an error (torch warns and updates it twice
  through one state): each parameter gets one place in the flat buffer.
- ``state_dict()`` returns this rank's shards (the sharded format DCP writes); torch's format,
  whole tensors, comes from the collective ``full_state_dict()``.
- ``load_state_dict()`` and ``clip_grad_norm_()`` are collective: every rank calls them.
- Parameters appended to a param group after construction are an error at the next step
  (torch would update them): the flat buffers are laid out at construction; use
  ``add_param_group()``.
- The optimizer cannot be pickled (it is bound to its process group); ``copy.deepcopy`` works.
- At world size 2 and more, ``state_dict()``'s tensors (ShardViews) compare with ShardViews
  of the same range but refuse arithmetic with whole tensors and reductions: a rank's range
  is not the whole tensor. (At world size 1 they are plain flat tensors.)
- Built on the meta device, the parameters must keep their objects when materialised
  (``torch.__future__.set_swap_module_params_on_conversion(True)``); plain ``to_empty()`` is
  an error at the next step.
- ``fused=True`` with complex parameters, or float64 ones on CUDA, is an error: no fused
  kernel takes them.
- ``capturable=True`` and ``differentiable=True`` are errors (torch's ``foreach`` is accepted
  and changes nothing): a step agrees with the other ranks on the host and updates a shard
  outside autograd.
- Integer parameter ids in a loaded state dict that no group lists are an error (torch keeps
  them); entries under other keys are kept, as torch keeps them.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
import torch.distributed as dist

from sharded_rmsprop import ShardedRMSprop
from sharded_rmsprop.kernels import rmsprop_cpu_fused_
from sharded_rmsprop.shard_view import IncompleteStateWarning
from spawn import run_ranks

SHAPES = [(7, 5), (3,), (40,)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not metafunc.definition.get_closest_marker("across_ranks"):
        metafunc.parametrize("world_of_one", ["no group", "group of 1"], indirect=True)


@pytest.fixture(autouse=True)
def world_of_one(request: pytest.FixtureRequest, tmp_path) -> None:
    """This process alone, with no process group or in a gloo group of one rank."""
    if getattr(request, "param", "no group") == "no group":
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def groups_of(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:2]}, {"params": params[2:], "momentum": 0.9, "centered": True}]


def params_and_optimizer(**options) -> tuple[list[torch.Tensor], ShardedRMSprop]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in SHAPES]
    return params, ShardedRMSprop(groups_of(params), lr=1e-2, fused=False, **options)


def twin_of(
    params: list[torch.Tensor], **options
) -> tuple[list[torch.Tensor], torch.optim.RMSprop]:
    """torch.optim.RMSprop over copies of ``params``, grouped as params_and_optimizer groups."""
    reference = [p.detach().clone().requires_grad_() for p in params]
    return reference, torch.optim.RMSprop(groups_of(reference), lr=1e-2, **options)


def train(params: list[torch.Tensor], opt: ShardedRMSprop, steps: int = 2, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        opt.step()


# -- hooks -------------------------------------------------------------------------------------


def test_state_dict_hooks_run_as_torchs_do() -> None:
    params, opt = params_and_optimizer()
    train(params, opt)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "mine": 1})
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("post", sd["mine"])))
    for make in (opt.state_dict, lambda: opt.full_state_dict(to=0)):
        assert make()["mine"] == 1
        assert calls == [("pre", True), ("post", 1)]
        calls.clear()


def test_load_state_dict_hooks_run_as_torchs_do() -> None:
    params, opt = params_and_optimizer()
    train(params, opt)
    saved = opt.full_state_dict(to=0)
    calls = []

    def halve_lr(o, state_dict):  # given a shallow copy: the caller's dict keeps its groups
        calls.append("pre")
        groups = [{**g, "lr": g["lr"] / 2} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    opt.register_load_state_dict_pre_hook(halve_lr)
    opt.register_load_state_dict_post_hook(
        lambda o: calls.append(("post", o.param_groups[0]["lr"]))
    )
    opt.load_state_dict(saved)
    assert calls == ["pre", ("post", 5e-3)]
    assert saved["param_groups"][0]["lr"] == 1e-2


def test_step_hooks_run_around_step() -> None:
    params, opt = params_and_optimizer()
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(params, opt, steps=1)
    assert calls == ["pre", "post"]


# -- state as torch shows it -----------------------------------------------------------------------


def test_state_shows_only_the_buffers_of_each_parameters_group() -> None:
    """Groups with and without momentum share one flat buffer: torch keeps no momentum_buffer
    for a parameter whose group has none, and neither does ``state[p]``."""
    params, opt = params_and_optimizer()
    reference, ref = twin_of(params)
    train(params, opt), train(reference, ref)
    for p, q in zip(params, reference):
        assert sorted(opt.state[p]) == sorted(ref.state[q])
    opt.param_groups[0]["momentum"] = 0.5  # from now on group 0 keeps one too
    train(params, opt, steps=1)
    assert "momentum_buffer" in opt.state[params[0]]


def test_param_names_go_through_loads_as_torchs_do() -> None:
    """Named parameters: the names a state dict carries replace the optimizer's; a state dict
    without names leaves the optimizer's as they are."""
    generator = torch.Generator().manual_seed(0)
    named = [
        (f"w{i}", torch.randn(s, generator=generator).requires_grad_())
        for i, s in enumerate(SHAPES)
    ]
    opt = ShardedRMSprop(named, fused=False)
    train([p for _, p in named], opt)
    saved = opt.full_state_dict(to=0)
    assert saved["param_groups"][0]["param_names"] == ["w0", "w1", "w2"]
    unnamed_opt = ShardedRMSprop(
        [p.detach().clone().requires_grad_() for _, p in named], fused=False
    )
    unnamed_opt.load_state_dict(saved)
    assert unnamed_opt.param_groups[0]["param_names"] == ["w0", "w1", "w2"]
    unnamed = unnamed_opt.full_state_dict(to=0)
    del unnamed["param_groups"][0]["param_names"]
    opt.load_state_dict(unnamed)
    assert opt.param_groups[0]["param_names"] == ["w0", "w1", "w2"]


def test_a_step_count_that_is_a_number_loads() -> None:
    """Older torch kept ``step`` as a Python number."""
    params, opt = params_and_optimizer()
    train(params, opt)
    saved = opt.full_state_dict(to=0)
    del saved["checksums"]
    for entry in saved["state"].values():
        entry["step"] = float(entry["step"])
    fresh_params, fresh = params_and_optimizer()
    fresh.load_state_dict(saved)
    assert all(float(fresh.state[p]["step"]) == 2.0 for p in fresh_params)


def test_the_optimizer_prints_like_torchs() -> None:
    _, opt = params_and_optimizer()
    text = repr(opt)
    assert (
        text.startswith("ShardedRMSprop (")
        and "Parameter Group 1" in text
        and "momentum: 0.9" in text
    )


def test_zero_gradients_update_as_torchs_do() -> None:
    """A zero gradient is a step (torch skips only None), with weight decay and momentum."""
    params, opt = params_and_optimizer(weight_decay=0.1)
    reference, ref = twin_of(params, weight_decay=0.1)
    for _ in range(2):
        for p, q in zip(params, reference):
            p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
        opt.step(), ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))
    assert all(float(opt.state[p]["step"]) == 2 for p in params)


def test_missing_gradients_skip_their_parameters_as_torchs_do() -> None:
    """A parameter whose gradient is None is not stepped (its state is not even created)."""
    params, opt = params_and_optimizer()
    reference, ref = twin_of(params)
    generator = torch.Generator().manual_seed(3)
    for step in range(3):
        for i, (p, q) in enumerate(zip(params, reference)):
            grad = torch.randn(p.shape, generator=generator)
            p.grad, q.grad = (None, None) if (i + step) % 2 else (grad, grad.clone())
        opt.step(), ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))
    assert [float(opt.state[p]["step"]) for p in params] == [2.0, 1.0, 2.0]


def test_a_tensor_lr_under_a_scheduler_steps_as_torchs_does() -> None:
    params, opt = params_and_optimizer()
    reference, ref = twin_of(params)
    for o in (opt, ref):
        for group in o.param_groups:
            group["lr"] = torch.tensor(1e-2)
    schedules = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (opt, ref)]
    for seed in range(3):
        train(params, opt, steps=1, seed=seed), train(reference, ref, steps=1, seed=seed)
        for schedule in schedules:
            schedule.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


def test_complex_parameters_step_as_torchs_do() -> None:
    """torch treats a complex parameter as its real view; so does the flat buffer."""
    generator = torch.Generator().manual_seed(4)
    params = [
        torch.randn(s, dtype=torch.complex64, generator=generator).requires_grad_() for s in SHAPES
    ]
    opt = ShardedRMSprop(groups_of(params), lr=1e-2, fused=False)
    reference, ref = twin_of(params)
    train(params, opt, steps=3), train(reference, ref, steps=3)
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


# -- state dicts -----------------------------------------------------------------------------------


def test_repeated_param_groups_keep_their_parameter_ids_as_torchs_do() -> None:
    params, opt = params_and_optimizer()
    _, ref = twin_of(params)
    for o in (opt, ref):
        o.param_groups.extend(o.param_groups)
    ids = lambda o: [group["params"] for group in o.state_dict()["param_groups"]]  # noqa: E731
    assert ids(opt) == ids(ref) == [[0, 1], [2], [0, 1], [2]]


def test_state_entries_that_are_not_parameters_are_saved_and_loaded_as_torch_does() -> None:
    """A state-dict pre-hook may put its own entry in optimizer.state; torch keeps it."""
    params, opt = params_and_optimizer()
    reference, ref = twin_of(params)
    for o in (opt, ref):
        o.register_state_dict_pre_hook(lambda o: o.state.__setitem__("mine", 1))
    train(params, opt), train(reference, ref)
    for saved in (opt.state_dict(), opt.full_state_dict(to=0), ref.state_dict()):
        assert saved["state"]["mine"] == 1
        fresh = ShardedRMSprop(groups_of([p.detach().clone() for p in params]), lr=1e-2)
        fresh.load_state_dict(saved)
        assert fresh.state["mine"] == 1
    ref.load_state_dict(opt.full_state_dict(to=0))
    assert ref.state["mine"] == 1


def test_state_dict_is_deterministic_and_a_load_resumes_exactly() -> None:
    """Two state_dict() calls give equal dicts; a fresh optimizer over the same weights,
    loaded with one, continues bit for bit as the original does."""
    params, opt = params_and_optimizer()
    train(params, opt)
    first, second = opt.full_state_dict(to=0), opt.full_state_dict(to=0)
    assert first["param_groups"] == second["param_groups"]
    assert all(
        torch.equal(a, b)
        for i in first["state"]
        for a, b in zip(first["state"][i].values(), second["state"][i].values())
    )
    copies = [p.detach().clone().requires_grad_() for p in params]
    fresh = ShardedRMSprop(groups_of(copies), lr=1e-2, fused=False)
    fresh.load_state_dict(opt.state_dict())
    train(params, opt, seed=9), train(copies, fresh, seed=9)
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


# -- copies ----------------------------------------------------------------------------------------


def test_a_deep_copy_is_a_working_optimizer_of_its_own() -> None:
    params, opt = params_and_optimizer(skip_nonfinite=True)
    train(params, opt)
    opt.skipped_steps = 3
    twin = copy.deepcopy(opt)
    public = [
        name for name in dir(opt) if not name.startswith("_") and not callable(getattr(opt, name))
    ]
    for name in public:
        assert repr(getattr(twin, name)) == repr(getattr(opt, name)), name
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(p is not q and torch.equal(p, q) for p, q in zip(params, twin_params))
    assert all(
        opt.state[p]["square_avg"].data_ptr() != twin.state[q]["square_avg"].data_ptr()
        for p, q in zip(params, twin_params)
    )
    train(params, opt, seed=5), train(twin_params, twin, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
    train(twin_params, twin, seed=6)  # the copy moves on alone
    assert not torch.equal(params[0], twin_params[0])


def test_a_model_and_its_optimizer_copied_together_train_together() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    opt = ShardedRMSprop(model.parameters(), momentum=0.9, fused=False)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (model_copy, opt_copy)):
        m(torch.ones(3, 5)).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_copy.parameters()))
    assert list(opt_copy.state) == list(model_copy.parameters())


def test_pickling_the_optimizer_says_what_to_save_instead() -> None:
    _, opt = params_and_optimizer()
    with pytest.raises(
        TypeError, match="cannot be pickled.*state_dict\\(\\) \\(DCP\\) or full_state_dict\\(\\)"
    ):
        pickle.dumps(opt)


def deep_copy_on_rank(rank: int, world_size: int) -> bool:
    params, opt = params_and_optimizer()
    reference, ref = twin_of(params)
    train(params, opt), train(reference, ref)
    twin = copy.deepcopy(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    train(twin_params, twin, seed=7), train(reference, ref, seed=7)
    return all(torch.equal(p, q) for p, q in zip(twin_params, reference))


@pytest.mark.across_ranks
def test_a_deep_copy_works_across_ranks() -> None:
    assert all(run_ranks(2, deep_copy_on_rank))


# -- state_dict() survives the usual habits -------------------------------------------------------


def test_state_dict_survives_deepcopy_and_torch_save(tmp_path) -> None:
    """Loaded into fresh optimizers holding the weights of the save, both continue exactly."""
    saved_params, saved_opt = params_and_optimizer()
    train(saved_params, saved_opt)
    torch.save(saved_opt.state_dict(), tmp_path / "optim.pt")
    weights = [p.detach().clone() for p in saved_params]
    copies = {
        "deepcopy": copy.deepcopy(saved_opt.state_dict()),
        "torch.load": torch.load(tmp_path / "optim.pt"),
    }
    train(saved_params, saved_opt, seed=9)
    for name, state_dict in copies.items():
        fresh_params, fresh = params_and_optimizer()
        with torch.no_grad():
            for p, w in zip(fresh_params, weights):
                p.copy_(w)
        fresh.load_state_dict(state_dict)
        train(fresh_params, fresh, seed=9)
        assert all(torch.equal(a, b) for a, b in zip(fresh_params, saved_params)), name


def per_rank_files(rank: int, world_size: int, directory: str, only_rank_0: bool) -> str:
    params, opt = params_and_optimizer()
    train(params, opt)
    if rank == 0 or not only_rank_0:
        torch.save(opt.state_dict(), f"{directory}/optim{rank}.pt")
    torch.distributed.barrier()
    weights = [p.detach().clone() for p in params]
    train(params, opt, seed=9)
    fresh_params, fresh = params_and_optimizer()
    with torch.no_grad():
        for p, w in zip(fresh_params, weights):
            p.copy_(w)
    try:
        fresh.load_state_dict(torch.load(f"{directory}/optim{0 if only_rank_0 else rank}.pt"))
    except ValueError as error:
        return str(error)
    train(fresh_params, fresh, seed=9)
    return "same" if all(torch.equal(a, b) for a, b in zip(fresh_params, params)) else "differs"


@pytest.mark.across_ranks
def test_each_rank_saving_its_state_dict_with_torch_save_resumes_exactly(tmp_path) -> None:
    assert run_ranks(2, per_rank_files, str(tmp_path), False) == ["same", "same"]


@pytest.mark.across_ranks
def test_one_rank_saving_its_state_dict_for_all_is_a_clear_error(tmp_path) -> None:
    """The habit of saving on rank 0 alone: state_dict() holds rank 0's ranges only."""
    for message in run_ranks(2, per_rank_files, str(tmp_path), True):
        assert "state_dict() holds the ranges of the rank that made it" in message


def test_at_world_size_1_the_state_dict_holds_plain_tensors(tmp_path) -> None:
    """Nothing to shard: plain (flat) tensors, which compare, save and load as torch's do."""
    params, opt = params_and_optimizer()
    train(params, opt)
    saved = opt.state_dict()
    tensors = [v for entry in saved["state"].values() for v in entry.values()]
    tensors += [v for entry in saved["checksums"].values() for v in entry.values()]
    assert all(type(t) is torch.Tensor for t in tensors)
    full = opt.full_state_dict()
    for index, entry in full["state"].items():
        for key, value in entry.items():
            assert torch.equal(saved["state"][index][key], value.reshape(-1) if value.dim() else value)
    torch.save(saved, tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=True)
    torch.testing.assert_close(loaded, saved, rtol=0, atol=0)
    params_2, opt_2 = params_and_optimizer()
    with torch.no_grad():
        for mine, theirs in zip(params_2, params):
            mine.copy_(theirs)
    opt_2.load_state_dict(loaded)
    train(params, opt, seed=3), train(params_2, opt_2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(params, params_2))


def test_a_state_dict_saved_by_earlier_versions_loads(tmp_path) -> None:
    """Earlier versions pickled each ShardView as plain data (an OrderedDict of its numel,
    offset and local range): such a file still loads, to the same state."""
    from collections import OrderedDict

    from sharded_rmsprop.shard_view import PLAIN_MARK

    params, opt = params_and_optimizer()
    train(params, opt)
    saved = opt.state_dict()
    old = copy.deepcopy(saved)
    for section in ("state", "checksums"):
        for entry in old[section].values():
            for key, value in entry.items():
                if value.dim() == 1 and key != "step":
                    entry[key] = OrderedDict(
                        [(PLAIN_MARK, value.numel()), ("offset", 0), ("local", value)]
                    )
    torch.save(old, tmp_path / "old.pt")
    params_2, opt_2 = params_and_optimizer()
    opt_2.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    torch.testing.assert_close(opt_2.state_dict(), saved, rtol=0, atol=0)


def shard_views_on_rank(rank: int, world_size: int, path: str) -> dict:
    """Two optimizers trained alike, one more step on a third: their state dicts compare
    as tensors compare, per rank; saved and loaded, they come back as ShardViews."""
    from sharded_rmsprop.shard_view import ShardView

    made = [params_and_optimizer() for _ in range(3)]
    for params, opt in made:
        train(params, opt)
    train(*made[2], seed=5)
    first, second, third = (opt.state_dict() for _, opt in made)
    view = first["state"][0]["square_avg"]
    out: dict = {"types": {type(t).__name__ for e in first["state"].values() for t in e.values()}}
    out["same_range_ops"] = all(
        type(v) is ShardView and (v.offset, v.numel()) == (view.offset, view.numel())
        for v in (view.clone(), view.detach(), view.to(torch.float64), view.cpu(), view == view)
    )
    out["equal"] = torch.equal(view, second["state"][0]["square_avg"])
    out["equal_elsewhere"] = torch.equal(view, ShardView(view.local, view.offset, view.numel() + 1))
    out["equal_to_third"] = all(  # each rank owns some of what the extra step changed
        torch.equal(value, third["state"][index][key])
        for index, entry in first["state"].items()
        for key, value in entry.items()
        if key != "step"
    )
    out["eq_all"] = bool((view == second["state"][0]["square_avg"]).all())
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # whole state dicts, nested
    try:
        torch.testing.assert_close(first, third, rtol=0, atol=0)
        out["third"] = "no error"
    except (AssertionError, RuntimeError) as error:
        out["third"] = type(error).__name__
    refused = []
    for name, operation in [
        ("arithmetic with a whole tensor", lambda: view + torch.ones(view.shape)),
        ("a sum", lambda: view.sum()),
        ("another place", lambda: view == ShardView(view.local, view.offset, view.numel() + 1)),
    ]:
        try:
            operation()
        except RuntimeError as error:
            refused.append("one rank's range of an optimizer buffer" in str(error))
        else:
            refused.append(f"{name}: no error")
    out["refused"] = refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteStateWarning)
        torch.save(first, f"{path}/rank{rank}.pt")
    loaded = torch.load(f"{path}/rank{rank}.pt", weights_only=True)
    loaded_view = loaded["state"][0]["square_avg"]
    out["loaded_kind"] = type(loaded_view).__name__
    torch.testing.assert_close(loaded, first, rtol=0, atol=0)
    params, opt = params_and_optimizer()
    with torch.no_grad():
        for mine, theirs in zip(params, made[0][0]):
            mine.copy_(theirs)
    opt.load_state_dict(loaded)
    train(params, opt, seed=5)
    out["resumed_as_the_third"] = all(torch.equal(a, b) for a, b in zip(params, made[2][0]))
    return out


@pytest.mark.across_ranks
def test_shard_views_compare_save_and_load_as_tensors(tmp_path) -> None:
    for out in run_ranks(2, shard_views_on_rank, str(tmp_path)):
        assert out["types"] == {"Tensor", "ShardView"}  # step is a plain tensor
        assert out["same_range_ops"] and out["equal"] and out["eq_all"]
        assert not out["equal_elsewhere"] and not out["equal_to_third"]
        assert out["third"] != "no error"
        assert out["refused"] == [True, True, True]
        assert out["loaded_kind"] == "ShardView"
        assert out["resumed_as_the_third"]


def crafted_shard_view(tmp_path, local: object, offset: object, numel: object) -> str:
    """A file whose ShardView says ``local``, ``offset`` and ``numel``."""
    from sharded_rmsprop.shard_view import ShardView

    class Crafted:
        def __reduce__(self):
            return (ShardView, (local, offset, numel))

    path = str(tmp_path / "crafted.pt")
    torch.save({"x": Crafted()}, path)
    return path


@pytest.mark.parametrize(
    "local, offset, numel, message",
    [
        (torch.zeros(4), 8, 10, r"range \[8, 12\) is not within \[0, 10\)"),
        (torch.zeros(4), -1, 10, r"range \[-1, 3\) is not within"),
        (torch.zeros(2, 2), 0, 4, "must be a 1-D tensor"),
        ("not a tensor", 0, 4, "must be a 1-D tensor"),
        (torch.zeros(4), 0.5, 4, "must be integers"),
    ],
)
def test_a_crafted_shard_view_in_a_file_is_refused(tmp_path, local, offset, numel, message) -> None:
    path = crafted_shard_view(tmp_path, local, offset, numel)
    with pytest.raises(Exception, match=message):
        torch.load(path, weights_only=True)


@pytest.mark.across_ranks
def test_torch_rmsprop_given_the_sharded_state_dict_fails_clearly_at_its_first_step() -> None:
    """torch's loader copies the entries as they are (nothing in it can refuse them); its
    first step then meets a ShardView and says what it is."""
    for message in run_ranks(2, torch_rmsprop_given_shard_views_on_rank):
        assert re.search(
            "from ShardedRMSprop.state_dict\\(\\).*use ShardedRMSprop.full_state_dict", message
        ), message


def torch_rmsprop_given_shard_views_on_rank(rank: int, world_size: int) -> str:
    params, opt = params_and_optimizer()
    train(params, opt)
    reference = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.RMSprop(
        [{"params": reference[:2]}, {"params": reference[2:], "momentum": 0.9, "centered": True}]
    )
    ref.load_state_dict(opt.state_dict())
    for p in reference:
        p.grad = torch.ones_like(p)
    try:
        ref.step()
    except RuntimeError as error:
        return str(error)
    return "no error"


# -- the meta-device pattern -------------------------------------------------------------------------


@pytest.fixture
def swapping():
    """module.to_empty() keeping Parameter objects (torch.__future__ setting), as it must for
    any optimizer built before it to hold the moved parameters."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


def meta_model() -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def materialise(model: torch.nn.Module) -> None:
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def train_model(model: torch.nn.Module, opt, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(8)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=generator)).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("fused", [False, True])
def test_built_on_meta_then_materialised_trains_as_torch(swapping, fused: bool) -> None:
    model = meta_model()
    opt = ShardedRMSprop(model.parameters(), momentum=0.9, centered=True, fused=fused)
    materialise(model)
    reference = meta_model()
    materialise(reference)
    ref = torch.optim.RMSprop(reference.parameters(), momentum=0.9, centered=True)
    train_model(model, opt), train_model(reference, ref)
    assert opt.sharding.buckets[0].plan.device == torch.device("cpu")
    for p, q in zip(model.parameters(), reference.parameters()):
        if fused:  # one fused float32 pass: a few ulps from torch's op-by-op rounding
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(p, q)


def test_built_on_meta_then_loaded_resumes_exactly(swapping) -> None:
    """Build on meta, materialise, load the weights and the optimizer's state: the resume."""
    model = meta_model()
    materialise(model)
    opt = ShardedRMSprop(model.parameters(), momentum=0.9, fused=False)
    train_model(model, opt)
    weights, state = copy.deepcopy(model.state_dict()), opt.full_state_dict(to=0)
    train_model(model, opt)
    resumed = meta_model()
    resumed_opt = ShardedRMSprop(resumed.parameters(), momentum=0.9, fused=False)
    resumed.to_empty(device="cpu")
    resumed.load_state_dict(weights)
    resumed_opt.load_state_dict(state)
    train_model(resumed, resumed_opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_built_on_meta_without_swapping_is_an_error_not_a_silent_no_op() -> None:
    """Plain to_empty() gives the module new Parameter objects: the optimizer (any torch
    optimizer) still holds the meta ones, and would update nothing."""
    model = meta_model()
    opt = ShardedRMSprop(model.parameters())
    materialise(model)
    model(torch.ones(2, 6)).sum().backward()
    with pytest.raises(
        RuntimeError,
        match="built on parameters on the meta device.*set_swap_module_params_on_conversion",
    ):
        opt.step()


def test_a_fused_step_on_meta_is_refused_in_torchs_words(swapping) -> None:
    """torch's test_fused_error_on_params_on_meta: a fused=True step while the parameters
    and gradients are on meta is torch's RuntimeError (here with why, and what to do);
    after materialising, the same optimizer trains with the fused kernel."""
    model = meta_model()
    opt = ShardedRMSprop(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(
        RuntimeError,
        match=r"^`fused=True` requires all the params to be floating point Tensors of supported "
        r"devices: \['cpu', 'cuda'\] but torch.float32 and meta \(still on meta\)\. "
        r"ShardedRMSprop was built on parameters on the meta device",
    ):
        opt.step()
    opt.zero_grad(set_to_none=True)
    materialise(model)
    before = [p.detach().clone() for p in model.parameters()]
    train_model(model, opt, steps=1)
    assert opt.sharding.buckets[0].kernel is rmsprop_cpu_fused_
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_some_parameters_left_on_meta_is_an_error(swapping) -> None:
    model = meta_model()
    opt = ShardedRMSprop(model.parameters())
    first = model[0].weight
    torch.utils.swap_tensors(first, torch.nn.Parameter(torch.zeros(first.shape)))
    with pytest.raises(RuntimeError, match="moved to cpu, but parameter 1 .* is still on meta"):
        opt.step()


def meta_on_rank(rank: int, world_size: int) -> bool:
    torch.__future__.set_swap_module_params_on_conversion(True)
    model, reference = meta_model(), meta_model()
    opt = ShardedRMSprop(model.parameters(), momentum=0.9, fused=False)
    materialise(model), materialise(reference)
    ref = torch.optim.RMSprop(reference.parameters(), momentum=0.9)
    train_model(model, opt), train_model(reference, ref)
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.across_ranks
def test_built_on_meta_across_ranks() -> None:
    assert all(run_ranks(2, meta_on_rank))


@pytest.mark.parametrize("make", ["torch", "sharded"])
def test_a_backward_through_a_graph_from_before_the_step_is_an_error(make) -> None:
    """torch's update changes the parameters in place, so a backward through a graph that saved
    them before the step raises; it must not silently use the values from before."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    options = {"lr": 1e-2, "momentum": 0.9}
    if make == "torch":
        opt = torch.optim.RMSprop(model.parameters(), **options)
    else:
        opt = ShardedRMSprop(model.parameters(), **options, fused=False)
    model(torch.randn(3, 5)).square().sum().backward()
    loss = model(torch.randn(3, 5)).square().sum()  # saves the weights as they are now
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("shape", [(), (1,)])
def test_gradscaler_values_of_one_element_in_either_shape(shape) -> None:
    """GradScaler sets 0-d tensors; torch's fused optimizers also take shape (1,)."""
    params = [torch.nn.Parameter(torch.ones(3, 2)) for _ in range(2)]
    reference = [p.detach().clone().requires_grad_() for p in params]
    opt = ShardedRMSprop(params, lr=1e-2, fused=False)
    torch_opt = torch.optim.RMSprop(reference, lr=1e-2)
    for p in params + reference:
        p.grad = torch.full_like(p, 0.5)
    opt.grad_scale, opt.found_inf = torch.ones(shape), torch.ones(shape)
    opt.step()  # an inf was found: nothing moves, no state is counted
    assert all(torch.equal(p, torch.ones(3, 2)) for p in params)
    assert all(float(opt.state[p].get("step", 0)) == 0 for p in params)
    opt.grad_scale, opt.found_inf = torch.full(shape, 2.0), torch.zeros(shape)
    opt.step()  # none found: the gradients are divided by the scale inside the update
    for p in reference:
        p.grad = torch.full_like(p, 0.25)
    torch_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


def test_gradscaler_values_of_several_elements_are_an_error() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    opt = ShardedRMSprop([param], lr=1e-2, fused=False)
    param.grad = torch.ones(3)
    opt.grad_scale, opt.found_inf = torch.ones(2), torch.zeros(2)
    with pytest.raises(ValueError, match=r"optimizer.found_inf must be a tensor of one element"):
        opt.step()
    assert torch.equal(param, torch.ones(3)) and not hasattr(opt, "found_inf")


def scaler_values_on_rank(rank: int, world_size: int) -> dict:
    param = torch.nn.Parameter(torch.ones(5))
    opt = ShardedRMSprop([param], lr=1e-2, fused=False)
    param.grad = torch.ones(5)
    out = {}
    opt.grad_scale = torch.ones(1)
    opt.found_inf = torch.zeros(2) if rank == 1 else torch.zeros(1)  # bad on rank 1 alone
    try:
        opt.step()
    except ValueError as error:
        out["error"] = str(error)
    opt.grad_scale = torch.ones(1)
    opt.found_inf = torch.ones(1) if rank == 1 else torch.zeros(1)  # an inf on rank 1 alone
    opt.step()
    out["unchanged"] = torch.equal(param, torch.ones(5))
    return out


@pytest.mark.across_ranks
def test_gradscaler_values_are_checked_on_every_rank() -> None:
    for r in run_ranks(2, scaler_values_on_rank):
        assert "optimizer.found_inf must be a tensor of one element" in r["error"]
        assert r["unchanged"]  # the inf on one rank skipped the step on both
