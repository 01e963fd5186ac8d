"""fleet in Python: the fleetd agent and the core library shared with fleetctl."""

__version__ = "0.1.0"
