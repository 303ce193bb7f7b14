"""runtime: SIGTERM unwinds like Ctrl-C, but never inside a shielded tracking write."""

import os
import signal

import pytest

from pipeline import runtime


@pytest.fixture
def sigterm_handler():
    previous = signal.getsignal(signal.SIGTERM)
    runtime.interrupt_on_sigterm()
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_keyboard_interrupt(sigterm_handler):
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000_000):  # the handler runs between bytecodes
            pass


def test_sigterm_inside_a_shielded_block_waits_for_its_end(sigterm_handler):
    finished = []
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        with runtime.shielded():
            with runtime.shielded():  # nested: the outermost block's end raises
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100_000):
                    pass
                finished.append("inner")
            finished.append("outer")
    assert finished == ["inner", "outer"]  # the block ran to its end
    with runtime.shielded():  # the pending signal was consumed: the next block is quiet
        pass
