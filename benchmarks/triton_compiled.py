"""The Triton kernel compiled ahead of time for sm_80, sm_90 and sm_100, without a GPU.

Triton compiles for a GPU it does not see: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` makes the PTX, and ``ptxas`` (shipped in the triton
wheel) the cubin. This compiles every variant the optimizer can launch and reads in the compiled
code what ``sharded_rmsprop/kernels/triton_rmsprop.py`` claims and the bandwidth model assumes:

- every global access of a launch over 16-byte-aligned shards and a multiple of 16 elements is
  a 128-bit one (``ld.global.v4`` / ``st.global.v4``; a 16-bit stream packs eight values in
  one), two per thread and float32 stream, one per 16-bit stream; the one other access is a
  tensor ``grad_scale``'s 4-byte load;
- no spills: no local memory (``LOCAL``, ``STACK``, ``ld.local`` / ``LDL`` / ``STL``), with the
  registers per thread;
- no ``fma`` in the PTX of the launch's options (``enable_fp_fusion=False``): the interpreter's
  bits rest on it;
- the IEEE division and square root, ``div.rn.f32`` and ``sqrt.rn.f32``, and no approximate
  ``div`` / ``sqrt`` / ``rcp`` / ``rsqrt``.

A variant is made the way the launch makes it: :func:`launches` calls ``rmsprop_triton_`` on
CPU tensors with the kernel replaced by a recorder, and :func:`compile_launch` feeds what it
passed to the binder Triton builds for the target (its signature, constexprs and the
divisible-by-16 attributes of the pointers and of ``n_elements``) and compiles that, with the
launch's own options. Each call has ``N_ELEMENTS`` elements, not a multiple of 16, so it is two
launches: the body (vectorised) and the tail of fewer than 16 elements (scalar accesses, which is
all the tail has). Launches of more than 2**31 elements (an ``i64`` ``n_elements``) never
happen in the optimizer, whose gradient windows have at most 2**22 elements, and are not made.

Run::

    .venv/bin/python benchmarks/triton_compiled.py            # all 1440 launches (~10 min, 2 cores)
    .venv/bin/python benchmarks/triton_compiled.py --jobs 1

It writes ``benchmarks/results/triton_compiled.md``, whose header names the hash of the kernel's
source (:func:`kernel_source_hash`); ``tests/test_kernel_compiled.py`` compiles a covering subset
on every commit and fails when the table is older than the source.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
import tokenize
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sharded_rmsprop.kernels import triton_rmsprop  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "triton_compiled.md"
KERNEL_SOURCE = Path(triton_rmsprop.__file__)
COMMAND = ".venv/bin/python benchmarks/triton_compiled.py"

ARCHS = (80, 90, 100)
#: Storage: (param's dtype, the rounded copy's dtype or None).
STORAGES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "float16": (torch.float16, None),
    "float32 + bfloat16 copy": (torch.float32, torch.bfloat16),
    "float32 + float16 copy": (torch.float32, torch.float16),
}
#: grad_scale as the caller passes it, by the GRAD_SCALE constexpr it becomes.
GRAD_SCALES = ("none", "value", "pointer")
#: Elements per call: a partial last block, and a tail of 5 that is its own launch.
N_ELEMENTS = 2 * triton_rmsprop.BLOCK_SIZE + 64 + 5
_THREADS = 4 * 32  # the launch's num_warps times the warp size


@dataclass(frozen=True)
class Config:
    """One ``rmsprop_triton_`` call compiled for one GPU: the options, the storage, the scale."""

    arch: int
    storage: str
    weight_decay: bool
    momentum: bool
    centered: bool
    maximize: bool
    grad_scale: str
    #: None: the launch's own ``enable_fp_fusion``; True or False overrides it (a control).
    fp_fusion: bool | None = None

    @property
    def flags(self) -> str:
        names = ("weight_decay", "momentum", "centered", "maximize")
        on = [name for name in names if getattr(self, name)]
        return ", ".join(on) or "-"

    @property
    def label(self) -> str:
        fusion = "" if self.fp_fusion is None else f"-fusion{int(self.fp_fusion)}"
        switches = ("weight_decay", "momentum", "centered", "maximize")
        bits = "".join(str(int(getattr(self, name))) for name in switches)
        return f"sm{self.arch}-{self.storage.replace(' ', '')}-{bits}-{self.grad_scale}{fusion}"


@dataclass
class Facts:
    """What the compiled code of one launch shows."""

    n_elements: int
    registers: int
    local_bytes: int  # LOCAL + STACK per thread, from the cubin's resource usage
    spill_instructions: int  # LDL / STL in the SASS, ld.local / st.local in the PTX
    shared_bytes: int
    barriers: int
    loads: Counter = field(default_factory=Counter)  # bits per ld.global -> how many
    stores: Counter = field(default_factory=Counter)
    sass_loads: Counter = field(default_factory=Counter)  # LDG.E.128 etc. -> how many
    sass_stores: Counter = field(default_factory=Counter)
    fma: int = 0
    divisions: Counter = field(default_factory=Counter)  # div.rn.f32 -> how many
    square_roots: Counter = field(default_factory=Counter)
    approximate: Counter = field(default_factory=Counter)  # any *.approx / div.full

    @property
    def body(self) -> bool:
        """The vectorised launch: a multiple of 16 elements (the shards are aligned here)."""
        return self.n_elements % 16 == 0


def full_matrix() -> list[Config]:
    """Every combination the optimizer can launch, for every architecture."""
    return [
        Config(arch, storage, *switches, scale)
        for arch in ARCHS
        for storage in STORAGES
        for switches in itertools.product((False, True), repeat=4)
        for scale in GRAD_SCALES
    ]


def covering_subset() -> list[Config]:
    """Five calls per architecture in which every switch takes both values and every storage
    and every grad_scale kind appears (each call is a body and a tail launch)."""
    rows = [
        ("float32", False, False, False, False, "none"),
        ("bfloat16", True, True, True, True, "value"),
        ("float16", True, False, True, False, "pointer"),
        ("float32 + bfloat16 copy", False, True, False, True, "value"),
        ("float32 + float16 copy", True, True, True, True, "pointer"),
    ]
    return [Config(arch, *row) for arch in ARCHS for row in rows]


def kernel_source_hash(path: Path = KERNEL_SOURCE) -> str:
    """SHA-256 (16 hex digits) of the kernel module's code: its text without docstrings,
    comments and blank lines, so that only a change to what compiles, or to how it is
    launched, asks for the table to be made again."""
    source = path.read_text()
    lines = source.splitlines()
    drop: set[int] = set()  # 1-based line numbers
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                drop.update(range(body[0].lineno, body[0].end_lineno + 1))
    kept = {i: line for i, line in enumerate(lines, 1) if i not in drop}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = token.start
        if token.type == tokenize.COMMENT and row in kept:
            kept[row] = kept[row][:col]
    text = "\n".join(line.rstrip() for _, line in sorted(kept.items()) if line.strip())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def launches(config: Config, n: int = N_ELEMENTS) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` of every kernel launch ``rmsprop_triton_`` makes for ``config``
    on freshly allocated (so 16-byte-aligned) CPU tensors of ``n`` elements."""
    dtype, low_precision = STORAGES[config.storage]
    calls: list[tuple[tuple, dict]] = []

    class _Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.rand(n, generator=gen).to(dtype) for _ in range(5)]
    scale = {"none": None, "value": 0.5, "pointer": torch.tensor(0.5)}[config.grad_scale]
    with (
        mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}),  # CPU tensors are accepted
        mock.patch.object(triton_rmsprop, "_get_kernel", lambda interpret=None: _Recorder()),
    ):
        triton_rmsprop.rmsprop_triton_(
            *tensors[:3],
            tensors[3] if config.momentum else None,
            tensors[4] if config.centered else None,
            lr=0.01,
            alpha=0.99,
            eps=1e-8,
            weight_decay=0.1 if config.weight_decay else 0.0,
            momentum=0.9 if config.momentum else 0.0,
            centered=config.centered,
            maximize=config.maximize,
            grad_scale=scale,
            low_precision_param=None
            if low_precision is None
            else torch.empty(n, dtype=low_precision),
        )
    if config.fp_fusion is not None:
        calls = [(args, {**kwargs, "enable_fp_fusion": config.fp_fusion}) for args, kwargs in calls]
    return calls


