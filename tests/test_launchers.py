"""``launch/train.py`` under real launchers beyond torchrun and MPICH's ``mpirun`` (those are in
tests/test_train_job.py): Slurm's ``srun`` on a one-node cluster these tests start, and Open
MPI's ``mpirun``.

Both come from the system's packages: as root with apt-get, the tests install what is missing
(``slurm-wlm`` and ``munge``; ``openmpi-bin``) once per session, non-interactively; elsewhere,
or where an install or a daemon fails, they skip and say why. ``SHARDED_RMSPROP_TEST_APT=0``
keeps them from installing. The cluster (munged, slurmctld, slurmd) runs from a temporary
directory with free ports and its own munge key and socket, in the foreground of processes
the fixture started and stops at the end: no systemd, no cgroups, nothing under /etc.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from test_train_job import MEMORY, REPO_ROOT, TINY, TRAIN, _describe, _env, summary

from sharded_rmsprop.distributed import _free_port, _point_mpi4py_at_open_mpi

APT_BUDGET_S = 240  # every apt-get call of one install together (index update, retry)
DAEMONS_UP_S = 30  # munged, slurmctld and slurmd up and the node idle
TIMEOUT_S = 120  # one launch
SLURM_CONF = Path(__file__).parent / "launchers" / "slurm.conf"
SBIN = ("/usr/sbin", "/sbin")

# Prints what the launch gave this rank: run by each launcher before the training job.
PROBE = """
import os, sharded_rmsprop
ctx = sharded_rmsprop.init_distributed()
extra = ""
if ctx.launcher == "mpi":
    from mpi4py import MPI
    extra = "library " + MPI.Get_library_version().split("\\0")[0].splitlines()[0].strip()
print(f"probe rank {ctx.rank} of {ctx.world_size} local {ctx.local_rank} {ctx.launcher} launch "
      f"job {os.environ.get('SLURM_JOB_ID')} {extra}", flush=True)
