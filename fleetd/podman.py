"""Which container a unit runs, read the way podman's own systemd units record it.

Units in the shape `podman generate systemd --new` writes keep their container's id in
`%t/%n.ctr-id` (`--cidfile`), where `%t` is the manager's runtime directory. The unit manager
adapter asks this probe about each running unit, so the agent publishes the container's id and
image beside the systemd state and `fleetctl status` can show them. A unit without that file is
simply not a container unit; nothing here is required for fleet to schedule containers.

State reads must stay fast (the agent's fencing depends on them), so the probe only reads the
cidfile inline; the image name comes from `podman container inspect`, run once per container on
a worker thread. Until it answers, the container is reported with an empty image, and the next
state read carries the name.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fleetd.model import Container

log = logging.getLogger(__name__)

CIDFILE_SUFFIX = ".ctr-id"
# Bounds the id -> image cache; containers are replaced rarely, so a flush now and then is cheap.
_MAX_CACHED = 512


def runtime_dir(user: bool) -> Path:
    """What systemd expands `%t` to: the user manager's XDG_RUNTIME_DIR, or /run."""
    if user:
        return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}")
    return Path("/run")


class PodmanProbe:
    """Finds a unit's container from its cidfile; asks podman, once per container and off the
    caller's thread, for the image it runs."""

    def __init__(self, runtime: Path, podman: str = "podman", timeout: float = 5.0) -> None:
        self.runtime = runtime
        self.podman = podman
        self.timeout = timeout
        self._lock = threading.Lock()
        self._images: dict[str, str] = {}  # container id -> image ("" when podman had none)
        self._pending: dict[str, Future[None]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._missing = False  # no podman on this host: stop asking

    def container(self, unit: str) -> Container | None:
        """The container `unit` runs, or None when it has no cidfile. The image is empty until
        podman has answered for this container."""
        try:
            cid = (self.runtime / f"{unit}{CIDFILE_SUFFIX}").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not cid:
            return None
        with self._lock:
            image = self._images.get(cid)
            if image is None and cid not in self._pending and not self._missing:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="podman-probe")
                self._pending[cid] = self._pool.submit(self._resolve, cid)
        return Container(cid, image or "")

    def containers(self, units: Iterable[str]) -> dict[str, Container]:
        """The containers of those of `units` that have one. The runtime directory is listed
        once and only the cidfiles there are read: a state read of a hundred units, most of
        them no container units, would otherwise try a hundred files that are not there."""
        try:
            present = {n for n in os.listdir(self.runtime) if n.endswith(CIDFILE_SUFFIX)}
        except OSError:
            return {}
        found: dict[str, Container] = {}
        for unit in units:
            if f"{unit}{CIDFILE_SUFFIX}" in present:
                container = self.container(unit)
                if container is not None:
                    found[unit] = container
        return found

    def drain(self, timeout: float | None = None) -> None:
        """Wait for the lookups asked for so far (tests; shutdown)."""
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            future.result(timeout)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _resolve(self, cid: str) -> None:
        image = self._inspect(cid)
        with self._lock:
            self._pending.pop(cid, None)
            if image is None:
                return  # asked again at the next read (podman busy, or the container is gone)
            if len(self._images) >= _MAX_CACHED:
                self._images.clear()
            self._images[cid] = image

    def _inspect(self, cid: str) -> str | None:
        try:
            result = subprocess.run(
                [self.podman, "container", "inspect", "--format", "{{.ImageName}}", cid],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            log.info("no %s on this host: container images are not published", self.podman)
            with self._lock:
                self._missing = True
            return None
        except subprocess.TimeoutExpired:
            log.warning("%s container inspect %s took over %ss", self.podman, cid, self.timeout)
            return None
        if result.returncode != 0:
            return None
        return result.stdout.strip()
