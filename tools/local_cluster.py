"""A cluster of N "nodes" on one Linux machine, made of network, UTS and mount namespaces: try a multi-node
launch (torchrun, deepspeed --no_ssh, SLURM) without a second machine.  Needs root, `ip` (iproute2),
`unshare` and `nsenter` (util-linux).

    python tools/local_cluster.py up --nodes 3 --root /tmp/lc        # n1..n3 (+ ctl), prints the addresses
    python tools/local_cluster.py exec --root /tmp/lc n2 -- hostname  # runs inside node n2
    python tools/local_cluster.py down --root /tmp/lc                 # kills everything, removes the namespaces

From Python (the tests)::

    with LocalCluster(root, nodes=2) as c:
        p = c.run("n1", ["hostname"])               # CompletedProcess (background=True: a Popen)
        c.kill("n2", signal.SIGKILL); c.link_down("n2")

Layout.  The cluster id is ``slc<pid>`` of the process that brought it up; every namespace is named
``<id>-ctl``, ``<id>-n1``..: two clusters never collide and ``down`` deletes only its own.  The control
namespace holds a bridge (10.77.X.254/24, X derived from the id); each node namespace gets a veth pair whose
node end ``eth1`` is 10.77.X.N/24 and whose other end ``vnN`` is a bridge port.  Both ends are created
inside the cluster's namespaces, so the machine's own network (and ``ip link``) never sees them, and there
is no route out: traffic stays between the nodes.

Each node (and ctl) has one *holder* process, ``nsenter --net=/run/netns/NS unshare --uts --mount
--propagation private``, that sets the hostname (nN; the machine's own is never touched), mounts the
namespace's own sysfs (keeping the host's cgroup tree, which slurmd wants), bind-mounts the cluster's
hosts file (every node name -> its address, ``ctl`` -> the bridge) over /etc/hosts, applies optional
per-node bind mounts (a node-local cache dir), then sleeps.  Commands run in the node with ``nsenter -t
HOLDER -n -u -m``; everything else (the checkout, the venv, /tmp) is the one shared file system, standing
in for an NFS home.  State (ids, pids, addresses) is in ROOT/cluster.json, so ``exec``/``down`` work from
another process.  ``down`` kills every process in the cluster's namespaces (its own, whoever started
them), the holders, and deletes the namespaces.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = "cluster.json"

SLURM_SETTINGS = """\
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SchedulerParameters=sched_interval=1
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
InactiveLimit=0
"""
"""The slurm.conf lines of a throw-away test cluster (here and tests/support/local_slurm.py): root daemons, munge,
no accounting, cgroup-free process tracking, CPUs as the only resource, a scheduler pass every second."""


def missing_requirements() -> str | None:
    """Why this machine cannot make a cluster (None: it can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"no `{tool}` on PATH (iproute2 / util-linux)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --net --uts --mount fails here: {probe.stderr.strip()}"
    return None


def _sh(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child, not yet reaped) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalCluster:
    """N nodes n1..nN plus a control namespace 'ctl' (see the module doc).  ``binds``: per node, a list of
    (source dir, target path) bind-mounted in that node only.  ``hosts_extra``: per node, lines put *first*
    in that node's /etc/hosts (e.g. ``"127.0.1.1 n1"`` to reproduce Debian's loopback-hostname trap)."""

    def __init__(self, root, nodes: int = 3, binds: dict | None = None, hosts_extra: dict | None = None,
                 cluster_id: str | None = None):
        self.root = Path(root).resolve()
        self.n = nodes
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.id = cluster_id or f"slc{os.getpid()}"
        self.subnet = f"10.77.{int(''.join(c for c in self.id if c.isdigit()) or 0) % 250 + 1}"
        self.binds = {k: [(str(s), str(t)) for s, t in v] for k, v in (binds or {}).items()}
        self.hosts_extra = hosts_extra or {}
        self.holders: dict[str, int] = {}
        self.procs: list[subprocess.Popen] = []  # started by run(background=True) / daemon()
        self.startup_s: float | None = None

    # ---------------------------------------------------------------------------- names
    def ns(self, node: str) -> str:
        return f"{self.id}-{node}"

    def addr(self, node: str) -> str:
        return f"{self.subnet}.254" if node == "ctl" else f"{self.subnet}.{self.nodes.index(node) + 1}"

    @property
    def all(self) -> list[str]:
        return ["ctl", *self.nodes]

    # ---------------------------------------------------------------------------- state
    def _save(self) -> None:
        state = {"id": self.id, "nodes": self.n, "subnet": self.subnet, "holders": self.holders,
                 "binds": self.binds, "hosts_extra": self.hosts_extra, "startup_s": self.startup_s,
                 "daemons": [p.pid for p in self.procs]}
        (self.root / STATE).write_text(json.dumps(state, indent=1))

    @classmethod
    def attach(cls, root) -> "LocalCluster":
        """The cluster that `up` left running under ROOT (for exec / down from another process)."""
        state = json.loads((Path(root) / STATE).read_text())
        c = cls(root, state["nodes"], state["binds"], state["hosts_extra"], cluster_id=state["id"])
        c.holders = {k: int(v) for k, v in state["holders"].items()}
        c.startup_s = state.get("startup_s")
        c._recorded = state.get("daemons", [])
        return c

    # ---------------------------------------------------------------------------- up / down
    def __enter__(self) -> "LocalCluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, timeout: float = 60) -> "LocalCluster":
        t0 = time.monotonic()
        why = missing_requirements()
        if why:
            raise RuntimeError(f"cannot start a local cluster: {why}")
        for d in ("log", "run", "etc"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._save()  # first, so that a failed up can still be taken down from the state file
        existing = set(_sh(["ip", "netns", "list"]).stdout.split())
        clash = [self.ns(n) for n in self.all if self.ns(n) in existing]
        if clash:
            raise RuntimeError(f"namespaces {clash} exist already (a cluster with id {self.id} is up?)")
        ctl = self.ns("ctl")
        for node in self.all:
            _sh(["ip", "netns", "add", self.ns(node)])
        _sh(["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", ctl, "addr", "add", f"{self.addr('ctl')}/24", "dev", "br0"])
        _sh(["ip", "-n", ctl, "link", "set", "br0", "up"])
        for node in self.all:
            _sh(["ip", "-n", self.ns(node), "link", "set", "lo", "up"])
        for node in self.nodes:
            port = f"v{node}"
            _sh(["ip", "-n", ctl, "link", "add", port, "type", "veth", "peer", "name", "eth1", "netns", self.ns(node)])
            _sh(["ip", "-n", ctl, "link", "set", port, "master", "br0"])
            _sh(["ip", "-n", ctl, "link", "set", port, "up"])
            _sh(["ip", "-n", self.ns(node), "addr", "add", f"{self.addr(node)}/24", "dev", "eth1"])
            _sh(["ip", "-n", self.ns(node), "link", "set", "eth1", "up"])
        hosts = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 *(f"{self.addr(n)} {n}" for n in self.all)]
        for node in self.all:
            path = self.root / "etc" / f"hosts-{node}"
            path.write_text("\n".join([*self.hosts_extra.get(node, []), *hosts]) + "\n")
            (self.root / "etc" / f"hostname-{node}").write_text(node + "\n")
            self._start_holder(node, path)
        self._save()
        end = t0 + timeout
        for node in self.all:
            ready = self.root / "run" / f"{node}.ready"
            while not ready.exists():
                if not _alive(self.holders[node]):
                    raise RuntimeError(f"the holder of {node} exited:\n{self.logs()}")
                if time.monotonic() > end:
                    raise RuntimeError(f"the holder of {node} not ready after {timeout} s:\n{self.logs()}")
                time.sleep(0.02)
        self.startup_s = round(time.monotonic() - t0, 2)
        self._save()
        return self

    def _start_holder(self, node: str, hosts: Path) -> None:
        ready = self.root / "run" / f"{node}.ready"
        ready.unlink(missing_ok=True)
        binds = "".join(f'mkdir -p "{s}" "{t}" && mount --bind "{s}" "{t}" && ' for s, t in self.binds.get(node, []))
        # /sys: a sysfs of this netns (its own /sys/class/net), with the host's cgroup tree moved onto it
        # (slurmd needs /sys/fs/cgroup even with task/none; `ip netns exec` would leave it empty)
        cg = self.root / "run" / f"cgroup-{node}"
        cg.mkdir(exist_ok=True)
        sysfs = (f'mount --rbind /sys/fs/cgroup "{cg}" && mount -t sysfs sysfs /sys && '
                 f'mount --move "{cg}" /sys/fs/cgroup && ') if Path("/sys/fs/cgroup").is_mount() else ""
        script = (f'hostname {node} && {sysfs}mount --bind "{hosts}" /etc/hosts && '
                  f'{{ [ ! -e /etc/hostname ] || mount --bind "{self.root}/etc/hostname-{node}" /etc/hostname; }} && {binds}'
                  f'touch "{ready}" && exec sleep infinity')
        log = open(self.root / "log" / f"holder-{node}.log", "wb")
        p = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns(node)}", "unshare", "--uts", "--mount",
                              "--propagation", "private", "sh", "-c", script],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.holders[node] = p.pid  # nsenter -> unshare -> sh -> sleep all exec: one pid
        self._holder_popen = getattr(self, "_holder_popen", []) + [p]

    def _ns_pids(self, node: str) -> list[int]:
        out = _sh(["ip", "netns", "pids", self.ns(node)], check=False)
        return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []

    def down(self, dump_logs: bool = False) -> str:
        """Kill every process in the cluster (recorded groups, then whatever is left in its namespaces, the
        holders last), delete the namespaces.  Returns the daemons' logs when ``dump_logs``."""
        logs = self.logs() if dump_logs else ""
        if getattr(self, "slurm_env", None) and any(p.poll() is None for p in self.procs):
            self.run("ctl", ["scancel", "--full", "--user=root"], env=self.slurm_env, timeout=15)
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in getattr(self, "_recorded", []):
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        existing = set(_sh(["ip", "netns", "list"], check=False).stdout.split())
        for _ in range(3):  # everything that lives in our namespaces is ours
            left = [pid for node in self.all if self.ns(node) in existing for pid in self._ns_pids(node)
                    if pid != self.holders.get(node)]
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for node, pid in self.holders.items():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs + getattr(self, "_holder_popen", []):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for node in self.all:
            if self.ns(node) in existing:
                _sh(["ip", "netns", "del", self.ns(node)], check=False)
        self.procs.clear()
        left = set(_sh(["ip", "netns", "list"], check=False).stdout.split()) & {self.ns(n) for n in self.all}
        if left:
            raise RuntimeError(f"namespaces left behind: {sorted(left)}")
        return logs

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            if f.is_file():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------------------- inside a node
    def command(self, node: str, cmd: list[str], cwd=None) -> list[str]:
        """argv that runs CMD inside NODE (its network, hostname and mounts), in CWD (default: ours)."""
        return ["nsenter", "-t", str(self.holders[node]), "-n", "-u", "-m", f"--wd={cwd or os.getcwd()}", "--",
                *map(str, cmd)]

    def run(self, node: str, cmd: list[str], env: dict | None = None, background: bool = False, cwd=None,
            **kw):
        """Run CMD in NODE.  background=False: wait, capture the output (text) unless told otherwise, return
        the CompletedProcess.  background=True: return the Popen (own process group; down() kills it)."""
        argv = self.command(node, cmd, cwd)
        if background:
            kw.setdefault("start_new_session", True)
            p = subprocess.Popen(argv, env=env, **kw)
            self.procs.append(p)
            return p
        if "stdout" not in kw and "stderr" not in kw:
            kw["capture_output"] = True
        kw.setdefault("text", True)
        return subprocess.run(argv, env=env, **kw)

    def daemon(self, node: str, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        """A long-running process in NODE with its output in ROOT/log/NAME.log (dumped by logs())."""
        log = open(self.root / "log" / f"{name}.log", "ab")
        p = self.run(node, cmd, env=env, background=True, stdin=subprocess.DEVNULL, stdout=log,
                     stderr=subprocess.STDOUT)
        self._save()
        return p

    # ---------------------------------------------------------------------------- ssh between the nodes
    def start_sshd(self, timeout: float = 30) -> None:
        """One sshd per node (port 22 of its own address) that lets root in with a key made for this cluster, and an
        ssh client config that uses it, bind-mounted over /etc/ssh/ssh_config in the nodes only: ``ssh n2`` and
        pdsh (the deepspeed launcher's default route) work from any node without a password or a known_hosts
        prompt, and the machine's own ssh setup is never read or changed.  Needs openssh-server (its sshd) and
        the privilege separation directory /run/sshd (created here, as the package's service would)."""
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise RuntimeError("no sshd: run slurm/install_local_cluster.sh (openssh-server, pdsh)")
        d = self.root / "ssh"
        d.mkdir(exist_ok=True)
        for key in ("host_key", "id_ed25519"):
            if not (d / key).exists():
                _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.id}-{key}", "-f", str(d / key)])
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 22\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPrintMotd no\nLogLevel ERROR\n")
        (d / "ssh_config").write_text(
            f"Host *\n  IdentityFile {d / 'id_ed25519'}\n  BatchMode yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for node in self.nodes:
            _sh(["nsenter", "-t", str(self.holders[node]), "-m", "mount", "--bind", str(d / "ssh_config"),
                 "/etc/ssh/ssh_config"])
            self.daemon(node, f"sshd-{node}", [sshd, "-D", "-e", "-f", str(d / "sshd_config"),
                                                "-o", f"PidFile={self.root / 'run' / f'sshd-{node}.pid'}"])
        for node in self.nodes:
            self._wait(lambda: self.run(self.nodes[0], ["ssh", node, "true"], timeout=10).returncode == 0,
                       f"sshd on {node}", timeout)

    # ---------------------------------------------------------------------------- SLURM across the nodes
    def start_slurm(self, cpus: int = 2, timeout: float = 60) -> None:
        """One munged and slurmctld in ctl (hostname ``ctl``), one slurmd per node (``-N nN``), every file under
        ROOT/slurm; ``slurm_env`` then gives clients (``run("ctl", ["sbatch", ...], env=c.slurm_env)``) their
        SLURM_CONF.  Debian's slurm-wlm + munge (slurm/install_local_cluster.sh).  One munged serves every
        slurmd: its socket is a path on the shared file system, and Debian builds SLURM with
        MULTIPLE_SLURMD, which accepts the one credential that several slurmds decode (a "replay" otherwise)."""
        sbin = lambda b: shutil.which(b) or f"/usr/sbin/{b}"
        r = self.root / "slurm"
        for d in ("munge", "state", "run", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        self.daemon("ctl", "munged", [sbin("munged"), "--foreground", "--force", f"--key-file={key}",
                                      f"--socket={sock}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                                      f"--seed-file={r / 'munge' / 'munged.seed'}",
                                      f"--log-file={self.root / 'log' / 'munged-file.log'}"])
        self._wait(lambda: sock.exists(), "munged's socket", timeout)
        nodes = f"n[1-{self.n}]" if self.n > 1 else "n1"
        addrs = ",".join(self.addr(n) for n in self.nodes)
        log = self.root / "log"
        conf = r / "slurm.conf"
        conf.write_text(SLURM_SETTINGS + f"""ClusterName=localcluster
SlurmctldHost=ctl({self.addr('ctl')})
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'run'}/slurmctld.pid
SlurmdPidFile={r / 'run'}/slurmd-%n.pid
SlurmctldLogFile={log}/slurmctld-file.log
SlurmdLogFile={log}/slurmd-%n-file.log
SlurmdTimeout=15
KillWait=5
NodeName={nodes} NodeHostname={nodes} NodeAddr={addrs} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.slurm_env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_CONF": str(conf)}
        self.daemon("ctl", "slurmctld", [sbin("slurmctld"), "-D", "-f", str(conf)])
        for node in self.nodes:
            self.daemon(node, f"slurmd-{node}", [sbin("slurmd"), "-D", "-f", str(conf), "-N", node])
        self._wait(self._slurm_idle, f"{self.n} idle slurm nodes", timeout)

    def _slurm_idle(self) -> bool:
        out = self.run("ctl", ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.slurm_env)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ready, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{' '.join(dead[0].args[-6:])} exited {dead[0].returncode} while waiting for "
                                   f"{what}:\n{self.logs()}")
            if time.monotonic() > end:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")
            time.sleep(0.3)

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> int:
        out = self.run("ctl", ["sbatch", "--parsable", *map(str, args)], env={**self.slurm_env, **(env or {}), "SLURM_CONF": self.slurm_env["SLURM_CONF"]}, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {out.stderr}\n{self.logs()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        out = self.run("ctl", ["scontrol", "-o", "show", "job", str(job_id)], env=self.slurm_env)
        return dict(item.partition("=")[::2] for item in out.stdout.split())

    def wait_job(self, job_id: int, timeout: float = 300) -> dict:
        done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job(job_id)}\n{self.logs()}")

    def kill(self, node: str, sig=signal.SIGKILL) -> list[int]:
        """Send SIG to every process in NODE but its holder (a crash: SIGKILL; a hang: SIGSTOP)."""
        pids = [pid for pid in self._ns_pids(node) if pid != self.holders[node]]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def link_down(self, node: str) -> None:
        """Pull NODE's cable: its bridge port goes down, packets are dropped silently (no RST)."""
        _sh(["ip", "-n", self.ns("ctl"), "link", "set", f"v{node}", "down"])

    def link_up(self, node: str) -> None:
        _sh(["ip", "-n", self.ns("ctl"), "link", "set", f"v{node}", "up"])


# -------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/local_cluster.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start N nodes n1..nN (and ctl); state under --root")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--root", required=True)
    up.add_argument("--slurm", action="store_true", help="also start munged + slurmctld in ctl and a slurmd per node")
    up.add_argument("--bind", action="append", default=[], metavar="NODE:SRC:TARGET",
                    help="bind-mount SRC over TARGET in NODE only (a node-local directory); repeatable")
    ex = sub.add_parser("exec", help="run a command inside a node: exec --root DIR n2 -- CMD...")
    ex.add_argument("--root", required=True)
    ex.add_argument("node")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    dn = sub.add_parser("down", help="kill everything in the cluster and remove its namespaces")
    dn.add_argument("--root", required=True)
    dn.add_argument("--logs", action="store_true", help="print the daemons' logs first")
    args = ap.parse_args(argv)

    if args.cmd == "up":
        binds: dict = {}
        for b in args.bind:
            node, src, target = b.split(":", 2)
            binds.setdefault(node, []).append((os.path.abspath(src), target))
        c = LocalCluster(args.root, args.nodes, binds=binds)
        try:
            c.up()
            if args.slurm:
                c.start_slurm()
        except BaseException:
            c.down()
            raise
        print(f"cluster {c.id} up in {c.startup_s} s under {c.root}")
        for node in c.all:
            print(f"  {node:4s} {c.addr(node):15s} netns {c.ns(node)}  holder pid {c.holders[node]}")
        print(f"run: python tools/local_cluster.py exec --root {args.root} n1 -- hostname")
        if args.slurm:
            print(f"SLURM: python tools/local_cluster.py exec --root {args.root} ctl -- env "
                  f"SLURM_CONF={c.slurm_env['SLURM_CONF']} sinfo")
        return 0
    if not (Path(args.root) / STATE).exists():
        print(f"local_cluster: no cluster under {args.root} ({STATE} missing)", file=sys.stderr)
        return 2
    c = LocalCluster.attach(args.root)
    if args.cmd == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if args.node not in c.all:
            print(f"local_cluster: no node {args.node} (have {', '.join(c.all)})", file=sys.stderr)
            return 2
        return subprocess.run(c.command(args.node, argv or ["bash"])).returncode
    if args.logs:
        print(c.logs())
    c.down()
    print(f"cluster {c.id} down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
