"""Two "hosts" on one machine for launcher tests: Linux network namespaces joined by a veth link.

    hosts = TwoHosts.create(tmp_dir)        # root only
    try:
        subprocess.run([*hosts.exec_in(hosts.first), "horovodrun", "-np", "2", "-H", hosts.horovod_hosts(),
                        "--gloo", "--network-interface", hosts.nic, ...], env=hosts.env())
    finally:
        hosts.destroy()

What `horovodrun` needs to treat the namespaces as two machines (FIELD_NOTES, "Verified two-host recipe"):
- the link's two ends carry the same interface name (`--network-interface nic0` must exist on every host);
- `ssh` is a shim first on PATH: horovodrun runs `ssh [-o OPT]... HOST [-p P] [-i F] [-o OPT] 'CMD'` for its
  reachability check and to start remote workers, putting every environment variable on CMD as `env K=V ...`;
  the shim maps HOST to its namespace and runs CMD there with `bash -c`;
- `/etc/netns/<ns>/hosts` (bind-mounted over /etc/hosts by `ip netns exec`) maps this machine's hostname to the
  namespace's own address: Horovod 0.28.1 builds its process-set Gloo contexts from the hostname, and without the
  mapping rank 0 dials 127.0.0.1 (`connect [127.0.0.1]:PORT: Connection refused`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"
NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str  # IPv4 address on the test link, without prefix length


class ShimEnv:
    """What a test harness with an ssh shim in `self.shim_dir` offers its tests (TwoHosts, cluster.SimCluster)."""

    shim_dir: Path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ plus `extra`, with the ssh shim first on PATH."""
        env = {**os.environ, **(extra or {})}
        env["PATH"] = f"{self.shim_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def ssh_calls(self) -> list[tuple[str, str]]:
        """(namespace, command) of every ssh the shim has served, in order."""
        log = self.shim_dir / "calls.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [tuple(line.split(" ", 1)) for line in lines]


@dataclass
class TwoHosts(ShimEnv):
    """Two namespaces, one veth link named `nic` at both ends, an ssh shim and per-namespace /etc/hosts."""

    first: Host
    second: Host
    nic: str
    shim_dir: Path
    prefix_len: int = 24
    _created_etc: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, shim_parent: Path, names: tuple[str, str] = ("dnmt-h1", "dnmt-h2"),
               addresses: tuple[str, str] = ("10.231.0.1", "10.231.0.2"), nic: str = "nic0") -> TwoHosts:
        """Build everything; on any failure, tear down what was built and re-raise."""
        hosts = cls(Host(names[0], addresses[0]), Host(names[1], addresses[1]), nic, Path(shim_parent) / "ssh-shim")
        hosts.destroy()  # leftovers of an earlier run that was killed before its finaliser ran
        try:
            hosts._create_link()
            hosts._write_etc_hosts()
            hosts._write_ssh_shim()
        except BaseException:
            hosts.destroy()
            raise
        return hosts

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.first, self.second

    def exec_in(self, host: Host) -> list[str]:
        """Command prefix that runs a program inside the host's namespace (environment is inherited)."""
        return [IP, "netns", "exec", host.namespace]

    def horovod_hosts(self, slots: int = 1) -> str:
        """`-H` argument for horovodrun: `ADDR1:slots,ADDR2:slots`."""
        return ",".join(f"{h.address}:{slots}" for h in self.hosts)

    def link_bytes(self, host: Host) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of the test NIC inside the host's namespace."""
        out = _ip("-n", host.namespace, "-s", "-j", "link", "show", self.nic)
        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def destroy(self) -> None:
        """Kill what still runs in the namespaces, delete them (and so the link), the hosts files and the shim.

        Safe to call repeatedly and on a half-built set-up; never raises.
        """
        for host in self.hosts:
            _kill_namespace_processes(host.namespace)
            subprocess.run([IP, "netns", "del", host.namespace], capture_output=True)
            etc = NETNS_ETC / host.namespace
            if etc.is_dir():
                shutil.rmtree(etc, ignore_errors=True)
        if NETNS_ETC.is_dir() and NETNS_ETC in self._created_etc and not any(NETNS_ETC.iterdir()):
            NETNS_ETC.rmdir()
        shutil.rmtree(self.shim_dir, ignore_errors=True)

    def _create_link(self) -> None:
        for host in self.hosts:
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        # Created directly inside the namespaces, so the shared name never clashes in the root namespace.
        _ip("link", "add", self.nic, "netns", self.first.namespace, "type", "veth",
            "peer", "name", self.nic, "netns", self.second.namespace)
        for host in self.hosts:
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/{self.prefix_len}", "dev", self.nic)
            _ip("-n", host.namespace, "link", "set", self.nic, "up")

    def _write_etc_hosts(self) -> None:
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir()
            self._created_etc.append(NETNS_ETC)
        write_etc_hosts({h.namespace: h.address for h in self.hosts}, {h.namespace: h.address for h in self.hosts})

    def _write_ssh_shim(self) -> None:
        write_ssh_shim(self.shim_dir, "".join(f"  {h.address}) ns={h.namespace} ;;\n" for h in self.hosts),
                       f'exec {IP} netns exec "$ns" bash -c "$*"')


def write_etc_hosts(namespaces: dict[str, str], names: dict[str, str]) -> None:
    """`/etc/netns/<ns>/hosts` for each namespace -> its address: this machine's hostname at the namespace's own
    address (Horovod's Gloo contexts dial the hostname), localhost, then every name -> address in `names`."""
    me = socket.gethostname()
    table = "".join(f"{address}\t{name}\n" for name, address in names.items())
    for namespace, address in namespaces.items():
        (NETNS_ETC / namespace).mkdir()
        (NETNS_ETC / namespace / "hosts").write_text(
            f"{address}\t{me}\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{table}")


def write_ssh_shim(shim_dir: Path, cases: str, exec_line: str) -> Path:
    """`shim_dir/ssh`: an ssh stand-in that parses `ssh [OPTIONS] [USER@]HOST [OPTIONS] COMMAND...` (horovodrun and
    Open MPI pass -o/-p/-i options before and after HOST; they are ignored), picks HOST's namespace by the bash
    `case` arms `cases` (which set $ns and anything `exec_line` reads), logs the call and runs `exec_line`."""
    shim_dir.mkdir(parents=True)
    shim = shim_dir / "ssh"
    shim.write_text(f"""#!/bin/bash
# ssh stand-in for tests: ssh [OPTIONS] [USER@]HOST [OPTIONS] COMMAND... runs COMMAND in HOST's network namespace.
host=
while [ $# -gt 0 ]; do
  case "$1" in
    -[oipFlJLRDEcmS]) shift 2 ;;
    -*) shift ;;
    *) if [ -z "$host" ]; then host=${{1#*@}}; shift; else break; fi ;;
  esac
done
case "$host" in
{cases}  *) echo "ssh shim: unknown host '$host'" >&2; exit 255 ;;
esac
echo "$ns $*" >> "{shim_dir}/calls.log"
{exec_line}
""")
    shim.chmod(0o755)
    return shim


def available() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not Path(IP).exists():
        return "`ip` (Debian package iproute2) is not installed"
    probe = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def _ip(*args: str) -> str:
    proc = subprocess.run([IP, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _kill_namespace_processes(namespace: str) -> None:
    """SIGKILL the processes this test left in its namespace (by pid), then wait briefly for them to go."""
    proc = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True)
    pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    while pids and time.time() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.05)
