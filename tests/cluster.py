"""Hosts on this machine for multi-host tests: network namespaces, each with its own address,
hostname, /etc/hosts and sshd, joined by a bridge; the filesystem is shared, as a cluster's is.

``Cluster`` creates them, writes a hostfile, puts an ``ssh`` wrapper first in PATH (a test-only key
and config; ~/.ssh is never touched), and tears everything down by name and PID, also when a test
fails. Every address is on the bridge, which exists only in this machine's root namespace: no
packet leaves the machine. ``skip_reason()`` says why the tests cannot run here (not root, no ``ip``
/ ``unshare`` / ``sshd`` / ``pdsh``), for ``pytest.skip``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

NEEDED = ("ip", "unshare", "ssh", "ssh-keygen", "/usr/sbin/sshd", "pdsh")


def skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "network-namespace hosts need root"
    missing = [tool for tool in NEEDED if shutil.which(tool) is None and not Path(tool).is_file()]
    if missing:
        return f"missing {missing} (CI installs openssh-server, pdsh, openmpi-bin through apt)"
    probe = f"mdtprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot create network namespaces here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


class Cluster:
    """``hosts`` namespace-hosts ``<prefix>h0``, ``<prefix>h1``, ... at 10.77.<net>.1, .2, ..."""

    made = 0  # clusters made by this process: each gets its own names and subnet

    def __init__(self, workdir: Path, hosts: int = 2, loopback_hostnames: bool = False):
        Cluster.made += 1
        tag = (os.getpid() * 7 + Cluster.made) % 200
        self.prefix = f"mdt{tag}"
        self.net = 20 + tag  # 10.77.20.0/24 .. 10.77.219.0/24: one subnet per cluster
        self.bridge = f"{self.prefix}br"
        self.dir = Path(workdir)
        self.names = [f"{self.prefix}h{i}" for i in range(hosts)]
        self.addrs = [f"10.77.{self.net}.{i + 1}" for i in range(hosts)]
        self.sshd_pids: list[int] = []
        # as Debian/Ubuntu write /etc/hosts: each host's own name on 127.0.1.1 (the others on their addresses)
        self.loopback_hostnames = loopback_hostnames

    # ---- set up ----

    def start(self) -> "Cluster":
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._network()
            self._keys_and_configs()
            for i in range(len(self.names)):
                self._sshd(i)
            self._wait_for_ssh()
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"10.77.{self.net}.254/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for name, addr in zip(self.names, self.addrs):
            _sh("ip", "netns", "add", name)
            _sh("ip", "link", "add", f"{name}v", "type", "veth", "peer", "name", "eth0", "netns", name)
            _sh("ip", "link", "set", f"{name}v", "master", self.bridge, "up")
            _sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", name, "link", "set", "eth0", "up")
            _sh("ip", "-n", name, "link", "set", "lo", "up")

    def _keys_and_configs(self) -> None:
        d = self.dir
        for key in ("id", *(f"host_key_{n}" for n in self.names)):
            if not (d / key).is_file():
                _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key))
        shutil.copy(d / "id.pub", d / "authorized_keys")
        for me in self.names:
            entries = [(n, "127.0.1.1" if n == me and self.loopback_hostnames else a) for n, a in zip(self.names, self.addrs)]
            (d / f"hosts_{me}").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in entries))
        blocks = [f"Host {n}\n  HostName {a}\n" for n, a in zip(self.names, self.addrs)]
        (d / "ssh_config").write_text("".join(blocks) + (
            f"Host *\n  User root\n  IdentityFile {d / 'id'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n  ConnectTimeout 10\n"
            # a host whose link died resets nothing: without keepalives pdsh's ssh to it waits for hours
            "  ServerAliveInterval 5\n  ServerAliveCountMax 3\n"))
        (d / "bin").mkdir(exist_ok=True)
        wrapper = d / "bin" / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory

    def _sshd(self, i: int) -> None:
        name, d = self.names[i], self.dir
        config = d / f"sshd_{name}.conf"
        config.write_text(
            f"ListenAddress {self.addrs[i]}\nPort 22\nHostKey {d / f'host_key_{name}'}\nPidFile {d / f'sshd_{name}.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin yes\nPasswordAuthentication no\n"
            "UsePAM no\nStrictModes no\nAcceptEnv *\n")
        script = (f"mount --bind {d / f'hosts_{name}'} /etc/hosts && hostname {name} && "
                  f"exec /usr/sbin/sshd -D -e -f {config}")
        proc = subprocess.Popen(["ip", "netns", "exec", name, "unshare", "--mount", "--uts", "sh", "-c", script],
                                stdout=open(d / f"sshd_{name}.log", "w"), stderr=subprocess.STDOUT)
        self.sshd_pids.append(proc.pid)

    def _wait_for_ssh(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        for name in self.names:
            while True:
                done = subprocess.run(["ssh", name, "hostname"], env=self.env(), capture_output=True, text=True)
                if done.returncode == 0 and done.stdout.strip() == name:
                    break
                if time.time() > deadline:
                    log = (self.dir / f"sshd_{name}.log").read_text()
                    raise RuntimeError(f"ssh to {name} failed: {done.stderr.strip()}; sshd: {log[-1000:]}")
                time.sleep(0.2)

    # ---- use ----

    def env(self, **extra: str) -> dict:
        """The environment of a launch from the root namespace: the ssh wrapper first in PATH."""
        env = dict(os.environ, PATH=f"{self.dir / 'bin'}:{os.environ['PATH']}", **extra)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        return env

    def hostfile(self, slots: int, hosts: Optional[int] = None) -> Path:
        path = self.dir / f"hostfile_{slots}x{hosts or len(self.names)}"
        path.write_text("".join(f"{n} slots={slots}\n" for n in self.names[:hosts or len(self.names)]))
        return path

    def pids(self, name: str) -> list[int]:
        out = _sh("ip", "netns", "pids", name, check=False).stdout.split()
        return [int(p) for p in out]

    def kill_host(self, name: str, keep_sshd: bool = True) -> None:
        """SIGKILL every process in ``name``'s namespace (but its sshd, unless asked)."""
        sshd = set(self._sshd_tree(name)) if keep_sshd else set()
        for pid in self.pids(name):
            if pid not in sshd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _sshd_tree(self, name: str) -> list[int]:
        pid_file = self.dir / f"sshd_{name}.pid"
        return [int(pid_file.read_text())] if pid_file.is_file() else []

    def cut_link(self, name: str) -> None:
        _sh("ip", "-n", name, "link", "set", "eth0", "down")

    def restore_link(self, name: str) -> None:
        _sh("ip", "-n", name, "link", "set", "eth0", "up")

    # ---- tear down ----

    def stop(self) -> None:
        for name in self.names:
            for pid in self.pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in self.sshd_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in self.names:
            _sh("ip", "netns", "del", name, check=False)
            _sh("ip", "link", "del", f"{name}v", check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
