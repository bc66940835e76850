"""A real Slurm cluster on this one machine, for tests: munged, slurmctld and one slurmd per node,
started as subprocesses of the caller, everything (config, munge key and socket, state, spool,
logs, pid files) under one directory, on free ports, and stopped by pid.

    with SlurmCluster(nodes=2) as cluster:
        subprocess.run(["srun", "-N2", "-n2", "hostname"], env=cluster.env)

Where it can (root, iproute2, network namespaces), each node's slurmd runs in a network namespace
of its own with an address of its own in a private /24 picked here (10.x.y.0/24, overlapping no
address or route of the machine): the nodes and this machine (10.x.y.1, the "login node", where
slurmctld and the callers' srun/sbatch run) are joined by a bridge that lives in one more
namespace of the cluster's; the machine's own network gains only the veth end that carries
10.x.y.1. A node also gets its own hostname (n1, n2, ...: a UTS namespace) and /etc/hosts (a bind
mount in a private mount namespace) resolving every node and the controller (CTL_NAME). Where
namespaces cannot be made, or with `netns=False`, every slurmd listens on 127.0.0.1 on a port of
its own, and the nodes share the machine's hostname.

The processes of a cluster are found by pid: those started here and their descendants, every
process in the cluster's network namespaces, every process carrying MPIFY_SLURM_CLUSTER=<id> in
its environment (the daemons have it, and tasks and batch scripts submitted with `cluster.env`
inherit it from srun/sbatch), every process holding a slurmd log file of the cluster's open
(slurmstepd: slurmd double-forks it, out of its tree, with an empty environment), and their
descendants. Never by name.
"""
from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

MARKER = "MPIFY_SLURM_CLUSTER"
NS_PREFIX = "mpfslurm"
CTL_NAME = "slurmctl"  # the controller's hostname, with namespaces
CONF_HEADER = "# written by tests/slurm_cluster.py"
INSTALL_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install_slurm.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "srun", "sbatch", "squeue", "scancel",
            "sinfo", "scontrol")
_SBIN_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  ({e})"
    return "\n".join("  " + line for line in text[-lines:]) or "  (empty)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([_which("ip") or "ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _resolves_to_loopback(name: str) -> bool:
    try:
        return all(ipaddress.ip_address(a[4][0]).is_loopback
                   for a in socket.getaddrinfo(name, None, socket.AF_INET))
    except (OSError, ValueError):
        return False


