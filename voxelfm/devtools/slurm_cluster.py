"""A throw-away single-node SLURM cluster on this machine, for testing the slurm profile.

Runs munged, MariaDB + slurmdbd (accounting: the Snakemake executor plugin tracks jobs with
``sacct``), slurmctld and slurmd in the foreground of processes it starts itself, records
their PIDs in ``<state dir>/pids.json`` and stops exactly those PIDs again. Needs root and
Debian/Ubuntu packages (``install`` runs apt-get); no systemd and no cgroups are needed.

The node advertises more than the machine has (``SlurmdParameters=config_overrides``): 64
CPUs, 1 TB of memory and four fake H100s (``gres.conf`` pointing at device files made with
``mknod``), so the slurm profile's real per-rule requests (4 GPUs and 256 GB for
pretraining) are accepted as they are; partitions ``cpu`` and ``gpu`` are the profile's
names. Jobs see ``CUDA_VISIBLE_DEVICES`` but no CUDA: they run on CPU only where
``VOXELFM_ALLOW_CPU_FALLBACK=1`` says so (``voxelfm.utils.gpu``).

Usage (as root)::

    python -m voxelfm.devtools.slurm_cluster install        # apt-get, once (~90 s)
    python -m voxelfm.devtools.slurm_cluster start          # ~12 s; prints the PIDs
    python -m voxelfm.devtools.slurm_cluster status
    python -m voxelfm.devtools.slurm_cluster stop           # cancels jobs, stops those PIDs

The configuration goes to ``/etc/slurm`` (where every SLURM client looks) and is marked as
written by this tool; an existing configuration without that mark is never overwritten.
Everything else (spool, state, database, logs, fake devices) lives in the state folder,
``/tmp/voxelfm-slurm`` unless ``--state-dir`` or ``$VOXELFM_SLURM_STATE`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
BINARIES = (
    "munged",
    "mariadbd",
    "mariadb-install-db",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sacctmgr",
)
MARK = "# written by voxelfm.devtools.slurm_cluster"
SLURM_ETC = Path("/etc/slurm")
CLUSTER = "voxelfm-dev"
DBD_PORT = 6819
CTLD_PORT = 6817
NODE_CPUS = 64
NODE_MEMORY_MB = 1_024_000
GPU_TYPE = "h100"
DB_USER = "slurm"
DB_NAME = "slurm_acct_db"
# Start order; stop goes in reverse.
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


class ClusterError(RuntimeError):
    """The cluster cannot be installed or started here (the message says why)."""


@dataclass
class Cluster:
    state_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("VOXELFM_SLURM_STATE", "/tmp/voxelfm-slurm"))
    )
    gpus: int = 4
    account: str = "voxelfm"
    users: tuple[str, ...] = ("root",)
    db_port: int = 13306
    niceness: int = 10

    # -- paths ---------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def node(self) -> str:
        return socket.gethostname().split(".")[0]

    def log(self, daemon: str) -> Path:
        return self.state_dir / "log" / f"{daemon}.log"

    # -- install -------------------------------------------------------------------------
    @staticmethod
    def missing_binaries() -> list[str]:
        return [b for b in BINARIES if shutil.which(b, path=_sbin_path()) is None]

    def install(self) -> None:
        """apt-get update and install the packages, unless every daemon is already there."""
        if not self.missing_binaries():
            print("slurm, slurmdbd, munge and mariadb are installed")
            return
        _require_root()
        if shutil.which("apt-get") is None:
            raise ClusterError("apt-get not found: install slurm-wlm, slurmdbd, munge, mariadb")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        ):
            print("+", " ".join(command), flush=True)
            if subprocess.run(command, env=env, check=False).returncode != 0:
                raise ClusterError(f"{' '.join(command)} failed")
        missing = self.missing_binaries()
        if missing:
            raise ClusterError(f"still missing after apt-get: {', '.join(missing)}")

    # -- start ---------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> dict[str, int]:
        """Start every daemon (stopping a previous instance of ours first); returns the PIDs."""
        _require_root()
        missing = self.missing_binaries()
        if missing:
            raise ClusterError(f"not installed: {', '.join(missing)} (run `install` first)")
        if self.pid_file.exists():
            self.stop()
        for sub in ("log", "ctld", "slurmd", "dev", "run"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._make_fake_gpus()
        pids: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        try:
            pids["munged"] = self._start_munged()
            self._save(pids)
            pids["mariadbd"] = self._start_mariadb(deadline)
            self._save(pids)
            pids["slurmdbd"] = self._spawn("slurmdbd", ["slurmdbd", "-D"])
            self._save(pids)
            _wait_for_port(DBD_PORT, deadline, "slurmdbd", self.log("slurmdbd"))
            self._sacctmgr("add", "cluster", CLUSTER)
            pids["slurmctld"] = self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            self._save(pids)
            _wait_for_port(CTLD_PORT, deadline, "slurmctld", self.log("slurmctld"))
            self._sacctmgr(
                "add",
                "account",
                self.account,
                f"Cluster={CLUSTER}",
                "Description=voxelfm-tests",
                "Organization=voxelfm",
            )
            for user in self.users:
                self._sacctmgr("add", "user", user, f"Account={self.account}", f"Cluster={CLUSTER}")
            pids["slurmd"] = self._spawn("slurmd", ["slurmd", "-D"])
            self._save(pids)
            self._wait_for_idle_node(deadline)
        except BaseException:
            self.stop()
            raise
        return pids

    def _write_config(self) -> None:
        for name in ("slurm.conf", "slurmdbd.conf", "gres.conf"):
            existing = SLURM_ETC / name
            if existing.exists() and MARK not in existing.read_text(errors="replace"):
                raise ClusterError(
                    f"{existing} exists and was not written by this tool; not overwriting it"
                )
        s = self.state_dir
        node = self.node
        devices = f"{s}/dev/nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else f"{s}/dev/nvidia0"
        slurm_conf = f"""{MARK}
