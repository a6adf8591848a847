"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's
`slurm-wlm` and `munge` packages (tests/system-deps.sh installs them), started here and
stopped here by pid.

Everything runs inside a private network namespace (`unshare --net`) that holds only the
loopback interface: the daemons, every `sbatch`/`squeue`/`scontrol` call, the `qkov run`
processes and the Dask schedulers and workers of the jobs. So every listening socket of the
cluster is on loopback by construction (slurmctld and slurmd bind every address of their
namespace; there is no other), the standard ports (6817/6818, Dask's 8786/8787) cannot
clash with anything on the machine, and the cluster's processes are exactly the processes
in that namespace, which `stop()` ends one pid at a time.

The namespace's `lo` carries a second loopback address (127.0.0.2): Slurm resolves
addresses with AI_ADDRCONFIG, which finds nothing while 127.0.0.1 is the only IPv4
address configured.

State, spool, logs, the munge key and socket all live in one temporary folder. The
slurm.conf written here is the one `deploy/slurm/README.md` documents (`slurm_conf()`).
The node advertises two GPUs as a counted GRES bound to /dev/null and /dev/zero (no device
is touched: TaskPlugin=task/none sets no device limits), so the recipes' `--gres=gpu:1`
and `--gpus-per-task=1` run unchanged; CUDA_VISIBLE_DEVICES points at GPUs that a CPU-only
torch does not see.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun", "unshare", "nsenter", "ip")
NODE_CPUS = 8  # configured, not detected (SlurmdParameters=config_overrides): room for a batch job and its workers
NODE_MEMORY_MB = 16000
PARTITION = "debug"
CRED_EXPIRE_S = 10  # job credential lifetime; a requeued job starts again after it (the default 120 s is slow for tests)


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster (the message says what is missing)."""


def missing_parts() -> list[str]:
    """Programs the cluster needs that are not installed."""
    return [p for p in DAEMONS + COMMANDS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def slurm_conf(root: Path, host: str) -> str:
    """The cluster's slurm.conf: one node, one partition, no accounting, no cgroups."""
    return f"""\
# qkov's single-node test cluster (tests/slurm_cluster.py); see deploy/slurm/README.md
ClusterName=qkovtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it starts again
AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups: processes are tracked through /proc, tasks are not confined
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# look at pending jobs every 2 s (default 60 s / 30 s): a requeued job starts soon after it may
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node's CPUs/memory below are taken as configured, not as detected
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MessageTimeout=10
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} Gres=gpu:2 State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def gres_conf(host: str) -> str:
    return f"""\
# two counted GPUs; the files only give Slurm something to bind (task/none confines nothing)
AutoDetect=off
NodeName={host} Name=gpu File=/dev/null
NodeName={host} Name=gpu File=/dev/zero
"""


@dataclass
class SlurmCluster:
    """A running test cluster. `run`/`popen` execute commands inside its network namespace."""

    root: Path
    host: str
    conf: Path
    holder: subprocess.Popen
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------ commands

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        """`args` run inside the cluster's network namespace."""
        return [_which("nsenter"), f"--target={self.holder.pid}", "--net", "--", *map(str, args)]

    def run(self, *args: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                             env=env or self.env(), cwd=cwd)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n{self.logs()}")
        return res

    def popen(self, *args: str, env: dict | None = None, cwd: str | Path | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env=env or self.env(), cwd=cwd, **kw)

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def queue(self) -> list[dict[str, str]]:
        """squeue: every job the controller still shows as pending/running/completing."""
        out = self.run("squeue", "--noheader", "--format=%i|%j|%T|%N|%b").stdout
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        return [dict(id=r[0], name=r[1], state=r[2], nodes=r[3], gres=r[4]) for r in rows]

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a mapping (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {info.get('JobState')}, not in {states} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def wait_queue_empty(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (q := self.queue()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if q:
            raise TimeoutError(f"jobs still queued after {timeout:.0f} s: {q}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted((self.root / "log").glob("*")))

    # ------------------------------------------------------------ teardown

    def namespace_pids(self) -> list[int]:
        """Every process in the cluster's network namespace (all of them were started here)."""
        try:
            ns = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        except OSError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.holder.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == ns:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        """Cancel the jobs, stop slurmd, slurmctld and munged, end any process left in the
        namespace (job steps of a crashed test), then the namespace's holder. By pid only."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", f"--partition={PARTITION}", check=False, timeout=20)
                self.wait_queue_empty(timeout=30)
            except (TimeoutError, subprocess.TimeoutExpired, RuntimeError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.daemons.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for pid in self.namespace_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(5)


def start_slurm(root: Path, timeout: float = 60) -> SlurmCluster:
    """Bring up munged, slurmctld and slurmd under `root`; returns once the node is idle."""
    missing = missing_parts()
    if missing:
        raise SlurmUnavailable(f"missing {missing}: run tests/system-deps.sh as root (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs slurmd as root (it starts jobs as the submitting user)")
    root = Path(root).resolve()
    if len(str(root / "munge" / "munge.socket")) > 100:  # a unix socket path must fit sockaddr_un (108 bytes)
        raise SlurmUnavailable(f"{root} is too long a folder for munged's socket; use a shorter temporary folder")
    for d in ("state", "spool", "log", "run", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o711)  # munged: the socket's folder must be searchable, not writable, by others
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host))
    (root / "gres.conf").write_text(gres_conf(host))  # read from slurm.conf's folder

    # the namespace: a process that only sleeps holds it; loopback up, plus 127.0.0.2 (see above)
    holder = subprocess.Popen([_which("unshare"), "--net", "--", "sh", "-c",
                               "ip link set lo up && ip addr add 127.0.0.2/8 dev lo && echo up && exec sleep infinity"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = holder.stdout.readline()
    if line.strip() != "up":
        err = holder.stderr.read() if holder.poll() is not None else ""
        holder.kill()
        holder.wait(5)
        raise SlurmUnavailable(f"cannot create a private network namespace (unshare --net): {err.strip() or line!r}")
    holder.stdout.close()
    holder.stderr.close()
    cluster = SlurmCluster(root=root, host=host, conf=conf, holder=holder)
    try:
        def daemon(name: str, *args: str) -> None:
            log = open(root / "log" / f"{name}.out", "w")
            cluster.daemons[name] = subprocess.Popen(cluster.argv(_which(name), *args), stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, env=cluster.env(), start_new_session=True)
            log.close()

        m = root / "munge"
        daemon("munged", "--foreground", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
               f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log", f"--seed-file={m}/munge.seed")
        _wait(lambda: (m / "munge.socket").exists(), "munged's socket", timeout, cluster)
        daemon("slurmctld", "-D", "-i", "-f", str(conf))  # -i: no saved state to recover
        daemon("slurmd", "-D", "-f", str(conf), "-N", host)

        def node_idle() -> bool:
            for name, p in cluster.daemons.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited ({p.returncode})\n{cluster.logs()}")
            res = cluster.run("sinfo", "--noheader", "--format=%t", check=False, timeout=20)
            return res.returncode == 0 and res.stdout.strip() == "idle"

        _wait(node_idle, "the node to be idle", timeout, cluster)
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _wait(cond, what: str, timeout: float, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.2)
