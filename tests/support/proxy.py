"""The loopback relay of the local cluster tool (vagrant/localcluster/proxy.py), in-process, to cut
one agent off from etcd (a partition) without touching the network outside 127.0.0.1.

`cut()` drops every open connection and refuses new ones (`cut("blackhole")` accepts and ignores
them); `heal()` lets traffic through again.
"""

from __future__ import annotations

import sys
from pathlib import Path

_VAGRANT = str(Path(__file__).resolve().parents[2] / "vagrant")
if _VAGRANT not in sys.path:
    sys.path.insert(0, _VAGRANT)

from localcluster.proxy import Relay  # noqa: E402


class Proxy(Relay):
    """One relay in front of one etcd endpoint, serving from a thread of the test process."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__([(target_host, target_port)])
        self.start()
