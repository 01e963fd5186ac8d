"""The `fleetctl` process's entry: `python -m fleetctl`, and the installed command.

The cycle collector is off while the command's modules load: the imports (Typer, the project's
dataclasses) make objects by the hundred thousand and none of them is garbage, yet each burst of
allocations made the collector walk them all, some 5 ms of every run. What the imports built is
then frozen (never walked again) and the collector goes back on before the command runs.
"""

import gc


def main() -> None:
    gc.disable()
    try:
        from fleetctl.main import main as run
    finally:
        gc.freeze()
        gc.enable()
    run()


if __name__ == "__main__":
    main()
