"""A simulated cluster for tests and benchmarks: N network namespaces ("hosts") behind a Linux bridge (the switch).

    with SimCluster.create(4, tmp_dir) as cluster:          # root only; hosts hosta..hostd, 10.232.0.1..4
        cluster.shape(cluster.hosts[1], rate="1gbit", loss_pct=20)
        subprocess.run([*cluster.exec_in(cluster.hosts[0]), *cluster.horovodrun(slots=1), "python", "x.py"],
                       env=cluster.env())
        cluster.set_link(cluster.hosts[3], up=False)          # pull host d's cable at the switch

Layout: namespace `dnmtc-sw` holds bridge `br0` and one port `p-<host>` per host; each host namespace `dnmtc-<host>`
holds the other end of that veth pair, named `nic0` on every host (Horovod needs one NIC name on all hosts).
Deleting the namespaces deletes the bridge and every link, so `destroy()` leaves nothing behind; `create()` first
removes whatever a killed earlier run left (every namespace and /etc/netns entry named `dnmtc-*`).

Launch recipe (FIELD_NOTES, "Verified two-host recipe", extended to N hosts): an `ssh` shim first on PATH maps a
host name or address to its namespace and runs the command there; it also serves as Open MPI's launch agent
(`--mca plm_rsh_agent <shim>`). `/etc/netns/<ns>/hosts` maps every host name to its address and this machine's
hostname to the namespace's own address (Horovod's Gloo process sets dial the hostname). Every command runs in a
fresh UTS namespace whose hostname is the host's name: Open MPI tells nodes apart by hostname, and with one
hostname for all, 2 hosts x 2 slots crash in MPI_Allgather during hvd.init() (Open MPI 4.1.4).

Link shaping uses `tc netem` (rate, delay, loss) when the kernel has sch_netem. Kernels without it (e.g. this
Firecracker guest: `Specified qdisc kind is unknown`) get `tbf` for the rate and an iptables `statistic` rule for
random loss; delay then needs netem and raises.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from integration.netns import (  # noqa: F401 (available: re-exported for the tests)
    IP,
    NETNS_ETC,
    ShimEnv,
    _ip,
    _kill_namespace_processes,
    available,
    write_etc_hosts,
    write_ssh_shim,
)

PREFIX = "dnmtc-"
SWITCH = PREFIX + "sw"
NIC = "nic0"
SUBNET = "10.232.0"
HOROVODRUN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "horovodrun")
IPTABLES = shutil.which("iptables-legacy") or shutil.which("iptables") or "iptables"
# One simulated cluster per machine at a time (the names are fixed so leftovers can be found): held while it lives,
# released by the kernel when its process dies, so whoever takes it next may delete what is left.
LOCK_PATH = Path("/run/lock/dist-nmt-simcluster.lock")
LOCK_WAIT_SECONDS = 1800


@dataclass(frozen=True)
class SimHost:
    name: str  # resolvable inside every namespace, and what -H / ssh / mpirun use
    namespace: str
    address: str


@dataclass
class SimCluster(ShimEnv):
    """N hosts on one switch, an ssh shim and per-namespace /etc/hosts. Use as a context manager."""

    hosts: list[SimHost]
    shim_dir: Path
    nic: str = NIC
    _netem: bool | None = field(default=None, repr=False)
    _lock_fd: int | None = field(default=None, repr=False)

    @classmethod
    def create(cls, num_hosts: int, shim_parent: Path) -> SimCluster:
        """Build the switch, hosts, shim and hosts files; on any failure, tear down what was built and re-raise."""
        if not 1 <= num_hosts <= 26:
            raise ValueError(f"num_hosts={num_hosts}: choose 1..26 (hosts are named hosta..hostz)")
        names = [f"host{chr(ord('a') + i)}" for i in range(num_hosts)]
        hosts = [SimHost(n, PREFIX + n, f"{SUBNET}.{i + 1}") for i, n in enumerate(names)]
        cluster = cls(hosts, Path(shim_parent) / "ssh-shim")
        cluster._lock_fd = _take_lock()
        try:
            cleanup_leftovers()  # what a killed earlier run left (the lock says nobody else is using it)
            cluster._build_network()
            cluster._write_etc_hosts()
            cluster._write_ssh_shim()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def exec_in(self, host: SimHost) -> list[str]:
        """Command prefix running a program inside `host`: its network namespace and its own hostname (a new UTS
        namespace), environment inherited."""
        return [IP, "netns", "exec", host.namespace, "unshare", "--uts", "--", str(self.shim_dir / "as-host"),
                host.name]

    def host_list(self, slots: int = 1, hosts: list[SimHost] | None = None) -> str:
        """`hosta:2,hostb:2` for horovodrun -H / mpirun -H."""
        return ",".join(f"{h.name}:{slots}" for h in (hosts or self.hosts))

    def horovodrun(self, slots: int = 1, hosts: list[SimHost] | None = None) -> list[str]:
        """`horovodrun --gloo -np N -H ...` over `hosts` (all by default); run it inside the first of them."""
        hosts = hosts or self.hosts
        # --disable-cache: horovodrun otherwise reuses ssh/NIC check results from ~/.horovod for an hour.
        return [HOROVODRUN, "-np", str(slots * len(hosts)), "-H", self.host_list(slots, hosts), "--gloo",
                "--network-interface", self.nic, "--disable-cache"]

    def mpirun(self, slots: int = 1, hosts: list[SimHost] | None = None, env_vars: tuple[str, ...] = ()) -> list[str]:
        """Open MPI `mpirun` whose launch agent (the shim) enters each host's namespace; TCP over the test NIC."""
        hosts = hosts or self.hosts
        exports = [a for v in env_vars for a in ("-x", v)]
        return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(slots * len(hosts)),
                "-H", self.host_list(slots, hosts), "--mca", "plm_rsh_agent", str(self.shim_dir / "ssh"),
                "--mca", "oob_tcp_if_include", self.nic, "--mca", "btl_tcp_if_include", self.nic,
                "--mca", "btl", "self,tcp", "--mca", "pml", "ob1", "-bind-to", "none", "-map-by", "slot", *exports]

    def pids(self) -> dict[str, list[int]]:
        """Live processes per host namespace (an empty list everywhere = nothing left behind)."""
        out = {}
        for host in self.hosts:
            proc = subprocess.run([IP, "netns", "pids", host.namespace], capture_output=True, text=True)
            out[host.name] = [int(p) for p in proc.stdout.split() if p.isdigit()]
        return out

    def set_link(self, host: SimHost, up: bool) -> None:
        """Plug (`up=True`) or pull the host's cable: its port on the switch goes up or down."""
        _ip("-n", SWITCH, "link", "set", _port(host), "up" if up else "down")

    def shape(self, host: SimHost, rate: str = "", delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Shape the host's link: `rate` (tc syntax, e.g. "1gbit") and one-way `delay_ms` in both directions,
        random loss of `loss_pct` % of the packets the host sends (netem's meaning on the host's NIC).

        Calling it again replaces the earlier shaping; all zero/empty removes it.
        """
        for namespace, dev, loss in ((host.namespace, self.nic, loss_pct), (SWITCH, _port(host), 0.0)):
            subprocess.run([IP, "netns", "exec", namespace, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True)
            if self._has_netem() and (rate or delay_ms or loss):
                args = [*(["rate", rate] if rate else []), *(["delay", f"{delay_ms}ms"] if delay_ms else []),
                        *(["loss", f"{loss}%"] if loss else []), "limit", "100000"]
                _tc(namespace, "qdisc", "add", "dev", dev, "root", "netem", *args)
                continue
            if delay_ms:
                raise RuntimeError("link delay needs tc netem, which this kernel lacks: `modprobe sch_netem` "
                                   "(or use a kernel with CONFIG_NET_SCH_NETEM)")
            if rate:
                # A bucket of 1 ms of traffic: bigger lets whole small messages through at veth speed.
                _tc(namespace, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                    str(max(int(rate_bits_per_s(rate) / 8 / 1000), 16_384)), "latency", "200ms")
            if namespace != SWITCH:
                _set_iptables_loss(namespace, dev, loss)

    def dropped(self, host: SimHost) -> int:
        """Packets the loss emulation has dropped on the host's NIC so far (netem's or iptables' counter)."""
        if self._has_netem():
            stats = subprocess.run([IP, "netns", "exec", host.namespace, "tc", "-s", "qdisc", "show", "dev", self.nic],
                                   capture_output=True, text=True).stdout
            return sum(int(part.split(",")[0]) for part in stats.split("dropped ")[1:])
        rules = subprocess.run([IP, "netns", "exec", host.namespace, IPTABLES, "-L", "OUTPUT", "-v", "-x", "-n"],
                               capture_output=True, text=True).stdout
        return sum(int(line.split()[0]) for line in rules.splitlines() if "DROP" in line and "statistic" in line)

    def destroy(self) -> None:
        """Kill what still runs on the hosts, delete every namespace (so the switch and links), hosts files, shim.

        Safe to call repeatedly and on a half-built cluster; never raises.
        """
        for host in self.hosts:
            _kill_namespace_processes(host.namespace)
        cleanup_leftovers()
        shutil.rmtree(self.shim_dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _has_netem(self) -> bool:
        if self._netem is None:
            probe = subprocess.run([IP, "netns", "exec", SWITCH, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                    "delay", "0ms"], capture_output=True, text=True)
            self._netem = probe.returncode == 0
            subprocess.run([IP, "netns", "exec", SWITCH, "tc", "qdisc", "del", "dev", "lo", "root"],
                           capture_output=True)
        return self._netem

    def _build_network(self) -> None:
        _ip("netns", "add", SWITCH)
        _ip("-n", SWITCH, "link", "set", "lo", "up")
        _ip("-n", SWITCH, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", SWITCH, "link", "set", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            # Created inside the switch namespace, the host end then moved (renamed) into the host's namespace.
            _ip("-n", SWITCH, "link", "add", "name", _port(host), "type", "veth", "peer", "name", self.nic,
                "netns", host.namespace)
            _ip("-n", SWITCH, "link", "set", _port(host), "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", self.nic)
            _ip("-n", host.namespace, "link", "set", self.nic, "up")

    def _write_etc_hosts(self) -> None:
        NETNS_ETC.mkdir(exist_ok=True)
        write_etc_hosts({h.namespace: h.address for h in self.hosts}, {h.name: h.address for h in self.hosts})

    def _write_ssh_shim(self) -> None:
        write_ssh_shim(self.shim_dir,
                       "".join(f"  {h.name}|{h.address}) ns={h.namespace} name={h.name} ;;\n" for h in self.hosts),
                       f'exec {IP} netns exec "$ns" unshare --uts -- "{self.shim_dir}/as-host" "$name" bash -c "$*"')
        # Open MPI tells nodes apart by hostname (with one hostname for all, 2 hosts x 2 slots crash in MPI_Allgather).
        as_host = self.shim_dir / "as-host"
        as_host.write_text('#!/bin/bash\n# as-host NAME CMD...: set this UTS namespace\'s hostname, run CMD\n'
                           'hostname "$1" && shift && exec "$@"\n')
        as_host.chmod(0o755)


def _take_lock() -> int:
    """Exclusive flock on LOCK_PATH, waiting up to LOCK_WAIT_SECONDS for another cluster (test or bench) to end."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.time() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except BlockingIOError:
            if time.time() > deadline:
                holder = Path(LOCK_PATH).read_text().strip()
                os.close(fd)
                raise RuntimeError(f"another simulated cluster (pid {holder}) has held {LOCK_PATH} for "
                                   f"{LOCK_WAIT_SECONDS} s; wait for it to end or kill it") from None
            time.sleep(1)


def cleanup_leftovers() -> None:
    """Delete every `dnmtc-*` namespace and /etc/netns entry (this run's, or a killed earlier run's)."""
    listing = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    for namespace in (line.split()[0] for line in listing.splitlines() if line.startswith(PREFIX)):
        _kill_namespace_processes(namespace)
        subprocess.run([IP, "netns", "del", namespace], capture_output=True)
    if NETNS_ETC.is_dir():
        for etc in NETNS_ETC.glob(PREFIX + "*"):
            shutil.rmtree(etc, ignore_errors=True)


def rate_bits_per_s(rate: str) -> float:
    """tc rate syntax ("100mbit", "1gbit", "10Gbit", "500kbit") in bits per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12, "bit": 1.0}
    text = rate.strip().lower()
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise ValueError(f"link rate {rate!r}: write it like tc does, e.g. 100mbit, 1gbit, 10gbit")


def _port(host: SimHost) -> str:
    return f"p-{host.name}"


def _tc(namespace: str, *args: str) -> None:
    proc = subprocess.run([IP, "netns", "exec", namespace, "tc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} in {namespace} failed: {proc.stderr.strip()}")


def _set_iptables_loss(namespace: str, dev: str, loss_pct: float) -> None:
    """Drop `loss_pct` % of the packets leaving `dev` at random (replaces an earlier rule of ours)."""
    base = [IP, "netns", "exec", namespace, IPTABLES]
    subprocess.run([*base, "-F", "OUTPUT"], capture_output=True)
    if not loss_pct:
        return
    proc = subprocess.run([*base, "-A", "OUTPUT", "-o", dev, "-m", "statistic", "--mode", "random",
                           "--probability", f"{loss_pct / 100:.4f}", "-j", "DROP"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"random packet loss needs tc netem or iptables (Debian package iptables) with the "
                           f"statistic match: {proc.stderr.strip()}")
