"""Finding this process's rank under every supported launcher, and starting torch.distributed.

Sources, first match wins:

* ``RANK``/``WORLD_SIZE`` (DeepSpeed's launcher, torchrun, ``deepspeed --launcher ...``);
* SLURM's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS`` in an ``srun`` step (``launch/slurm.sbatch``);
* MPI (``mpirun -n N python train.py``): ranks from mpi4py, rank 0's address and a
  free port broadcast over MPI;
* nothing: one process holding both towers.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from alexnet_dist.exchanges import broadcast_object

__all__ = [
    "LAUNCHER_COMMANDS", "LaunchInfo", "PortInUse", "ReportedOnRank0", "VERBOSE", "discover", "free_port",
    "init_distributed", "is_rank0", "keep_freed_memory", "launcher_ancestors", "quiet_libraries",
    "shared_from_rank0", "spawn_ranks", "unlink_deepspeed_shm",
]

MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
# Set (to anything) to see the libraries' own start-up lines, which are kept out by default.
VERBOSE = "ALEXNET_DIST_VERBOSE"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _slurm_master(nodelist: str) -> str:
    """First host of a SLURM node list ("n[01-04],m1" -> "n01")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        head = nodelist.split(",")[0]
        if "[" not in head:
            return head
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]


def _from_mpi() -> LaunchInfo:
    from mpi4py import MPI  # imported only under mpirun: it initialises MPI

    comm = MPI.COMM_WORLD
    addr, port = (socket.gethostname(), free_port()) if comm.Get_rank() == 0 else (None, None)
    addr, port = comm.bcast((addr, port), root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return LaunchInfo(comm.Get_rank(), comm.Get_size(), local, addr, port, "mpi")


def discover() -> LaunchInfo:
    """Where this process stands, from the launcher's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "env",
        )
    mpi_rank = next((env[v] for v in MPI_RANK_VARS if v in env), None)
    # Only a task of an srun step is a SLURM rank (the batch script itself also sees
    # SLURM_PROCID=0); mpirun inside an allocation sets its own ranks, which then win.
    in_step = "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1
    if in_step and mpi_rank in (None, env["SLURM_PROCID"]):
        return LaunchInfo(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_STEP_NUM_TASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or _slurm_master(env["SLURM_JOB_NODELIST"]),
            int(env.get("MASTER_PORT", 29500)),
            "slurm",
        )
    if mpi_rank is not None:
        return _from_mpi()
    return LaunchInfo(0, 1, 0, "127.0.0.1", 0, "single")


# Programs and modules that launch ranks: an ancestor running one of them is a launcher.
LAUNCHER_COMMANDS = frozenset({
    "deepspeed", "deepspeed.launcher.launch", "deepspeed.launcher.runner",
    "torchrun", "torch.distributed.run", "torch.distributed.launch",
    "mpirun", "mpiexec", "mpiexec.hydra", "hydra_pmi_proxy",
})


def _launcher_name(proc: psutil.Process) -> str | None:
    """The launcher ``proc`` runs: its program, or the script or module its interpreter runs
    (``python -u -m deepspeed.launcher.launch ...``); None for anything else."""
    return next((Path(arg).name for arg in proc.cmdline()[:4] if Path(arg).name in LAUNCHER_COMMANDS), None)


def launcher_ancestors(pid: int | None = None) -> list[tuple[psutil.Process, str]]:
    """The launchers above process ``pid`` (default: this one) with their names, nearest
    first: its parent and grandparents while each is a launcher. Empty when started
    otherwise (python train.py, a test)."""
    chain = []
    try:
        proc = psutil.Process(pid).parent()
        while proc is not None and proc.pid > 1 and (name := _launcher_name(proc)):
            chain.append((proc, name))
            proc = proc.parent()
    except psutil.Error:  # an ancestor exited while we looked: watch what was found
        pass
    return chain


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the
    kernel; True where it took (not on other C libraries).

    By default glibc trims the heap's free top and unmaps large blocks when they are
    freed, so a training step on a CPU, which frees its batch and activations when it
    ends, page-faults them in again, freshly zeroed, on the next one: the feed's
    normalisation took over twice as long (docs/BENCHMARKS.md).
    Blocks of 32 MiB or more still get their own mapping, returned when freed.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def quiet_libraries() -> None:
    """Keep the lines DeepSpeed and torch print on every start of a rank out of the user's
    view (unless :data:`VERBOSE` is set): DeepSpeed's "Setting accelerator to CPU" (its
    accelerator named up front instead of guessed) and torch's "No CUDA runtime is found"
    when it compiles or loads a CPU extension. Call before DeepSpeed is imported."""
    if os.environ.get(VERBOSE):
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class PortInUse(RuntimeError):
    """Another job holds this job's master port; the message is the one line the user sees."""

    def __init__(self, info: LaunchInfo, holder: str) -> None:
        super().__init__(
            f"port {info.master_port} on {info.master_addr} is in use by another job ({holder}): give each job "
            "on a machine its own port (deepspeed --master_port P, torchrun --master-port P, or MASTER_PORT=P)")


