"""One simulated machine as a container host of its own, the way each VM of the Vagrantfile is.

Podman keeps its state in well-known host paths (/etc/containers, /var/lib/containers, /run/...),
which every simulated machine would share. Each machine therefore gets, inside its mount
namespace (set up by `localcluster.manager` before systemd starts):

- its own /etc/containers (the project's vagrant/containers/*.conf, with storage paths pointing
  at the machine's directory and at the cluster's shared read-only image store);
- tmpfs on /run/containers, /run/libpod, /run/runc and /dev/shm, so runtime state (runc's
  container records, podman's locks) dies with the machine as it would at a power cut;
- its own /etc/environment in the CoreOS shape (COREOS_PUBLIC_IPV4 and friends) plus the etcd
  endpoints for etcdctl, which is how units learn the machine's address without naming any path
  of the simulation;
- a `podman` wrapper bound over the podman binary that adds --cgroup-parent for new containers,
  so they live inside the machine's cgroup subtree and die with it. Unit files stay plain podman.

The demo image is built once per cluster into `<cluster dir>/images` by
vagrant/containers/build-demo-image and listed as an additional image store on every machine.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "containers"
BUILD_IMAGE = CONFIG_DIR / "build-demo-image"
PODMAN = Path("/usr/bin/podman")
IMAGES_DIR = "images"

# Files of /etc/containers copied as they are; storage.conf is rewritten per machine.
_COPIED = ("containers.conf", "policy.json", "registries.conf")
# Directories under /run (and /dev/shm) whose content is per machine and must not outlive it.
_TMPFS = ("/run/containers", "/run/libpod", "/run/runc")
# Parts of the machine's directory.
_HOST_DIR = "containers"
_ETC_DIR = "etc-containers"
_STORAGE_DIR = "storage"


class ContainerHostError(RuntimeError):
    """The container set-up of a machine or the cluster's image store failed."""


def available() -> bool:
    """Whether this host can run containers at all (scripts/setup installs podman)."""
    return PODMAN.is_file()


def ensure_image_store(cluster_dir: Path) -> Path:
    """Build the demo image into the cluster's shared store unless it is there already."""
    store = cluster_dir / IMAGES_DIR
    result = subprocess.run(
        [str(BUILD_IMAGE), str(store)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ContainerHostError(
            f"building the demo image into {store} failed: {detail[-1] if detail else 'no output'}"
        )
    return store


def _podman_wrapper(real: Path, cgroup_parent: str) -> str:
    # Global options of podman 4.3 that take their value as the next argument: skipped when
    # looking for the subcommand, so `podman --root X run ...` still gets the cgroup parent.
    valued = (
        "--cgroup-manager --conmon --connection -c --events-backend --hooks-dir --identity "
        "--log-level --network-cmd-path --network-config-dir --root --runroot --runtime "
        "--runtime-flag --ssh --storage-driver --storage-opt --tmpdir --url --volumepath "
        "--module --out"
    )
    return f"""#!/bin/bash
# podman of this simulated machine: new containers go into the machine's cgroup subtree, so they
# stop with it (power cut, destroy) as containers of a real host do. Everything else is podman.
real={shlex.quote(str(real))}
parent={shlex.quote(cgroup_parent)}
args=("$@")
i=0
while ((i < ${{#args[@]}})); do
    case " {valued} " in
        *" ${{args[i]}} "*) ((i += 2)); continue ;;
    esac
    case ${{args[i]}} in
        -*) ((i += 1)) ;;
        container | pod) ((i += 1)) ;;
        run | create)
            exec "$real" "${{args[@]:0:i+1}}" --cgroup-parent="$parent" "${{args[@]:i+1}}" ;;
        *) break ;;
    esac
done
exec "$real" "$@"
"""


def _storage_conf(template: str, graphroot: Path, image_store: Path) -> str:
    text = re.sub(r"(?m)^graphroot\s*=.*$", f"graphroot = {_toml_str(str(graphroot))}", template)
    return re.sub(
        r"(?m)^additionalimagestores\s*=.*$",
        f"additionalimagestores = [{_toml_str(str(image_store))}]",
        text,
    )


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prepare_machine(
    machine_dir: Path,
    cgroup: str,
    ip: str,
    etcd_endpoints: Sequence[str],
    image_store: Path,
) -> Path:
    """Write the machine's container configuration and return the script that mounts it.

    The script runs inside the machine's fresh mount namespace (as root, before systemd) and is
    rewritten on every boot, so an address or endpoint change takes effect at the next start.
    """
    host = machine_dir / _HOST_DIR
    etc = host / _ETC_DIR
    etc.mkdir(parents=True, exist_ok=True)
    (host / _STORAGE_DIR).mkdir(exist_ok=True)
    for name in _COPIED:
        shutil.copyfile(CONFIG_DIR / name, etc / name)
    (etc / "storage.conf").write_text(
        _storage_conf((CONFIG_DIR / "storage.conf").read_text(), host / _STORAGE_DIR, image_store)
    )
    (host / "environment").write_text(
        f"COREOS_PUBLIC_IPV4={ip}\n"
        f"COREOS_PRIVATE_IPV4={ip}\n"
        "ETCDCTL_API=3\n"
        f"ETCDCTL_ENDPOINTS={','.join(etcd_endpoints)}\n"
    )
    real = host / "podman.real"
    real.touch()
    wrapper = host / "podman"
    wrapper.write_text(_podman_wrapper(real, f"/{cgroup}/containers"))
    wrapper.chmod(0o755)
    q = shlex.quote
    lines = [
        "set -e",
        f"mount --bind {q(str(etc))} /etc/containers",
        f"mount --bind {q(str(host / 'environment'))} /etc/environment",
        *(f"mkdir -p {d} && mount -t tmpfs -o mode=0700 tmpfs {d}" for d in _TMPFS),
        "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
        # The real binary first stays reachable under the machine's dir, then the wrapper
        # takes its place for everything started in this namespace (units, ssh sessions).
        f"mount --bind {PODMAN} {q(str(real))}",
        f"mount --bind {q(str(wrapper))} {PODMAN}",
    ]
    script = host / "mounts.sh"
    script.write_text("\n".join(lines) + "\n")
    return script
