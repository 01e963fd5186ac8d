"""Which container a unit runs, read the way podman's own systemd units record it.

Units in the shape `podman generate systemd --new` writes keep their container's id in
`%t/%n.ctr-id` (`--cidfile`), where `%t` is the manager's runtime directory. The unit manager
adapter asks this probe about each running unit, so the agent publishes the container's id and
image beside the systemd state and `fleetctl status` can show them. A unit without that file is
simply not a container unit; nothing here is required for fleet to schedule containers.
"""

from __future__ import annotations

import logging
import os
import subprocess
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
    """Finds a unit's container from its cidfile and asks podman (once per container) for the
    image it runs."""

    def __init__(self, runtime: Path, podman: str = "podman", timeout: float = 5.0) -> None:
        self.runtime = runtime
        self.podman = podman
        self.timeout = timeout
        self._images: dict[str, str] = {}
        self._missing = False  # no podman on this host: stop asking

    def container(self, unit: str) -> Container | None:
        """The container `unit` runs now, or None (no cidfile, or no such container)."""
        try:
            cid = (self.runtime / f"{unit}{CIDFILE_SUFFIX}").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not cid:
            return None
        image = self._images.get(cid)
        if image is None:
            image = self._inspect(cid)
            if image is None:
                # Not cached: a cidfile left by a previous run names a removed container, and
                # the next run rewrites the file.
                return None
            if len(self._images) >= _MAX_CACHED:
                self._images.clear()
            self._images[cid] = image
        return Container(cid, image)

    def _inspect(self, cid: str) -> str | None:
        if self._missing:
            return None
        try:
            result = subprocess.run(
                [self.podman, "container", "inspect", "--format", "{{.ImageName}}", cid],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            log.info("no %s on this host: container details are not published", self.podman)
            self._missing = True
            return None
        except subprocess.TimeoutExpired:
            log.warning("%s container inspect %s took over %ss", self.podman, cid, self.timeout)
            return None
        if result.returncode != 0:
            return None
        return result.stdout.strip() or None