def _owner(launched_by: list[tuple[psutil.Process, str]]) -> str:
    """``host launcher-pid``: whose store this is, as a rank of the same host can check it
    (launchers start a host's ranks together); ``host -`` without a launcher."""
    return f"{socket.gethostname()} {launched_by[0][0].pid if launched_by else '-'}"


def _join_store(info: LaunchInfo, timeout: datetime.timedelta) -> dist.Store:
    """The job's store at the master's address, checked to be this job's own (:func:`_check_owner`),
    or, under torchrun, the part of its agent's store that belongs to this start of the job
    (:func:`_this_start`)."""
    url = f"tcp://{info.master_addr}:{info.master_port}"
    try:
        store, _, _ = next(dist.rendezvous(url, rank=info.rank, world_size=info.world_size, timeout=timeout))
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        raise PortInUse(info, "it listens there already") from None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return _this_start(store, info, timeout)
    _check_owner(store, info)
    return store


def _check_owner(store: dist.Store, info: LaunchInfo) -> None:
    """Refuse this process when the store belongs to another job.

    Two jobs started on one port meet at the first one's store: the second's rank 0 cannot
    listen there, while its other ranks connect to the first job's store and, unchecked,
    take the first job's ranks' places in its rendezvous (the innocent job then hung until
    its timeout). So rank 0 writes down who it is: a rank on the same host under another
    launcher is in another job and leaves before writing anything. Each rank then claims
    its number; the first claim stands (what tells jobs apart across hosts).
    """
    mine = _owner(launcher_ancestors())
    if info.rank == 0:
        store.set("alexnet_dist/owner", mine)
    owner = store.get("alexnet_dist/owner").decode()
    (host, launcher), (my_host, my_launcher) = owner.split(), mine.split()
    if host == my_host and "-" not in (launcher, my_launcher) and launcher != my_launcher:
        raise PortInUse(info, f"its rank 0 runs under launcher pid {launcher} on {host}")
    me = f"pid {os.getpid()} on {my_host}"
    holder = store.compare_set(f"alexnet_dist/rank{info.rank}", "", me).decode()
    if holder != me:
        raise PortInUse(info, f"its rank {info.rank} is {holder}")


_STALE_TOKEN_S = 2.0  # how long a rank waits for an answer before it reads the start's token again


def _this_start(store: dist.Store, info: LaunchInfo, timeout: datetime.timedelta) -> dist.Store:
    """The keys of this start of the job, as a prefix of torchrun's store.

    torchrun's agent keeps one store for every restart of the job, and nothing its ranks
    are told changes between restarts: the keys an earlier start left (gloo's addresses
    among them) would be read as this one's, and the restarted ranks could not connect.
    Rank 0 names this start with a token; each rank reads it and says hello with a nonce
    of its own, which only a live rank 0 of this start answers. A token left by an
    earlier start goes unanswered, and the rank reads the token again.
    """
    if info.rank == 0:
        token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        store.set("alexnet_dist/start", token)
        for rank in range(1, info.world_size):
            hello = f"alexnet_dist/{token}/hello{rank}"
            store.wait([hello], timeout)
            store.set(f"alexnet_dist/{token}/welcome/{store.get(hello).decode()}", "")
        return dist.PrefixStore(f"alexnet_dist/{token}/", store)
    nonce, deadline = f"{socket.gethostname()}:{os.getpid()}", time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        token = store.get("alexnet_dist/start").decode()
        store.set(f"alexnet_dist/{token}/hello{info.rank}", nonce)
        if _appears(store, f"alexnet_dist/{token}/welcome/{nonce}", _STALE_TOKEN_S):
            return dist.PrefixStore(f"alexnet_dist/{token}/", store)
    raise dist.DistStoreError(f"rank 0 of this start of the job did not answer within {timeout.total_seconds():.0f} s")


