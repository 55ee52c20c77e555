"""Which network interface a job that spans hosts talks over.

gloo binds to whatever this host's name resolves to. Debian and Ubuntu map the hostname to
127.0.1.1 in /etc/hosts, so every rank advertises a loopback address and a multi-host job dies
after ~25 s in ``connectFullMesh ... Connection refused, remote=[127.0.0.1]``. Before the process
group forms, ``choose_gloo_interface`` finds the interface whose address routes to the master and
sets ``GLOO_SOCKET_IFNAME`` to it (logged), or stops with an error naming the variable and the
address it saw. NCCL picks a non-loopback interface itself; ``NCCL_SOCKET_IFNAME`` overrides it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
from typing import MutableMapping, Optional

from pipeline.errors import LaunchError

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def _resolves_to_loopback(name: str) -> Optional[str]:
    """The loopback address ``name`` resolves to, or None (resolves elsewhere, or not at all)."""
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        return None
    return addr if ipaddress.ip_address(addr).is_loopback else None


def route_source(master_addr: str, port: int = 9) -> Optional[str]:
    """This host's IPv4 address on the route to ``master_addr`` (no packet is sent: a UDP connect)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, port))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(address: str) -> Optional[str]:
    """The name of the (non-loopback) interface that holds IPv4 ``address``."""
    return next((name for name, addr in _non_loopback_interfaces().items() if addr == address), None)


def _non_loopback_interfaces() -> dict[str, str]:
    """Interface name -> IPv4 address, loopback left out."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            addr = socket.inet_ntoa(raw[20:24])
            if not ipaddress.ip_address(addr).is_loopback:
                found[name] = addr
    return found


def choose_gloo_interface(master_addr: Optional[str], spans_hosts: bool,
                          environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Set ``GLOO_SOCKET_IFNAME`` for a job across hosts whose hostname resolves to loopback; returns
    the interface chosen (None: nothing to do). LaunchError when no interface reaches the master."""
    if not spans_hosts or environ.get("GLOO_SOCKET_IFNAME"):
        return None
    hostname = socket.gethostname()
    loopback = _resolves_to_loopback(hostname)
    if loopback is None:
        return None
    source = route_source(master_addr) if master_addr else None
    iface = interface_of(source) if source and not ipaddress.ip_address(source).is_loopback else None
    others = _non_loopback_interfaces()
    if iface is None and len(others) == 1:  # the master is this host (its name is on loopback too): one way out
        iface, source = next(iter(others.items()))
    if iface is None:
        raise LaunchError(
            f"this host's name {hostname!r} resolves to the loopback address {loopback}, which gloo would advertise "
            f"to the other hosts, and no interface here routes to the master ({master_addr}"
            f"{f', via {source}' if source else ''}; interfaces: {others or 'none but loopback'}): set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the "
            "interface the hosts reach each other on, or map the hostname to that address in /etc/hosts")
    environ["GLOO_SOCKET_IFNAME"] = iface
    log.warning("%s resolves to %s (loopback): gloo talks over %s (%s), the interface that reaches the master %s",
                hostname, loopback, iface, source, master_addr)
    return iface