def _net_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _ns_id(name: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"


def _add_descendants(procs: dict[int, psutil.Process]) -> None:
    """Add every descendant of the processes in `procs` (pid -> Process) to it."""
    for p in list(procs.values()):
        try:
            for c in p.children(recursive=True):
                procs.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _netns_possible() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root"
    if not _which("ip"):
        return False, "no `ip` command (iproute2)"
    if not all(_which(c) for c in ("nsenter", "unshare", "hostname", "mount")):
        return False, "no nsenter/unshare/hostname/mount command (util-linux)"
    name = f"{NS_PREFIX}-{os.getpid()}-probe{random.randrange(1 << 30):x}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode:
        return False, f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return True, ""


class SlurmCluster:
    """`nodes` slurmd's (n1, n2, ...) with `cpus` CPUs each, one partition `debug` holding them
    all, a slurmctld and a munged, all under `root` (a new temporary directory by default, removed
    at stop; a given one is kept, what was made in it removed). `env` is what to run srun, sbatch,
    squeue, scancel, sinfo with; `run()` runs one of them with it."""

    def __init__(self, nodes: int = 2, root: str | os.PathLike | None = None, cpus: int = 2,
                 netns: bool | None = None, start_timeout: float = 30.0):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.start_timeout = start_timeout
        self._want_netns = netns
        self._given_root = None if root is None else Path(root)
        self.root: Path | None = None
        self.id = f"{os.getpid()}-{random.randrange(1 << 32):08x}"
        self.netns = False          # whether the nodes run in network namespaces (set by start)
        self.netns_reason = ""      # why not, where they don't
        self.addresses: dict[str, str] = {}   # node name -> its address
        self.controller_addr = "127.0.0.1"
        self.ctl_port = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._namespaces: list[str] = []
        self._ns_ids: set[str] = set()
        self._host_veth: str | None = None
        self._made: list[Path] = []       # what start() made under a given root
        self.started_in: float | None = None

    # ---------------------------------------------------------------- availability, install
    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "") if a cluster can start here: Linux, root (slurmd starts job steps as their
        user), and the binaries installed; else (False, why)."""
        if not os.path.exists("/proc/self/ns/net"):
            return False, "not Linux"
        missing = [b for b in BINARIES if not _which(b)]
        if missing:
            return False, f"Slurm/munge binaries missing: {', '.join(missing)}"
        if os.geteuid() != 0:
            return False, "not root: slurmd must run as root to start job steps"
        return True, ""

    @staticmethod
    def can_install() -> bool:
        return os.geteuid() == 0 and bool(_which("apt-get")) and INSTALL_SCRIPT.exists()

    @staticmethod
    def install(timeout: float = 600) -> subprocess.CompletedProcess:
        """scripts/install_slurm.sh (a no-op where installed, not root, or no apt-get)."""
        return subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                              timeout=timeout)

    # ---------------------------------------------------------------- public surface
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.sock"

    @property
    def env(self) -> dict[str, str]:
        """os.environ without any outer Slurm job's variables, with SLURM_CONF naming this
        cluster's slurm.conf (its AuthInfo names the cluster's munged socket) and the marker."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_"))}
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = self.id
        env["PATH"] = _SBIN_PATH
        return env

    def run(self, args: list[str], timeout: float = 60, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        r = subprocess.run(args, env=self.env, timeout=timeout, **kwargs)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {r.returncode}:\n"
                               f"{r.stdout}\n{r.stderr}")
        return r

    def node_states(self) -> dict[str, str]:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15, check=False)
        if r.returncode:
            return {}
        return dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())

    @property
    def daemon_pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items()}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- start
    def start(self) -> "SlurmCluster":
        if self._procs:
            raise RuntimeError("already started")
        t0 = time.monotonic()
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"cannot start a Slurm cluster here: {why}")
        self._sweep_stale()
        try:
            self._make_root()
            self._setup_network()
            for attempt in range(3):
                self.ctl_port = _free_port()
                ports = {n: (6818 if self.netns else _free_port()) for n in self.node_names}
                self._write_files(ports)
                self._start_daemons()
                err = self._wait_idle()
                if err is None:
                    break
                in_use = "Address already in use" in err
                self._stop_processes()
                if not in_use or attempt == 2:
                    raise RuntimeError(err)
        except BaseException:
            try:
                self.stop()
            except Exception:
                pass  # the start's error says more
            raise
        self.started_in = time.monotonic() - t0
        return self

    def _make_root(self):
        if self._given_root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mpslurm-"))
        else:
            self.root = self._given_root.resolve()
            self.root.mkdir(parents=True, exist_ok=True)
        # munged wants every directory above its socket searchable by all
        os.chmod(self.root, 0o755)
        if len(str(self.munge_socket).encode()) > 100:
            raise ValueError(f"root too long for a unix socket path: {self.munge_socket}")
        made = [self.root / sub for sub in ("munge", "state", "spool", "log", "run", "slurm.conf")]
        for p in made:
            if p.exists():
                raise FileExistsError(f"{p} exists: root must not hold another cluster")
        self._made = made
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir()
        os.chmod(self.root / "munge", 0o755)
        for n in self.node_names:
            (self.root / "spool" / n).mkdir()
        key = self.root / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        taken = []
        out = (_ip("-4", "-o", "addr", "show").stdout
               + _ip("-4", "route", "show", "table", "all").stdout)
        for m in re.finditer(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", out):
            try:
                net = ipaddress.ip_network(m.group(1), strict=False)
            except ValueError:
                continue
            if net.prefixlen > 0:
                taken.append(net)
        rng = random.Random()
        for i in range(300):
            pool = "10" if i < 200 else rng.choice(("172", "192"))
            if pool == "10":
                cand = f"10.{rng.randrange(64, 255)}.{rng.randrange(1, 255)}.0/24"
            elif pool == "172":
                cand = f"172.{rng.randrange(18, 32)}.{rng.randrange(1, 255)}.0/24"  # not docker's
            else:
                cand = f"192.168.{rng.randrange(100, 255)}.0/24"
            net = ipaddress.ip_network(cand)
            if not any(net.overlaps(t) for t in taken):
                return net
        raise RuntimeError("no free private /24 for the nodes' network")

    def _setup_network(self):
        if self._want_netns is False:
            self.netns_reason = "netns=False"
        else:
            ok, why = _netns_possible()
            if not ok:
                if self._want_netns:
                    raise RuntimeError(f"network namespaces asked for but unavailable: {why}")
                self.netns_reason = why
            else:
                try:
                    self._make_namespaces()
                    self.netns = True
                except Exception as e:
                    if self._want_netns:
                        raise
                    self.netns_reason = f"namespace setup failed: {e}"
                    self._remove_namespaces()
        if not self.netns:
            self.controller_addr = "127.0.0.1"
            self.addresses = {n: "127.0.0.1" for n in self.node_names}

    def _make_namespaces(self):
        net = self._pick_subnet()
        hosts = list(net.hosts())
        self.controller_addr = str(hosts[0])
        self.addresses = {n: str(hosts[9 + i]) for i, n in enumerate(self.node_names)}
        base = f"{NS_PREFIX}-{self.id}"
        sw = f"{base}-sw"
        _ip("netns", "add", sw)
        self._namespaces.append(sw)
        self._ns_ids.add(_ns_id(sw))
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        # the one interface on the machine's side: its peer is a port of the bridge
        self._host_veth = f"mpf{self.id[-8:]}"
        _ip("link", "add", self._host_veth, "type", "veth", "peer", "name", "up0", "netns", sw)
        _ip("-n", sw, "link", "set", "up0", "master", "br0")
        _ip("-n", sw, "link", "set", "up0", "up")
        _ip("addr", "add", f"{self.controller_addr}/{net.prefixlen}", "dev", self._host_veth)
        _ip("link", "set", self._host_veth, "up")
        for i, n in enumerate(self.node_names):
            ns = f"{base}-{n}"
            _ip("netns", "add", ns)
            self._namespaces.append(ns)
            self._ns_ids.add(_ns_id(ns))
            _ip("-n", sw, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", sw, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[n]}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.controller_addr)
        _ip("-n", sw, "link", "set", "br0", "up")
        # an /etc/hosts for the nodes (bind-mounted on /etc/hosts in each slurmd's mount namespace)
        me = socket.gethostname().split(".")[0]
        names = {me, CTL_NAME, *self.node_names}
        lines = [line for line in Path("/etc/hosts").read_text().splitlines()
                 if not (set(line.split("#")[0].split()[1:]) & names)]
        lines.append(f"{self.controller_addr} {CTL_NAME} {me}")
        lines += [f"{a} {n}" for n, a in self.addresses.items()]
        (self.root / "run" / "hosts").write_text("\n".join(lines) + "\n")
        # Names from that file alone: the machine's DNS server is out of the nodes' reach, and a
        # lookup there (torch's TCPStore names each client it accepts) waited for its timeout,
        # seconds per connection ("The hostname of the client socket cannot be retrieved").
        (self.root / "run" / "nsswitch.conf").write_text("hosts: files\n")
        self._check_network()

    def _check_network(self):
        """A node reaches this machine's address (TCP, a listener of ours), before any daemon."""
        with socket.socket() as s:
            s.bind((self.controller_addr, 0))
            s.listen(4)
            s.settimeout(5)
            port = s.getsockname()[1]
            for n in self.node_names:
                ns = f"/run/netns/{NS_PREFIX}-{self.id}-{n}"
                child = subprocess.Popen(
                    [_which("nsenter"), f"--net={ns}", "timeout", "5", "bash", "-c",
                     f"exec 3<>/dev/tcp/{self.controller_addr}/{port}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    s.accept()[0].close()
                finally:
                    err = child.communicate(timeout=10)[1]
                if child.returncode:
                    raise RuntimeError(f"node {n} cannot reach {self.controller_addr}: {err!r}")

    def _write_files(self, ports: dict[str, int]):
        r = self.root
        me = CTL_NAME if self.netns else socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={self.addresses[n]} NodeHostname={n} Port={ports[n]} "
            f"CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 State=UNKNOWN"
            for n in self.node_names)
        # Nothing listens on all addresses but srun (it always does; munge authenticates every
        # message). NoCtldInAddrAny binds slurmctld to its hostname's address (not to
        # SlurmctldHost's): with namespaces its hostname is CTL_NAME, in a UTS namespace of its
        # own, and its /etc/hosts resolves that to the machine's address on the nodes' network.
        # On loopback, NoInAddrAny binds slurmd to its NodeAddr (127.0.0.1), and srun to the
        # hostname's address, where that is loopback; not with namespaces, where the nodes reach
        # srun at the machine's address on their network (their slurmd's listen in there only).
        listen = ""
        if self.netns:
            listen = "CommunicationParameters=NoCtldInAddrAny\n"
        elif _resolves_to_loopback(me):
            listen = "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny\n"
        (r / "slurm.conf").write_text(f"""\
{CONF_HEADER}
ClusterName=mpify
SlurmctldHost={me}({self.controller_addr})
SlurmctldPort={self.ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
# batch jobs start within a second, not 2 s or more later (batch_sched_delay: 3 s by default)
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# the node's CPUs as written here, whatever the machine has
SlurmdParameters=config_overrides
ReturnToService=2
# slurmctld talks to every slurmd itself, no forwarding through another node
TreeWidth=65533
{listen}# scancel: SIGTERM, then SIGKILL this many seconds later (default 30)
KillWait=2
MinJobAge=4
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=60
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]):
        env = self.env
        out = open(self.root / "log" / f"{name}.out", "ab")
        try:
            self._procs[name] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=subprocess.STDOUT,
                                                 cwd=self.root, start_new_session=True)
        finally:
            out.close()

    def _start_daemons(self):
        r = self.root
        m = r / "munge"
        # -F: in the foreground, logging to stderr (log/munged.out), not to --log-file
        self._spawn("munged", [_which("munged"), "-F", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", "--num-threads=2"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("munged did not start:\n" + _tail(r / "log" / "munged.out"))
            time.sleep(0.02)
        argv = [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)]
        if self.netns:
            argv = self._in_namespaces(CTL_NAME, argv, net=None)
        self._spawn("slurmctld", argv)
        for n in self.node_names:
            argv = [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)]
            if self.netns:
                # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup
                # mounts slurmd 22.05 insists on ("No filesystem mounted on /sys/fs/cgroup")
                argv = self._in_namespaces(n, argv, net=f"{NS_PREFIX}-{self.id}-{n}")
            self._spawn(f"slurmd-{n}", argv)

    def _in_namespaces(self, hostname: str, argv: list[str], net: str | None) -> list[str]:
        """argv run as `hostname` (a UTS namespace), with the nodes' /etc/hosts (a bind mount in a
        private mount namespace: nothing leaks out), in network namespace `net` if given. Each
        program execs the next: the pid is argv's."""
        binds = [("hosts", "/etc/hosts")] + ([("nsswitch.conf", "/etc/nsswitch.conf")] if net else [])
        mounts = " && ".join(f'mount --bind "{self.root / "run" / name}" {target}' for name, target in binds)
        argv = [_which("unshare"), "--mount", "--uts", "--", "/bin/sh", "-c",
                f'hostname "$1" && {mounts} && shift && exec "$@"', "sh", hostname, *argv]
        if net:
            argv = [_which("nsenter"), f"--net=/run/netns/{net}", *argv]
        return argv

    def _wait_idle(self) -> str | None:
        """None once sinfo shows every node idle; else the error, with the logs' tails."""
        deadline = time.monotonic() + self.start_timeout
        states: dict[str, str] = {}
        delay = 0.05
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                return self._failure(f"{', '.join(dead)} exited during start", states)
            states = self.node_states()
            if states and all(states.get(n) == "idle" for n in self.node_names):
                return None
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        return self._failure(f"nodes not idle within {self.start_timeout:.0f} s", states)

    def _failure(self, what: str, states: dict) -> str:
        logs = self.root / "log"
        parts = [f"Slurm cluster under {self.root}: {what}; sinfo: {states or 'no answer'}"]
        for p in sorted(logs.iterdir()):
            parts.append(f"--- {p.name} (tail)\n{_tail(p)}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- processes
    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (see the module's docstring)."""
        found: dict[int, psutil.Process] = {}
        me = psutil.Process()
        exclude = {me.pid, *(a.pid for a in me.parents())}  # a caller run with `env`
        for p in self._procs.values():
            if p.poll() is None:
                try:
                    found[p.pid] = psutil.Process(p.pid)
                except psutil.NoSuchProcess:
                    pass
        for p in psutil.process_iter():
            try:
                if p.pid in found or p.pid in exclude:
                    continue
                if self._ns_ids and _net_ns(p.pid) in self._ns_ids:
                    found[p.pid] = p
                elif p.uids().real == os.geteuid() and (p.environ().get(MARKER) == self.id
                                                        or self._holds_log(p.pid)):
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                pass
        _add_descendants(found)
        live = []
        for p in found.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    live.append(p)
            except psutil.NoSuchProcess:
                pass
        return live

    def _holds_log(self, pid: int) -> bool:
        """slurmstepd: slurmd starts it with an empty environment and it leaves slurmd's tree (a
        double fork), but it keeps slurmd's log file open."""
        logs = f"{self.root}/log/"
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(logs):
                    return True
            except OSError:
                pass
        return False

    @staticmethod
    def _signal_wait(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            _, procs = psutil.wait_procs(procs, timeout=wait)
            procs = [p for p in procs if _pid_alive(p.pid)]
            if not procs:
                break
        return procs

    def _stop_processes(self):
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:  # end the jobs the way Slurm does, briefly; whatever is left is killed below
                jobs = self.run(["squeue", "-h", "-o", "%i"], timeout=5, check=False).stdout.split()
                if jobs:
                    self.run(["scancel", *jobs], timeout=5, check=False)
                    deadline = time.monotonic() + 3
                    while time.monotonic() < deadline and self.run(
                            ["squeue", "-h", "-t", "running,completing", "-o", "%i"],
                            timeout=5, check=False).stdout.split():
                        time.sleep(0.2)
            except (subprocess.TimeoutExpired, OSError):
                pass
        munged = self._procs.get("munged")
        for _ in range(3):  # whatever starts while stopping (a step launching) is caught next round
            procs = [p for p in self.processes() if munged is None or p.pid != munged.pid]
            if not procs:
                break
            self._signal_wait(procs, timeout=5.0)
        if munged is not None and munged.poll() is None:
            try:
                self._signal_wait([psutil.Process(munged.pid)], timeout=5.0)
            except psutil.NoSuchProcess:
                pass
        for p in self._procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = self.processes()
        self._procs.clear()
        if left:
            raise RuntimeError(f"Slurm cluster processes left after stop: "
                               f"{[(p.pid, p.name()) for p in left]}")

    # ---------------------------------------------------------------- stop
    def stop(self):
        """Ends every process of the cluster (SIGTERM, then SIGKILL, bounded), removes its
        namespaces and files. Idempotent."""
        error = None
        try:
            self._stop_processes()
        except RuntimeError as e:
            error = e
        self._remove_namespaces()
        if self.root is not None:
            if self._given_root is None:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                for p in self._made:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    elif p.exists():
                        p.unlink()
            self._made.clear()
        if error:
            raise error

    def _remove_namespaces(self):
        if self._host_veth:
            _ip("link", "del", self._host_veth, check=False)
            self._host_veth = None
        for ns in self._namespaces:
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        self._ns_ids.clear()

    @classmethod
    def _sweep_stale(cls):
        """What clusters whose creating process died without stopping them (a killed test run)
        left: their processes (by marker, by namespace, holding their logs open, and the
        descendants), namespaces (named <prefix>-<creator pid>-...) and directories."""
        dead: dict[int, bool] = {}

        def creator_dead(ident: str) -> bool:
            m = re.fullmatch(r"(\d+)-[0-9a-f]{8}", ident)
            if not m:
                return False
            pid = int(m.group(1))
            if pid not in dead:
                dead[pid] = not _pid_alive(pid)
            return dead[pid]

        try:
            names = os.listdir("/run/netns")
        except OSError:
            names = []
        stale_ns = {}
        for name in names:
            m = re.fullmatch(rf"{NS_PREFIX}-(\d+-[0-9a-f]{{8}})-\w+", name)
            if m and creator_dead(m.group(1)):
                try:
                    stale_ns[name] = (m.group(1), _ns_id(name))
                except OSError:
                    pass
        ns_ids = {v[1] for v in stale_ns.values()}
        roots: set[str] = set()
        procs: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if p.pid == os.getpid() or p.uids().real != os.geteuid():
                    continue
                if ns_ids and _net_ns(p.pid) in ns_ids:
                    procs[p.pid] = p
                    continue
                env = p.environ()
                if creator_dead(env.get(MARKER, "")):
                    procs[p.pid] = p
                    conf = env.get("SLURM_CONF", "")
                    if conf.endswith("/slurm.conf"):
                        roots.add(conf[:-len("/slurm.conf")])
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                pass
        roots = {r for r in roots if _written_here(Path(r) / "slurm.conf")}
        if roots:  # slurmstepd's: no environment, but the log open
            for p in psutil.process_iter():
                try:
                    links = [os.readlink(f"/proc/{p.pid}/fd/{fd}")
                             for fd in os.listdir(f"/proc/{p.pid}/fd")]
                except OSError:
                    continue
                if any(link.startswith(f"{r}/log/") for r in roots for link in links):
                    procs[p.pid] = p
        _add_descendants(procs)
        if procs:
            cls._signal_wait(list(procs.values()), timeout=1.0)
        for name, (ident, _) in stale_ns.items():
            _ip("link", "del", f"mpf{ident[-8:]}", check=False)
            _ip("netns", "del", name, check=False)
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)


def ensure_available() -> tuple[bool, str]:
    """Whether a cluster can start here, installing Slurm first where it can (root, apt-get);
    and why not."""
    ok, why = SlurmCluster.available()
    if not ok and SlurmCluster.can_install():
        r = SlurmCluster.install()
        ok, why = SlurmCluster.available()
        if not ok:
            why += f" (scripts/install_slurm.sh exited {r.returncode}: {r.stdout}{r.stderr})"
    return ok, why


def _written_here(conf: Path) -> bool:
    try:
        with open(conf) as f:
            return f.readline().startswith(CONF_HEADER)
    except OSError:
        return False
