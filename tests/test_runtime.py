"""runtime: how a stop signal (SIGTERM, Ctrl-C) stops a process: at once outside training, after
the current step inside it, never inside a shielded tracking write, and never lost."""

import os
import signal
import subprocess
import sys

import pytest

from pipeline import runtime


@pytest.fixture
def stop_handler():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    hook = sys.unraisablehook
    runtime.stop_on_signals()
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in previous.items():
        signal.signal(s, handler)
    sys.unraisablehook = hook
    runtime._state.update(signum=None, parent=None, stopping=False, gave_way=False, installed=False, last=None)


def _spin(n: int = 2_000_000) -> None:
    for _ in range(n):  # the handler runs between bytecodes
        pass


def test_sigterm_raises_keyboard_interrupt(stop_handler):
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        os.kill(os.getpid(), signal.SIGTERM)
        _spin()


def test_sigterm_inside_a_shielded_block_waits_for_its_end(stop_handler):
    finished = []
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with runtime.shielded():
            with runtime.shielded():  # nested: the outermost block's end raises
                os.kill(os.getpid(), signal.SIGTERM)
                _spin(100_000)
                finished.append("inner")
            finished.append("outer")
    assert finished == ["inner", "outer"]  # the block ran to its end
    with runtime.shielded():  # the pending signal was consumed: the next block is quiet
        pass


def test_inside_a_deferred_block_the_first_signal_waits_for_check_stop_and_a_second_stops_at_once(stop_handler):
    steps = []
    with pytest.raises(KeyboardInterrupt, match="signal 2"):
        with runtime.deferred():
            for step in range(5):
                if step == 2:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
                _spin(100_000)
                steps.append(step)
                runtime.check_stop()
    assert steps == [0, 1, 2]  # the step the signal arrived in ran to its end
    runtime.check_stop()  # consumed
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with runtime.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            _spin(100_000)
            os.kill(os.getpid(), signal.SIGTERM)  # again: no waiting for the next check
            _spin()
            steps.append("not reached")
    assert "not reached" not in steps


def test_a_swallowed_interrupt_still_stops_at_the_next_check(stop_handler):
    """Where the raise lands in code that swallows it (a garbage-collection callback prints
    "Exception ignored" and goes on), the flag stays set: the next check_stop raises."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        _spin()
    except KeyboardInterrupt:
        pass  # swallowed
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        runtime.check_stop()


FINALIZER_SWALLOWS = """
import gc, os, signal, sys
from pipeline import runtime

runtime.stop_on_signals()

class Slow:
    def __del__(self):  # a finalizer that a stop signal lands in
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(2_000_000):
            pass

class Broken:
    def __del__(self):
        raise ValueError("a real error in a finalizer")

Slow()
gc.collect()
print("went on", file=sys.stderr)
Broken()
try:
    runtime.check_stop()
except KeyboardInterrupt as exc:
    print("check_stop raised:", exc, file=sys.stderr)
"""


def test_a_stop_signal_swallowed_by_a_finalizer_prints_no_traceback_and_still_stops():
    """A finalizer swallows the interrupt (Python would print "Exception ignored ... Traceback",
    which reads as a crash): nothing is printed, the process goes on to its next check, which
    raises; any other exception a finalizer swallows is printed as before."""
    run = subprocess.run([sys.executable, "-c", FINALIZER_SWALLOWS], capture_output=True, text=True, timeout=60)
    lines = run.stderr.splitlines()
    assert lines[0] == "went on", run.stderr  # nothing about the swallowed interrupt before it
    assert "ValueError: a real error in a finalizer" in run.stderr
    assert lines[-1] == "check_stop raised: signal 15"
    assert "KeyboardInterrupt" not in run.stderr


def test_a_write_that_a_stop_finds_waiting_gives_way_after_the_grace_and_so_do_later_ones(stop_handler, monkeypatch):
    """A tracking write waiting on a store that does not answer (here: a sleep) is given up
    STOP_GRACE seconds after the stop signal; every later write of the process gives way at once
    (the store is not answering), so a grid stops in seconds, not a minute per write."""
    import time

    monkeypatch.setattr(runtime, "STOP_GRACE", 0.5)
    start = time.monotonic()
    with pytest.raises(runtime.WriteAbandoned, match="did not answer within 0.5 s"):
        with runtime.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the write that does not return
    assert time.monotonic() - start < 5
    with pytest.raises(runtime.WriteAbandoned, match="earlier tracking write was given up"):
        with runtime.shielded():
            pytest.fail("a later write must not start")
    assert runtime.stopped_by() == signal.SIGTERM


def test_a_second_signal_gives_a_waiting_write_up_at_once(stop_handler):
    import time

    start = time.monotonic()
    with pytest.raises(runtime.WriteAbandoned, match="came again"):
        with runtime.shielded():
            os.kill(os.getpid(), signal.SIGINT)
            _spin(100_000)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again
            time.sleep(30)
    assert time.monotonic() - start < runtime.STOP_GRACE


def test_a_write_that_ends_within_the_grace_is_kept_whole_and_the_stop_raised_after_it(stop_handler, monkeypatch):
    import time

    monkeypatch.setattr(runtime, "STOP_GRACE", 2.0)
    done = []
    with pytest.raises(KeyboardInterrupt, match="signal 15") as raised:
        with runtime.shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # a slow but answering store
            done.append("written")
    assert done == ["written"] and not isinstance(raised.value, runtime.WriteAbandoned)
    time.sleep(2.2)  # the timer was disarmed with the write's end: nothing fires later
    with runtime.shielded():  # a write after a stop that gave nothing up still runs
        done.append("again")
    assert done == ["written", "again"]