def _appears(store: dist.Store, key: str, seconds: float) -> bool:
    """Whether ``key`` is in the store within ``seconds``. Polled: a TCPStore client whose
    ``wait`` timed out reads the late answer as the reply to its next request."""
    deadline = time.monotonic() + seconds
    while not store.check([key]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def init_distributed(info: LaunchInfo, timeout_s: float = 300.0) -> tuple[torch.device, dist.Store]:
    """Start the default process group (gloo on CPU, NCCL on GPUs); return this rank's
    device and the job's store (the rendezvous' key-value store, which
    :mod:`alexnet_dist.faults` also uses when a rank fails).

    ``timeout_s`` bounds every collective, so a dead rank makes the others fail
    instead of waiting for ever. On CPUs the step's tensors live in this process's
    heap, so it also keeps freed memory for the next step (:func:`keep_freed_memory`).
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        keep_freed_memory()
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed reads these (whatever launcher, or none, found the rank).
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank))
    # NCCL told its GPU up front binds each communicator to it (otherwise it guesses from the rank).
    bound = {"device_id": device} if device.type == "cuda" else {}
    if info.world_size == 1:
        store = dist.HashStore()
    else:
        os.environ.update(MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
        store = _join_store(info, timeout)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout,
                            **bound)
    return device, store


def unlink_deepspeed_shm() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm. Collective.

    With every rank on one host (the launcher's LOCAL_SIZE equals the world size),
    DeepSpeed 0.19.8 backs its CPU all-reduce with one 69 MB /dev/shm file per rank and
    never unlinks it (ops/csrc/cpu/comm/shm.cpp): each run would leave them in RAM for
    good. An unlinked file stays mapped where it is open; after the barrier every rank
    has opened every file, so each rank can drop its own name right after DeepSpeed starts.
    """
    if dist.get_world_size() > 1:
        dist.barrier()
    env = os.environ
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):  # DeepSpeed made none (ranks on several hosts, GPUs)
        os.unlink(os.path.join("/dev/shm", name))


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class ReportedOnRank0(Exception):
    """A user error that global rank 0 reports; the other ranks exit with it quietly."""


def shared_from_rank0(fn, user_errors: tuple[type[Exception], ...]):
    """Run ``fn`` on global rank 0 and hand its result to every rank. Collective.

    One of ``user_errors`` raised there is raised on rank 0 as it is and as
    :class:`ReportedOnRank0` on the others, so the user reads the line once.
    """
    outcome = None
    if is_rank0():
        try:
            outcome = ("ok", fn())
        except user_errors as e:
            outcome = ("error", e)
    status, value = broadcast_object(outcome)
    if status == "error":
        raise value if is_rank0() else ReportedOnRank0(str(value))
    return value


def _spawned(rank: int, world_size: int, port: int, threads: int, fn, args: tuple) -> None:
    quiet_libraries()
    torch.set_num_threads(threads)
    init_distributed(LaunchInfo(rank, world_size, rank, "127.0.0.1", port, "spawn"), timeout_s=300)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(world_size: int, fn, *args, threads: int | None = None) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` new processes joined by a
    process group on this machine (the tests and the benchmark start their own ranks).

    ``fn`` must live at module level (spawn pickles it by name). A rank that raises
    makes this raise, after the other ranks are terminated. ``threads``: torch threads
    per rank (default: this machine's cores shared out).
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    mp.start_processes(_spawned, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, start_method="spawn")
