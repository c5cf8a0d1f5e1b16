"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd (Debian's
slurm-wlm + munge, installed by slurm/install_local_cluster.sh), every file under one temporary
directory, stopped by pid.  Runs as root (slurmd must; the Debian packages' services are not used).

    with LocalSlurm(tmp_dir) as cluster:
        job = cluster.sbatch(["slurm/train.sbatch", ...], env={...})
        cluster.wait(job)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from sparselm.training.runtime import free_port
from tools.local_cluster import SLURM_SETTINGS

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "srun", "sacct")


def missing_binaries() -> list[str]:
    """The SLURM / munge programs this machine lacks (empty: a cluster can be started)."""
    found = lambda b: shutil.which(b) or Path("/usr/sbin", b).exists()
    return [b for b in DAEMONS + CLIENTS[:4] if not found(b)]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """One node (this host) with ``cpus`` CPUs in one partition 'debug'.  ``env`` gives client commands
    SLURM_CONF; jobs inherit it (sbatch exports the environment), so srun inside a job finds it too."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = r / "munge" / "munge.socket"
        self._daemon("munged", [_sbin("munged"), "--foreground", "--force", f"--key-file={key}",
                                f"--socket={self.socket}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                                f"--seed-file={r / 'munge' / 'munged.seed'}", f"--log-file={r / 'log' / 'munged.log'}"])
        self._wait_for(lambda: self.socket.exists(), "munged's socket", "munged.log")
        self.conf = r / "slurm.conf"
        self.conf.write_text(self._slurm_conf())
        rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        self.env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "SLURM_CONF": str(self.conf)}
        self._daemon("slurmctld", [_sbin("slurmctld"), "-D", "-f", str(self.conf)])
        self._daemon("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf)])
        self._wait_for(self._node_idle, "the node to be idle", "slurmd.log", timeout=60)

    def _slurm_conf(self) -> str:
        r = self.root
        return SLURM_SETTINGS + f"""ClusterName=sparselm-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
KillWait=20
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for(self, ready, what: str, log: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode} while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self) -> None:
        """SIGTERM each daemon (slurmd first, munged last) by pid, then SIGKILL what is left; jobs' processes
        are in slurmd's session only while it runs, so a job still running is cancelled first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ jobs
    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, **kw)

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr}\n{self.logs()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """scontrol show job's fields (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)])
        fields = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float = 240, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> dict:
        """Poll until the job reaches a final state; returns its fields."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job(job_id)}\n{self.logs()}")