sharded_rmsprop.destroy_distributed()
"""
PROBE_LINE = re.compile(
    r"^probe rank (\d) of (\d+) local (\d+) (\w+) launch job (\S+) ?(.*)$", re.MULTILINE
)


def _apt_install(*packages: str) -> str | None:
    """Install ``packages`` with apt-get; ``None`` once they are in, else why they are not."""
    if os.environ.get("SHARDED_RMSPROP_TEST_APT") == "0":
        return "SHARDED_RMSPROP_TEST_APT=0: installing packages is off"
    if os.geteuid() != 0:
        return "installing packages needs root"
    apt = shutil.which("apt-get")
    if apt is None:
        return "no apt-get on this machine"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-q", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=60", *packages]
    deadline = time.monotonic() + APT_BUDGET_S
    apt_get = lambda command: subprocess.run(  # noqa: E731
        command, env=env, capture_output=True, text=True,
        timeout=max(1.0, deadline - time.monotonic()),
    )
    try:
        proc = apt_get(install)
        if proc.returncode != 0:  # an index that is missing or stale: update it, try again
            apt_get([apt, "update", "-q"])
            proc = apt_get(install)
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(packages)} took over {APT_BUDGET_S} s"
    if proc.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {proc.stderr.strip()[-500:]}"
    return None


def _run_bounded(command: list[str], env: dict[str, str], timeout: float):
    """``command`` run to its end, or, past ``timeout``, killed with everything it started
    (a launcher's ranks too) and its output so far returned with exit code -9."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _which(command: str) -> str | None:
    """``command``'s path, looked for in the daemons' folders too (a PATH may lack them)."""
    return shutil.which(command, path=os.pathsep.join((os.environ.get("PATH", ""), *SBIN)))


def _need(commands: tuple[str, ...], packages: tuple[str, ...]) -> dict[str, str]:
    """The paths of ``commands``, installing ``packages`` if one is missing; else a skip."""
    if not all(_which(command) for command in commands):
        reason = _apt_install(*packages)
        if reason is not None:
            pytest.skip(f"{', '.join(packages)} not installed: {reason}")
    paths = {command: _which(command) for command in commands}
    missing = [command for command, path in paths.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found after installing {', '.join(packages)}")
    return paths  # type: ignore[return-value]


def _tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# A one-node Slurm cluster


@dataclass(frozen=True)
class SlurmCluster:
    dir: Path
    node: str
    commands: dict[str, str]

    @property
    def env(self) -> dict[str, str]:
        """The variables its clients need: a launcher-free environment plus ``SLURM_CONF``."""
        return _env(SLURM_CONF=str(self.dir / "slurm.conf"))

    def run(self, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        command = [self.commands.get(args[0], args[0]), *args[1:]]
        return _run_bounded(command, self.env, timeout)

    def logs(self) -> str:
        return "\n".join(_tail(self.dir / name) for name in ("slurmctld.log", "slurmd.log"))


def _node_hardware(slurmd: str) -> str:
    """This machine's CPUs, sockets, cores and threads as ``slurmd -C`` sees them (the node
    would be drained if the configuration promised more); its memory is left out."""
    try:
        proc = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"CPUs={os.cpu_count() or 1}"
    fields = dict(re.findall(r"(\w+)=(\S+)", proc.stdout.splitlines()[0] if proc.stdout else ""))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    if proc.returncode != 0 or not all(key in fields for key in keys):
        return f"CPUs={os.cpu_count() or 1}"
    return " ".join(f"{key}={fields[key]}" for key in keys)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    commands = _need(("munged", "slurmctld", "slurmd", "srun", "sinfo", "scontrol"),
                     ("slurm-wlm", "munge"))
    if os.geteuid() != 0:
        pytest.skip("slurmd has to run as root")
    node = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(node)  # the job's first node is the master of its ranks
    except OSError:
        pytest.skip(f"this host's name {node!r} does not resolve")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    config = string.Template(SLURM_CONF.read_text()).substitute(
        dir=root, node=node, addr="127.0.0.1", ctld_port=_free_port(),
        slurmd_port=_free_port(), hardware=_node_hardware(commands["slurmd"]),
    )
    (root / "slurm.conf").write_text(config)
    conf = str(root / "slurm.conf")
    munge = root / "munge"
    daemons = [
        [commands["munged"], "--foreground", "--force", f"--socket={munge / 'munge.socket'}",
         f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
         f"--log-file={root / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
        [commands["slurmctld"], "-D", "-i", "-f", conf],
        [commands["slurmd"], "-D", "-f", conf, "-N", node],
    ]
    started: list[subprocess.Popen] = []
    cluster = SlurmCluster(root, node, commands)
    try:
        for daemon in daemons:
            with open(root / f"{Path(daemon[0]).name}.out", "wb") as log:
                started.append(subprocess.Popen(daemon, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=cluster.env))
            if daemon is daemons[0]:  # slurmctld needs munge
                _wait_for((munge / "munge.socket").exists, "munged's socket", started, root)
        state = lambda: cluster.run(  # noqa: E731  ("" while sinfo gets no answer)
            "sinfo", "-h", "-N", "-n", node, "-o", "%T", timeout=10
        ).stdout.strip()
        _wait_for(lambda: state() == "idle", f"node {node} idle", started, root)
        yield cluster
    finally:
        for proc in reversed(started):
            proc.terminate()
        for proc in reversed(started):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for(ready, what: str, daemons: list[subprocess.Popen], root: Path) -> None:
    deadline = time.monotonic() + DAEMONS_UP_S
    while not ready():
        exited = [proc.args[0] for proc in daemons if proc.poll() is not None]
        if exited or time.monotonic() > deadline:
            found = sorted([*root.glob("*.log"), *root.glob("*.out")])
            logs = "\n".join(_tail(path) for path in found)
            why = f"{', '.join(exited)} exited" if exited else f"not within {DAEMONS_UP_S} s"
            pytest.skip(f"the one-node Slurm cluster did not come up ({what}: {why})\n{logs}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Open MPI


@pytest.fixture(scope="session")
def open_mpi_run() -> list[str]:
    """Open MPI's ``mpirun`` by its own name (the venv's ``mpirun`` is MPICH's), with the
    flags a root user in a container needs."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py)")
    import mpi4py

    if tuple(int(part) for part in re.findall(r"\d+", mpi4py.__version__)[:2]) < (4, 1):
        pytest.skip(f"mpi4py {mpi4py.__version__} predates the wheels that load Open MPI (4.1)")
    mpirun = _need(("mpirun.openmpi",), ("openmpi-bin",))["mpirun.openmpi"]
    version = _run_bounded([mpirun, "--version"], dict(os.environ), 30)
    if not re.search(r"Open MPI|OpenRTE|open-mpi\.org", version.stdout + version.stderr):
        pytest.skip(f"{mpirun} is not Open MPI's: {version.stdout.strip()[:200]}")
    return [mpirun, "--allow-run-as-root", "--oversubscribe"]


# ---------------------------------------------------------------------------------------------
# Checks


def probe_lines(proc: subprocess.CompletedProcess[str]) -> dict[int, re.Match]:
    assert proc.returncode == 0, _describe(proc)
    lines = {int(m.group(1)): m for m in PROBE_LINE.finditer(proc.stdout)}
    assert set(lines) == {0, 1}, _describe(proc)
    assert all(m.group(2) == "2" for m in lines.values()), _describe(proc)
    assert {int(m.group(3)) for m in lines.values()} == {0, 1}, _describe(proc)  # one node
    return lines


def assert_trained(proc: subprocess.CompletedProcess[str], launcher: str) -> None:
    """What tests/test_train_job.py checks of its launches: exit 0, finite losses, both ranks'
    shards, 2 ranks under ``launcher``. (Open MPI gives ranks a terminal, so rank 0's progress
    is redrawn in place: lines are split at carriage returns too.)"""
    assert proc.returncode == 0, _describe(proc)
    summary(proc)
    assert f"world size 2 ({launcher} launch, gloo backend" in proc.stdout, _describe(proc)
    ranks = {int(m.group(1)) for m in MEMORY.finditer(proc.stdout)}
    assert ranks == {0, 1}, _describe(proc)
    lines = [line for line in re.split(r"[\r\n]", proc.stdout) if line.strip()]
    assert not any(line.startswith("[rank1]") for line in lines), _describe(proc)


# ---------------------------------------------------------------------------------------------
# The launches


def test_srun_two_tasks(slurm_cluster: SlurmCluster) -> None:
    srun = ("srun", "-N", "1", "-n", "2", "--time", "5", "--kill-on-bad-exit=1")
    probe = slurm_cluster.run(*srun, sys.executable, "-c", PROBE)
    lines = probe_lines(probe)
    jobs = {m.group(5) for m in lines.values()}
    assert all(m.group(4) == "slurm" for m in lines.values()), _describe(probe)
    assert len(jobs) == 1 and jobs != {"None"}, _describe(probe)  # one Slurm job, both tasks
    probe_job = jobs.pop()

    proc = slurm_cluster.run(*srun, sys.executable, TRAIN, "--max-steps", "3", *TINY)
    assert_trained(proc, "slurm")
    # the controller ran it: a job besides the probe's is on its books, ended (COMPLETING
    # while slurmd tidies up, then COMPLETED) with exit code 0, with 2 tasks
    books = slurm_cluster.run("scontrol", "--oneliner", "show", "job").stdout.splitlines()
    others = [job for job in books if not job.startswith(f"JobId={probe_job} ")]
    ended = ("JobState=COMPLET", "ExitCode=0:0", "NumTasks=2")
    assert any(all(word in job for word in ended) for job in others), (
        "\n".join(books) + "\n" + slurm_cluster.logs()
    )


def test_open_mpi_mpirun_two_ranks(open_mpi_run: list[str]) -> None:
    """The mpi4py of ``pip install ".[mpi]"`` finds the mpich wheel's library first; under
    Open MPI, init_distributed points it at Open MPI's (without, MPICH's MPI_Init aborts)."""
    env = _env()
    assert "MPI4PY_LIBMPI" not in env and "MPI4PY_MPIABI" not in env
    run = lambda *args: _run_bounded(  # noqa: E731
        [*open_mpi_run, "-n", "2", sys.executable, *args], env, TIMEOUT_S
    )
    probe = run("-c", PROBE)
    lines = probe_lines(probe)
    assert all(m.group(4) == "mpi" for m in lines.values()), _describe(probe)
    assert all(m.group(6).startswith("library Open MPI") for m in lines.values()), _describe(probe)

    assert_trained(run(TRAIN, "--max-steps", "3", *TINY), "mpi")


def test_only_an_open_mpi_launch_points_mpi4py_at_open_mpi(monkeypatch) -> None:
    """The choice of library the Open MPI launch above relies on, case by case: only Open
    MPI's variables set it, a choice already made stays, and so does an MPI already loaded."""
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    env = {"OMPI_COMM_WORLD_SIZE": "2"}
    assert _point_mpi4py_at_open_mpi(env)
    assert env["MPI4PY_LIBMPI"].split(os.pathsep) == [
        os.path.join(sys.prefix, "lib", "libmpi.so.40"), "libmpi.so.40"
    ]
    for env in (
        {}, {"PMI_SIZE": "2"}, {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"},
        {"OMPI_COMM_WORLD_SIZE": "2", "MPI4PY_LIBMPI": "/opt/mpi/lib/libmpi.so"},
        {"OMPI_COMM_WORLD_SIZE": "2", "MPI4PY_MPIABI": "openmpi"},
    ):
        before = dict(env)
        assert not _point_mpi4py_at_open_mpi(env) and env == before
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", sys)  # (any module: "already imported")
    env = {"OMPI_COMM_WORLD_SIZE": "2"}
    assert not _point_mpi4py_at_open_mpi(env) and "MPI4PY_LIBMPI" not in env
