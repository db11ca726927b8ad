"""Every code block of README.md and docs/*.md runs, so the docs cannot rot.

A ```python block says how it runs in an HTML comment on the line before it::

    <!-- run: 2 ranks, preamble model -->            two gloo ranks, the names of PREAMBLES["model"]
    <!-- run: 2 ranks, launched, preamble model -->   ... and the block starts the process group
                                                      itself, from torchrun's variables

All blocks of one rank count run in one launch of the ranks (``tests/spawn.py``), in document
order, each in a fresh namespace (its preamble first) and a folder of its own. A ```bash block
is checked instead of run: the repository files it names exist, and every flag it passes to a
script or module of this repository is in that script's ``--help``.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist

from sharded_rmsprop.distributed import destroy_distributed
from spawn import run_ranks

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]

_MODEL = '''
import os
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel import DistributedDataParallel as DDP
from sharded_rmsprop import ShardedRMSprop

class Net(nn.Module):
    """Two linear layers; the input is cast to the parameters' dtype (bfloat16 blocks)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x.to(self.layers[0].weight.dtype))

rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = Net()
device = torch.device("cpu")
loader = data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * rank + i))
                 for i in range(3)]
my_shard_of_the_data = loader[: 2 + rank]  # ranks with different numbers of batches
loss_fn = lambda output: output.square().mean()
'''

_OPT = (
    _MODEL
    + """
ddp_model = model = DDP(model)
opt = ShardedRMSprop(model.parameters(), lr=1e-3, momentum=0.9)
loss_fn(model(loader[0])).backward()
opt.step()
"""
)

#: What the fragments use and do not define, by the name a block's comment gives.
PREAMBLES = {
    "model": _MODEL,
    "opt": _OPT,
    "hf": """
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from sharded_rmsprop import ShardedRMSprop

class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}

args = TrainingArguments(
    output_dir="out", max_steps=2, save_steps=2, per_device_train_batch_size=2, use_cpu=True,
    report_to=[], disable_tqdm=True, seed=0,
)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
data = Tokens()
scheduler = None  # Trainer makes its own
""",
    "accelerate": """
import torch
from torch import nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from sharded_rmsprop import ShardedRMSprop

AcceleratorState._reset_state(True)  # (HF Trainer's block made one in this process)
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.randn(16, 8), torch.randn(16, 1)), batch_size=4
)
""",
}


@dataclass(frozen=True)
class Block:
    where: str  # "docs/usage.md:42", the line of the opening fence
    lang: str
    source: str
    run: str | None  # the comment's words after "run:", if any

    @property
    def how(self) -> tuple[int, bool, str | None]:
        """(ranks, launched, preamble) from the comment; ValueError if it says anything else."""
        words = [w.strip() for w in (self.run or "").split(",")]
        count = re.fullmatch(r"(\d+) ranks?", words[0])
        if count is None:
            raise ValueError(f"{self.where}: the run comment must start with 'N ranks'")
        launched, preamble = False, None
        for word in words[1:]:
            if word == "launched":
                launched = True
            elif word.startswith("preamble ") and word.split()[1] in PREAMBLES:
                preamble = word.split()[1]
            else:
                raise ValueError(f"{self.where}: the run comment says {word!r}")
        return int(count[1]), launched, preamble


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the run comment of each."""
    found, lines = [], path.read_text().splitlines()
    name = str(path.relative_to(ROOT))
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        comment = re.fullmatch(r"<!-- run: (.*) -->", lines[i - 1].strip()) if i else None
        found.append(
            Block(
                f"{name}:{i + 1}",
                fence[1],
                "\n".join(lines[i + 1 : end]) + "\n",
                comment[1] if comment else None,
            )
        )
        i = end + 1
    return found


ALL = [block for path in DOCS for block in blocks(path)]
PYTHON = [block for block in ALL if block.lang == "python"]
BASH = [block for block in ALL if block.lang == "bash"]


def test_the_docs_have_code_blocks_and_each_says_how_it_runs() -> None:
    assert len(PYTHON) >= 10 and len(BASH) >= 5
    assert {b.lang for b in ALL} <= {"python", "bash", "text"}, "a block of another language"
    for block in PYTHON:
        assert block.run is not None, f"{block.where}: no <!-- run: ... --> comment before it"
        block.how  # noqa: B018  (raises for words it does not know)
    for block in ALL:
        if block.lang != "python":
            assert block.run is None, f"{block.where}: only python blocks run"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_blocks(
    rank: int, world_size: int, todo: list[Block], ports: list[int], workdir: str
) -> list[str]:
    """Each block on this rank, as its comment says; the blocks it ran."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
    )  # fmt: skip
    gc.freeze()  # (torch's own objects: not scanned by every block's collect)
    ran = []
    for index, block in enumerate(todo):
        _, launched, preamble = block.how
        folder = os.path.join(workdir, f"block{index}")
        os.makedirs(folder, exist_ok=True)
        os.chdir(folder)
        os.environ["MASTER_PORT"] = str(ports[index])
        if launched:  # the block starts the group, as under torchrun
            destroy_distributed()
        elif not dist.is_initialized():
            store = f"file://{workdir}/store{index}"
            dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size)
        namespace: dict = {"__name__": "__main__"}
        try:
            exec(compile(PREAMBLES.get(preamble, ""), f"<preamble {preamble}>", "exec"), namespace)
            exec(compile(block.source, block.where, "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the block at {block.where} failed on rank {rank}") from error
        namespace.clear()
        gc.collect()  # (its optimizers and DDP models go before the group they were built on;
        gc.freeze()  # frozen, what is left is not scanned again: each collect stays short)
        if dist.is_initialized():
            dist.barrier()
        ran.append(block.where)
    if not dist.is_initialized():  # (the runner's last barrier needs one)
        store = f"file://{workdir}/store_end"
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size)
    return ran


#: The optional package each preamble needs (``pip install -e .[integrations]``).
NEEDS = {"hf": "transformers", "accelerate": "accelerate"}


@pytest.mark.across_ranks
@pytest.mark.parametrize("world_size", sorted({b.how[0] for b in PYTHON}))
def test_every_python_block_runs(world_size: int, tmp_path: Path) -> None:
    todo = [block for block in PYTHON if block.how[0] == world_size]
    missing = {n for n in NEEDS.values() if importlib.util.find_spec(n) is None}
    if missing:  # (as tests/test_integrations.py skips without its framework)
        warnings.warn(f"blocks that need {', '.join(sorted(missing))} are left out")
        todo = [block for block in todo if NEEDS.get(block.how[2]) not in missing]
    ports = _free_ports(len(todo))
    ran = run_ranks(world_size, run_blocks, todo, ports, str(tmp_path), timeout=300)
    assert ran == [[block.where for block in todo]] * world_size


# -- bash blocks: checked, not run -----------------------------------------------------------

_OURS = ("launch/", "tests/", "benchmarks/", "sharded_rmsprop/", "docs/")


def commands(block: Block) -> list[list[str]]:
    """The block's commands as words: continuation lines joined, comments dropped, split at
    ``&&``, ``;`` and ``|``."""
    text = block.source.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        words: list[str] = []
        for word in shlex.split(line, comments=True) + ["&&"]:
            if word in ("&&", ";", "|", "||"):
                if words:
                    found.append(words)
                words = []
            else:
                words.append(word)
    return found


def target(words: list[str]) -> tuple[list[str], list[str]] | None:
    """(the command that prints the help of the script or module of this repository that
    ``words`` runs, the words after it), or None."""
    for i, word in enumerate(words):
        if word.endswith(".py") and word.startswith(_OURS):
            return [sys.executable, word, "--help"], words[i + 1 :]
        if word == "-m" and words[i + 1].split(".")[0] in ("sharded_rmsprop", "benchmarks"):
            return [sys.executable, "-m", words[i + 1], "--help"], words[i + 2 :]
    return None


def test_every_bash_block_names_files_and_flags_that_exist() -> None:
    helps: dict[tuple[str, ...], subprocess.Popen] = {}
    flags: list[tuple[str, tuple[str, ...], str]] = []
    for block in BASH:
        for words in commands(block):
            for word in words:
                if word.startswith(_OURS) or word.endswith((".py", ".sh")):
                    assert (ROOT / word).exists(), f"{block.where}: {word} does not exist"
            found = target(words)
            if found is None:
                continue
            help_command, rest = found
            passed = [w.split("=")[0] for w in rest if w.startswith("--")]
            if not passed:  # (an example script may have no --help: it would run)
                continue
            key = tuple(help_command)
            if key not in helps:  # (all at once: each imports torch)
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                helps[key] = subprocess.Popen(
                    help_command, cwd=ROOT, env=env, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                )  # fmt: skip
            flags += [(block.where, key, flag) for flag in passed]
    assert helps, "no bash block runs a script of this repository"
    texts = {}
    for key, process in helps.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{' '.join(key)} failed:\n{out}"
        texts[key] = out
    for where, key, flag in flags:
        assert re.search(rf"{re.escape(flag)}(?![\w-])", texts[key]), (
            f"{where}: {flag} is not in the --help of {' '.join(key[1:-1])}"
        )


# -- links --------------------------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    text = re.sub(r"^```\w*\s*$.*?^```\s*$", "", path.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+ (.*)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_link_between_the_docs_leads_somewhere() -> None:
    links = 0
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
            if target.startswith("http"):
                continue
            linked = (path.parent / target).resolve() if target else path
            assert linked.exists(), f"{path.relative_to(ROOT)}: {target} does not exist"
            if anchor:
                assert anchor in anchors(linked), (
                    f"{path.relative_to(ROOT)}: no #{anchor} in {target}"
                )
            links += 1
    assert links >= 20
