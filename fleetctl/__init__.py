"""fleetctl: the operator's command line for a fleet cluster, talking to the registry in etcd."""

from fleetd import __version__

__all__ = ["__version__"]