ClusterName={CLUSTER}
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
# No cgroups on this machine (a cgroup.conf with CgroupPlugin=disabled is rejected by 22.05).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs share the node; the node advertises more than the machine has.
DefMemPerCPU=1000
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
# Keep finished jobs visible to squeue for 5 minutes.
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={DBD_PORT}
AccountingStorageEnforce=associations
# sacct shows the comment the executor plugin gives each job (rule_<name>_wildcards_...).
AccountingStoreFlags=job_comment
# sacct's AllocTRES then shows the GPUs a job got (gres/gpu=N).
AccountingStorageTRES=gres/gpu
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/slurmd
SlurmctldPidFile={s}/run/slurmctld.pid
SlurmdPidFile={s}/run/slurmd.pid
SlurmctldLogFile={self.log("slurmctld")}
SlurmdLogFile={self.log("slurmd")}
SlurmctldPort={CTLD_PORT}
NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} \
Gres=gpu:{GPU_TYPE}:{self.gpus} State=UNKNOWN
PartitionName=cpu Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={node} MaxTime=INFINITE State=UP
"""
        gres_conf = f"""{MARK}
AutoDetect=off
NodeName={node} Name=gpu Type={GPU_TYPE} File={devices}
"""
        dbd_conf = f"""{MARK}
AuthType=auth/munge
DbdHost=localhost
DbdPort={DBD_PORT}
SlurmUser=root
LogFile={self.log("slurmdbd")}
PidFile={s}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser={DB_USER}
StoragePass={self._db_password()}
StorageLoc={DB_NAME}
"""
        SLURM_ETC.mkdir(parents=True, exist_ok=True)
        for name, text, mode in (
            ("slurm.conf", slurm_conf, 0o644),
            ("gres.conf", gres_conf, 0o644),
            ("slurmdbd.conf", dbd_conf, 0o600),  # slurmdbd refuses a readable one
        ):
            path = SLURM_ETC / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text)
            tmp.chmod(mode)
            tmp.replace(path)

    def _db_password(self) -> str:
        """A random password for the local database user, kept in the state folder."""
        path = self.state_dir / "db_password"
        if not path.exists():
            path.write_text(os.urandom(12).hex())
            path.chmod(0o600)
        return path.read_text().strip()

    def _make_fake_gpus(self) -> None:
        for index in range(self.gpus):
            device = self.state_dir / "dev" / f"nvidia{index}"
            if not device.exists():
                os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(195, index))

    def _spawn(self, name: str, command: list[str], user: str | None = None) -> int:
        """Start a daemon in the foreground of its own process, niced; `nice` execs it, so the
        PID returned is the daemon's own."""
        log = open(self.log(name), "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            ["nice", "-n", str(self.niceness), *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
            env={**os.environ, "PATH": _sbin_path()},
        )
        log.close()
        time.sleep(0.2)
        if process.poll() is not None:
            raise ClusterError(
                f"{name} exited at once ({process.returncode}); see {self.log(name)}"
            )
        return process.pid

    def _start_munged(self) -> int:
        for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], check=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        pid = self._spawn("munged", ["munged", "--foreground", "--force"], user="munge")
        deadline = time.monotonic() + 15
        while not Path("/run/munge/munge.socket.2").exists():
            if time.monotonic() > deadline:
                raise ClusterError(f"munged did not open its socket; see {self.log('munged')}")
            time.sleep(0.2)
        return pid

    def _start_mariadb(self, deadline: float) -> int:
        data = self.state_dir / "mysql"
        sock = self.state_dir / "run" / "mysqld.sock"
        if not (data / "mysql").is_dir():
            subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                 "--skip-test-db", "--auth-root-authentication-method=socket"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        pid = self._spawn(
            "mariadbd",
            ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={sock}",
             f"--port={self.db_port}", "--bind-address=127.0.0.1", "--user=root",
             "--skip-name-resolve", f"--pid-file={self.state_dir}/run/mariadbd.pid",
             "--innodb-buffer-pool-size=32M", "--innodb-use-native-aio=0",
             "--performance-schema=OFF"],
        )  # fmt: skip
        _wait_for_port(self.db_port, deadline, "mariadbd", self.log("mariadbd"))
        password = self._db_password()
        grants = " ".join(
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY '{password}';"
            f" GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'{host}';"
            for host in ("127.0.0.1", "localhost")
        )
        subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root", "-e", grants],
            check=True,
        )
        return pid

    def _sacctmgr(self, *args: str) -> None:
        """``sacctmgr -i add ...``; an entry that already exists is fine."""
        result = subprocess.run(
            ["sacctmgr", "-i", *args], capture_output=True, text=True, check=False
        )
        text = result.stdout + result.stderr
        if result.returncode != 0 and "Nothing new added" not in text and "already" not in text:
            raise ClusterError(f"sacctmgr {' '.join(args)} failed: {text.strip()}")

    def _wait_for_idle_node(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            result = subprocess.run(
                ["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            state = result.stdout.strip().split("\n")[0] if result.returncode == 0 else ""
            if state.startswith(("idle", "mixed")):
                return
            if state.startswith(("down", "drain")):
                subprocess.run(
                    ["scontrol", "update", f"NodeName={self.node}", "State=RESUME"], check=False
                )
            time.sleep(0.5)
        raise ClusterError(
            f"node {self.node} not idle (state {state!r}); see {self.log('slurmd')} and "
            f"{self.log('slurmctld')}"
        )

    def _save(self, pids: dict[str, int]) -> None:
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids, indent=1))
        tmp.replace(self.pid_file)

    # -- stop ----------------------------------------------------------------------------
    def running(self) -> dict[str, int]:
        """The recorded daemons that are still alive (and are still the same program)."""
        if not self.pid_file.exists():
            return {}
        pids = json.loads(self.pid_file.read_text())
        return {name: pid for name, pid in pids.items() if _is_process(pid, name)}

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel this cluster's jobs, then stop exactly the recorded daemons, newest first."""
        alive = self.running()
        if "slurmctld" in alive:
            jobs = subprocess.run(
                ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=False
            ).stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs], check=False)
                time.sleep(1)
        for name in reversed(DAEMONS):
            pid = alive.get(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_process(pid, name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_process(pid, name):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> str:
        alive = self.running()
        lines = [f"{name}: pid {pid}" for name, pid in alive.items()] or ["no daemon running"]
        if "slurmctld" in alive:
            sinfo = subprocess.run(["sinfo"], capture_output=True, text=True, check=False)
            lines.append(sinfo.stdout.rstrip())
        return "\n".join(lines)


def _sbin_path() -> str:
    path = os.environ.get("PATH", "")
    extra = [p for p in ("/usr/sbin", "/sbin", "/usr/bin") if p not in path.split(os.pathsep)]
    return os.pathsep.join([path, *extra]) if path else os.pathsep.join(extra)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError("needs root (it installs packages and starts system daemons)")


def _is_process(pid: int, name: str) -> bool:
    """True if ``pid`` is alive and runs the program ``name`` (not a recycled PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and any(
        Path(arg.decode(errors="replace")).name == name for arg in cmdline[:3]
    )


def _reap(pid: int) -> None:
    """Collect the exit status of a daemon this process started (no zombie is left behind
    while, e.g., a test session that started the cluster keeps running)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:  # not our child: its parent or init collects it
            return
        time.sleep(0.1)


def _wait_for_port(port: int, deadline: float, name: str, log: Path) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ClusterError(f"{name} is not listening on port {port}; see {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voxelfm.devtools.slurm_cluster",
        description="A single-node SLURM cluster on this machine, for tests (needs root).",
    )
    parser.add_argument("action", choices=("install", "start", "stop", "status"))
    parser.add_argument(
        "--state-dir", type=Path, help="default $VOXELFM_SLURM_STATE or /tmp/voxelfm-slurm"
    )
    parser.add_argument("--gpus", type=int, default=4, help="fake GPUs the node advertises")
    parser.add_argument("--account", default="voxelfm", help="SLURM account for the users")
    parser.add_argument("--user", action="append", help="users of the account (default root)")
    args = parser.parse_args(argv)
    cluster = Cluster(gpus=args.gpus, account=args.account, users=tuple(args.user or ["root"]))
    if args.state_dir:
        cluster.state_dir = args.state_dir
    try:
        if args.action == "install":
            cluster.install()
        elif args.action == "start":
            started = time.monotonic()
            pids = cluster.start()
            print(f"cluster {CLUSTER} up in {time.monotonic() - started:.1f} s; PIDs {pids}")
            print(f"account {cluster.account}; partitions cpu, gpu; state {cluster.state_dir}")
        elif args.action == "stop":
            cluster.stop()
            print("stopped")
        else:
            print(cluster.status())
    except ClusterError as error:
        print(f"slurm_cluster: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
