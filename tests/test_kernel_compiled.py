"""The Triton kernel compiled for sm_80, sm_90 and sm_100 on this machine, no GPU needed.

``benchmarks/triton_compiled.py`` compiles a launch exactly as ``JITFunction.run`` would on
such a GPU (the launch's arguments through Triton's own binder, so the same signature,
constexprs, divisible-by-16 attributes and options) and reads the PTX, the SASS and the
cubin's resource usage; :func:`~benchmarks.triton_compiled.problems` names each claim of the
kernel's docstring a launch breaks: 128-bit global loads and stores on aligned shards (and
how many), no spills, no ``fma`` with the launch's ``enable_fp_fusion=False``, ``div.rn`` and
``sqrt.rn`` and nothing approximate. Here a covering subset of the calls (every switch both
ways, every storage, every grad_scale kind, on each architecture; each call a body and a
tail launch) is compiled on every commit; the script compiles all of them and keeps the
table, which :func:`test_table_is_current` holds to the kernel's source.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from benchmarks import triton_compiled as tc


@pytest.fixture(scope="module")
def toolchain() -> None:
    """Skip where triton, its NVIDIA backend or the tools it ships (ptxas, cuobjdump) are
    missing: compiling needs them, a GPU it does not."""
    pytest.importorskip("triton")
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        make_backend(GPUTarget("cuda", 90, 32))
        for tool in (knobs.nvidia.ptxas, knobs.nvidia.ptxas_blackwell, knobs.nvidia.cuobjdump):
            assert tool.path
        assert hasattr(JITFunction, "_pack_args")
    except Exception as exc:  # no NVIDIA backend, no ptxas, or another triton's internals
        pytest.skip(f"cannot compile Triton kernels for NVIDIA GPUs here: {exc!r}")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile every time (Triton's cache would keep an earlier result), and leave no files."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "triton_cache"))


@pytest.mark.parametrize("config", tc.covering_subset(), ids=lambda c: c.label)
def test_compiled_code_keeps_the_claims(toolchain, config: tc.Config) -> None:
    launched = tc.compile_config(config)
    # The call has N_ELEMENTS elements, not a multiple of 16: a vectorised body and a tail.
    assert [f.n_elements for f in launched] == [
        tc.N_ELEMENTS - tc.N_ELEMENTS % 16,
        tc.N_ELEMENTS % 16,
    ]
    for facts in launched:
        found = tc.problems(config, facts)
        assert not found, f"{config.label}, n={facts.n_elements}:\n" + "\n".join(found)
        assert facts.registers > 0  # read from the cubin, reported in the table
    body, tail = launched
    assert body.loads[128] == tc.expected_accesses(config)[0] > 0
    # The tail is the scalar variant; it is also how the checks would see a body that lost
    # its vectorisation (a row of 32- or 16-bit accesses).
    assert 128 not in tail.loads and tail.loads


def test_coverage_of_the_subset() -> None:
    """Every switch both ways, every storage and grad_scale kind, on every architecture."""
    configs = tc.covering_subset()
    for arch in tc.ARCHS:
        mine = [c for c in configs if c.arch == arch]
        assert {c.storage for c in mine} == set(tc.STORAGES)
        assert {c.grad_scale for c in mine} == set(tc.GRAD_SCALES)
        for switch in ("weight_decay", "momentum", "centered", "maximize"):
            assert {getattr(c, switch) for c in mine} == {False, True}, switch
    assert set(configs) <= set(tc.full_matrix())


def test_fma_would_be_seen(toolchain) -> None:
    """The control for the fma count: the same launch with fusion on has fma.rn.f32 in its
    PTX, so a count of zero in the launch as made means contraction is off."""
    config = tc.Config(90, "float32", True, True, True, True, "value", fp_fusion=True)
    (args, kwargs), _ = tc.launches(config)
    assert kwargs["enable_fp_fusion"] is True
    ptx = tc.compile_launch(args, kwargs, config.arch).asm["ptx"]
    assert Counter(re.findall(r"\bfma\.[a-z0-9.]+", ptx))["fma.rn.f32"] > 0


def test_launches_are_what_the_wrapper_passes() -> None:
    """The recorder sees the launch's options: fusion off, 4 warps, the switches as set."""
    pytest.importorskip("triton")
    config = tc.Config(90, "float32 + bfloat16 copy", True, False, True, False, "pointer")
    launched = tc.launches(config)
    assert [args[7] for args, _ in launched] == [tc.N_ELEMENTS - 5, 5]
    for args, kwargs in launched:
        assert kwargs["enable_fp_fusion"] is False and kwargs["num_warps"] == 4
        switches = (kwargs["WEIGHT_DECAY"], kwargs["MOMENTUM"], kwargs["CENTERED"])
        assert switches == (True, False, True)
        assert kwargs["GRAD_SCALE"] == "pointer" and kwargs["STORE_LOW_PRECISION"] is True
        assert all(a.data_ptr() % 16 == 0 for a in args[:7])  # the tail's shards too


def test_table_is_current() -> None:
    """The committed table was made from the kernel's current source (code, not comments)."""
    text = tc.RESULTS.read_text()
    match = re.search(r"kernel source `([0-9a-f]{16})`", text)
    assert match, f"{tc.RESULTS} has no kernel source hash in its header"
    assert match.group(1) == tc.kernel_source_hash(), (
        f"{tc.RESULTS.relative_to(tc.ROOT)} was made from another version of "
        f"sharded_rmsprop/kernels/triton_rmsprop.py; run `{tc.COMMAND}` (about 10 minutes on "
        f"2 cores, no GPU needed) and commit the table"
    )
    assert "Claims broken: 0 of " in text, "the committed table records broken claims"


def test_source_hash_ignores_comments_and_docstrings(tmp_path) -> None:
    code = "def f(x):\n    return x + 1\n"
    variants = {
        "same": 'def f(x):\n    """Doc."""\n    # why\n    return x + 1  # add\n\n',
        "changed": "def f(x):\n    return x + 2\n",
    }
    hashes = {}
    for name, text in {"code": code, **variants}.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        hashes[name] = tc.kernel_source_hash(path)
    assert hashes["code"] == hashes["same"] != hashes["changed"]