def compile_launch(args: tuple, kwargs: dict, arch: int) -> Any:
    """Compile one launch for ``sm_<arch>`` the way ``JITFunction.run`` would on that GPU: the
    same binder, the same packing of signature, constexprs and attributes, the same options."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    with mock.patch.dict(os.environ):
        os.environ.pop("TRITON_INTERPRET", None)
        jitted = triton_rmsprop._get_kernel(interpret=False)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    # What JITFunction.run adds to the launch's keyword arguments before binding them.
    kwargs["debug"] = kwargs.get("debug", jitted.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(jitted.signature, jitted.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jitted._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(jitted, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run(
            [knobs.nvidia.cuobjdump.path, *flags, f.name],
            capture_output=True,
            text=True,
            check=True,
        )
    return done.stdout


_PTX_WIDTH = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)")
_SASS_ACCESS = re.compile(r"\b(LDG|STG)(\.[A-Z0-9.]+)?")


def _bits(suffixes: str) -> int:
    """Bits moved by one ``ld.global`` / ``st.global`` with these suffixes (``.v4.b32``)."""
    vector, element = 1, 0
    for part in suffixes.split(".")[1:]:
        if part in ("v2", "v4", "v8"):
            vector = int(part[1:])
        elif m := re.fullmatch(r"[bfsu](8|16|32|64)", part):
            element = int(m.group(1))
        elif part == "bf16":
            element = 16
    return vector * element


def inspect(kernel: Any, n_elements: int) -> Facts:
    """The facts of one compiled kernel (``triton.compile``'s result)."""
    ptx = kernel.asm["ptx"]
    sass = _cuobjdump(kernel.asm["cubin"], "-sass")
    usage = _cuobjdump(kernel.asm["cubin"], "--dump-resource-usage")
    resources = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    facts = Facts(
        n_elements=n_elements,
        registers=int(resources["REG"]),
        local_bytes=int(resources["LOCAL"]) + int(resources["STACK"]),
        spill_instructions=len(re.findall(r"\b(?:LDL|STL)\b|\b(?:ld|st)\.local\b", sass + ptx)),
        shared_bytes=int(kernel.metadata.shared),
        barriers=len(re.findall(r"\bbar\.sync\b", ptx)),
        fma=len(re.findall(r"\bfma\.", ptx)),
        divisions=Counter(re.findall(r"\bdiv\.[a-z0-9.]*f32\b", ptx)),
        square_roots=Counter(re.findall(r"\bsqrt\.[a-z0-9.]*f32\b", ptx)),
        approximate=Counter(re.findall(r"\b[a-z0-9]+\.(?:approx|full)\.[a-z0-9.]+", ptx)),
    )
    for kind, suffixes in _PTX_WIDTH.findall(ptx):
        (facts.loads if kind == "ld" else facts.stores)[_bits(suffixes)] += 1
    for kind, suffixes in _SASS_ACCESS.findall(sass):
        # LDG.E.128, LDG.E.U16, STG.E (32 bits), LDG.E.64 ...
        sizes = re.findall(r"\.[US]?(8|16|32|64|128)\b", suffixes)
        bits = int(sizes[-1]) if sizes else 32
        (facts.sass_loads if kind == "LDG" else facts.sass_stores)[bits] += 1
    return facts


def compile_config(config: Config) -> list[Facts]:
    """The facts of each launch of ``config``, in launch order."""
    return [
        inspect(compile_launch(args, kwargs, config.arch), args[7])
        for args, kwargs in launches(config)
    ]


def expected_accesses(config: Config) -> tuple[int, int]:
    """128-bit global loads and stores per thread of a body launch: two per float32 stream,
    one per 16-bit stream (8 elements per thread, 16 bytes per access)."""
    dtype, low_precision = STORAGES[config.storage]
    per_stream = triton_rmsprop.BLOCK_SIZE // _THREADS * dtype.itemsize // 16
    read = 3 + config.momentum + config.centered  # param, grad, square_avg, the buffers
    written = 2 + config.momentum + config.centered  # param, square_avg, the buffers
    copy = 0 if low_precision is None else triton_rmsprop.BLOCK_SIZE // _THREADS * 2 // 16
    return read * per_stream, written * per_stream + copy


def problems(config: Config, facts: Facts) -> list[str]:
    """The claims ``facts`` breaks, each a sentence; none for a launch that keeps them all."""
    found = []
    if facts.body:
        loads, stores = expected_accesses(config)
        scale_loads = 1 if config.grad_scale == "pointer" else 0
        want_loads = Counter({128: loads, **({32: scale_loads} if scale_loads else {})})
        if facts.loads != want_loads:
            found.append(
                f"global loads (bits: count) {dict(facts.loads)}, expected {dict(want_loads)}"
            )
        if facts.stores != Counter({128: stores}):
            found.append(
                f"global stores (bits: count) {dict(facts.stores)}, expected {{128: {stores}}}"
            )
        if facts.sass_loads.get(128, 0) != loads or facts.sass_stores != Counter({128: stores}):
            found.append(f"SASS loads {dict(facts.sass_loads)}, stores {dict(facts.sass_stores)}")
    if facts.local_bytes or facts.spill_instructions:
        found.append(
            f"spills: {facts.local_bytes} bytes of local memory per thread, "
            f"{facts.spill_instructions} local loads/stores"
        )
    if config.fp_fusion is None and facts.fma:
        found.append(f"{facts.fma} fma in the PTX, launched with enable_fp_fusion=False")
    if set(facts.divisions) != {"div.rn.f32"} or set(facts.square_roots) != {"sqrt.rn.f32"}:
        found.append(f"divisions {dict(facts.divisions)}, square roots {dict(facts.square_roots)}")
    if facts.approximate:
        found.append(f"approximate operations {dict(facts.approximate)}")
    if facts.shared_bytes and STORAGES[config.storage][1] is None:
        # Only the rounded copy's wider store layout makes Triton exchange results through
        # shared memory (the module docstring says why); anywhere else it is new.
        found.append(f"{facts.shared_bytes} bytes of shared memory, {facts.barriers} barriers")
    return found


def _widths(counts: Counter) -> str:
    return " + ".join(f"{n}x{bits}" for bits, n in sorted(counts.items(), reverse=True)) or "-"


def _kinds(counts: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "-"


def _compile_one(config: Config) -> tuple[Config, list[Facts], float]:
    start = time.perf_counter()
    facts = compile_config(config)
    return config, facts, time.perf_counter() - start


def render(results: list[tuple[Config, list[Facts]]], seconds: float, jobs: int) -> str:
    import triton

    rows = [(config, facts) for config, launched in results for facts in launched]
    bad = [(c, f, p) for c, f in rows if (p := problems(c, f))]
    out = [
        "# The Triton kernel as compiled for sm_80, sm_90 and sm_100 (no GPU needed)",
        "",
        f"`{COMMAND}`",
        "",
        f"kernel source `{kernel_source_hash()}` (sharded_rmsprop/kernels/triton_rmsprop.py "
        f"without comments and docstrings), triton {triton.__version__}, "
        f"{len(rows)} launches of {len(results)} calls compiled in {seconds:.0f} s ({jobs} processes).",
        "",
        f"Each call has {N_ELEMENTS} elements on 16-byte-aligned shards: the body launch "
        f"(n = {N_ELEMENTS - N_ELEMENTS % 16}) vectorises, the tail (n = {N_ELEMENTS % 16}) has scalar "
        "accesses. Loads and stores: PTX `ld.global` / `st.global` instructions per thread as "
        "count x bits (SASS `LDG` / `STG` agree for the body); spills: local memory bytes per "
        "thread and local loads/stores; fma: `fma.*` in the PTX, as launched "
        "(`enable_fp_fusion=False`).",
        "",
        "## Summary",
        "",
        "| arch | launch | registers | spills | shared memory (B) | loads | stores | fma | div | sqrt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch in ARCHS:
        for body in (True, False):
            group = [f for c, f in rows if c.arch == arch and f.body == body]
            if not group:
                continue
            regs = sorted({f.registers for f in group})
            shared = sorted({f.shared_bytes for f in group})
            load_kinds = sorted({b for f in group for b in f.loads}, reverse=True)
            store_kinds = sorted({b for f in group for b in f.stores}, reverse=True)
            out.append(
                f"| sm_{arch} | {'body' if body else 'tail'} | {regs[0]}-{regs[-1]} "
                f"| {sum(f.local_bytes + f.spill_instructions for f in group)} "
                f"| {', '.join(map(str, shared))} "
                f"| {', '.join(f'{b}-bit' for b in load_kinds)} "
                f"| {', '.join(f'{b}-bit' for b in store_kinds)} "
                f"| {sum(f.fma for f in group)} "
                f"| {', '.join(sorted({k for f in group for k in f.divisions}))} "
                f"| {', '.join(sorted({k for f in group for k in f.square_roots}))} |"
            )
    out += [
        "",
        f"Claims broken: {len(bad)} of {len(rows)} launches" + ("." if not bad else ":"),
    ]
    out += [f"- {c.label} n={f.n_elements}: {'; '.join(p)}" for c, f, p in bad]
    out += [
        "",
        "## Every launch",
        "",
        "| arch | storage | options | grad_scale | n | registers | spills | shared (B) | loads | stores | fma | div | sqrt |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- |",
    ]
    for config, facts in rows:
        out.append(
            f"| sm_{config.arch} | {config.storage} | {config.flags} | {config.grad_scale} "
            f"| {facts.n_elements} | {facts.registers} "
            f"| {facts.local_bytes + facts.spill_instructions} | {facts.shared_bytes} "
            f"| {_widths(facts.loads)} | {_widths(facts.stores)} | {facts.fma} "
            f"| {_kinds(facts.divisions)} | {_kinds(facts.square_roots)} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="compiling processes (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the table to write")
    args = parser.parse_args(argv)
    configs = full_matrix()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile everything, keep nothing
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            done = []
            for i, (config, facts, _) in enumerate(pool.map(_compile_one, configs, chunksize=4), 1):
                done.append((config, facts))
                if i % 60 == 0:
                    print(
                        f"{i}/{len(configs)} calls, {time.perf_counter() - start:.0f} s", flush=True
                    )
    seconds = time.perf_counter() - start
    text = render(done, seconds, args.jobs)
    args.out.write_text(text)
    broken = text.split("Claims broken: ", 1)[1].split(" ", 1)[0]
    print(f"wrote {args.out} ({seconds:.0f} s); claims broken in {broken} launches")
    return 0 if broken == "0" else 1


if __name__ == "__main__":
    raise SystemExit(main())
