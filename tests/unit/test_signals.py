"""fleetd's signal handling (fleetd.signals): actions run on the main thread outside any handler,
so a signal can never wait on a lock its own thread holds.

Each case runs in a child process of its own: signals are per process, and a case that deadlocks
must fail on the timeout instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import os, signal, threading, time
from fleetd.signals import serve

def send(sig, times=1):
    for _ in range(times):
        os.kill(os.getpid(), sig)
"""


def run_case(body: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + textwrap.dedent(body)
    try:
        return subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the case did not end within {timeout:.0f}s (deadlocked?)")


def test_a_signal_arriving_while_the_agent_holds_the_lock_its_action_takes_is_served() -> None:
    # The agent's thread holds the stop event's own lock (as Event.set/clear/wait do for a
    # moment) while two signals arrive, the second while the first one's action would still run.
    # A handler running the action on the agent's thread would wait on that lock for ever.
    proc = run_case("""
        stop = threading.Event()
        calls = []

        def agent():
            with stop._cond:
                send(signal.SIGTERM)
                send(signal.SIGINT)
                time.sleep(0.3)
            if not stop.wait(10):
                raise SystemExit("the stop never came")

        def on_term():
            calls.append(threading.current_thread() is threading.main_thread())
            stop.set()

        serve(agent, {signal.SIGTERM: on_term, signal.SIGINT: on_term})
        print(calls)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, True]"


def test_each_signal_runs_its_own_action_in_order_of_arrival_even_after_one_failed() -> None:
    proc = run_case("""
        seen = []
        done = threading.Event()

        def agent():
            kinds = (signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT)
            for sig in kinds:
                send(sig)
                time.sleep(0.05)
            done.wait(10)

        def broken():
            raise ValueError("an action that fails")

        actions = {
            signal.SIGUSR1: broken,
            signal.SIGHUP: lambda: seen.append("hup"),
            signal.SIGUSR2: lambda: seen.append("usr2"),
            signal.SIGINT: lambda: (seen.append("int"), done.set()),
        }
        serve(agent, actions)
        print(" ".join(seen))
    """)
    assert proc.returncode == 0, proc.stderr
    # An action that fails is logged, and the signals after it are still served.
    assert proc.stdout.strip() == "hup usr2 hup int"
    assert "acting on signal SIGUSR1 failed" in proc.stderr


def test_a_storm_of_signals_neither_kills_nor_wedges_the_process() -> None:
    proc = run_case("""
        stop = threading.Event()
        count = []

        def agent():
            storm = threading.Thread(target=send, args=(signal.SIGTERM, 200))
            storm.start()
            if not stop.wait(10):
                raise SystemExit("no SIGTERM of the storm was acted on")
            # Signals still coming once serve() has returned would take the default action.
            storm.join()
            time.sleep(0.1)

        def on_term():
            count.append(1)
            stop.set()

        serve(agent, {signal.SIGTERM: on_term})
        print("ok" if count else "no action")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_a_flood_of_one_signal_is_acted_on_in_batches_and_a_stop_behind_it_is_not_lost() -> None:
    # While the main thread is busy with one (slow) reload, thousands more SIGHUPs arrive; the
    # SIGTERM that follows them must still end the agent, and the reloads come once per batch.
    proc = run_case("""
        stop = threading.Event()
        reloads = []

        def flood():
            send(signal.SIGHUP, times=5000)

        def agent():
            floods = [threading.Thread(target=flood) for _ in range(2)]
            for thread in floods:
                thread.start()
            for thread in floods:
                thread.join()
            send(signal.SIGTERM)
            if not stop.wait(10):
                raise SystemExit("the SIGTERM was lost")

        def reload():
            reloads.append(1)
            time.sleep(0.01)

        serve(agent, {signal.SIGHUP: reload, signal.SIGTERM: stop.set})
        print(len(reloads))
    """)
    assert proc.returncode == 0, proc.stderr
    assert 1 <= int(proc.stdout) < 1000


def test_the_agent_ending_ends_the_wait_its_error_is_raised_and_later_signals_are_ignored() -> None:
    proc = run_case("""
        def agent():
            time.sleep(0.1)
            raise RuntimeError("the agent broke")

        try:
            serve(agent, {signal.SIGTERM: lambda: None})
        except RuntimeError as exc:
            print(f"raised: {exc}; main: {threading.current_thread() is threading.main_thread()}")
        # A SIGTERM after the agent ended is ignored: the process ends as it was going to.
        send(signal.SIGTERM)
        time.sleep(0.1)
        print("still here; wakeup fd", signal.set_wakeup_fd(-1))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "raised: the agent broke; main: True",
        "still here; wakeup fd -1",
    ]
