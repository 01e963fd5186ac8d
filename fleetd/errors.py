"""Typed errors of the core and its adapters.

Every error a user can cause is a subclass of `FleetError` whose message is one line that names the
thing at fault and, where there is one, the fix. The command lines translate these types to exit
codes in one table each; nothing else prints them.

`Temporary` marks conditions worth retrying after a delay (etcd unreachable, a lost race);
everything else is permanent for the input that caused it.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error the project raises on purpose."""


class Temporary(FleetError):
    """The same call may succeed later (network, a lost race, a busy manager)."""


class InvalidUnitName(FleetError):
    """A unit name that systemd or fleet would refuse."""


class InvalidUnitFile(FleetError):
    """A unit file that does not parse, or whose [X-Fleet] options contradict each other."""


class UnitTooLarge(InvalidUnitFile):
    """A unit file whose stored form would exceed what etcd accepts in one request."""


class UnitNotFound(FleetError):
    """The registry holds no unit of that name."""


class TemplateNotStartable(FleetError):
    """A template (foo@.service) can be submitted but never loaded or started."""


class ConfigError(FleetError):
    """A configuration value is missing or malformed; the message names the key."""


class RegistryUnavailable(Temporary):
    """etcd cannot be reached or did not answer in time."""


class SystemdError(Temporary):
    """systemd refused or failed an operation over D-Bus."""


class AuthError(RegistryUnavailable):
    """etcd refused who we are: no credentials where they are required, or wrong ones.

    A kind of unavailability: to an agent, a registry that refuses it is one it cannot reach
    (it retries, and fences itself if it cannot renew its lease); fleetctl names it apart.
    """


class PermissionDenied(RegistryUnavailable):
    """etcd authenticated us but our roles do not allow the request (handled like AuthError)."""
