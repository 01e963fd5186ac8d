"""fleetctl's commands, one module per group; `fleetctl.main` registers them on the root app."""
