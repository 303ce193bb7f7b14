"""The processes a report draws with, forked before it reads MLflow so that they are ready when it
has read: a pool of a process per core (the run pages, and the reading of a big grid's tables), and
one seaborn process, which imports seaborn, scipy, pyplot and the figure modules and draws a first
figure (~2.5 s of a core) while the report opens the store and searches the runs, then draws the
summary's figures (~7 s of a core for a 100-run grid). One seaborn process, not several: each costs
~2.5 s and ~150 MB to start, and a second one made the 100-run report slower on 2 cores (19-20 s
against 14-16 s, measured).

    with workers() as drawing:   # None: one core, or no fork; everything is drawn in this process
        data = collect(..., drawing.pool if drawing else None)
        figures = draw(tasks, drawing)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

from ..runtime import die_with_parent


class Seaborn(partial):
    """A task that draws with seaborn/matplotlib: draw() hands it to the seaborn process."""


def _seaborn_process(conn, reports_end) -> None:
    die_with_parent()  # no figure drawn on for a killed report
    reports_end.close()  # forked with both ends: EOF comes when the report closes the only other one
    from . import figure, grid_figures, init_figures, papers, time_figures, training_figures  # noqa: F401  (drawn by name)

    figure.warm_up()
    while True:
        try:
            tasks = conn.recv()
        except EOFError:  # the report is done with us
            return
        try:
            conn.send((True, [task() for task in tasks]))
        except BaseException as exc:  # noqa: BLE001  (raised again in the report, whatever it is)
            conn.send((False, exc))


class SeabornProcess:
    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_seaborn_process, args=(theirs, self.conn), daemon=True)
        self.process.start()
        theirs.close()

    def send(self, tasks: list[Callable[[], object]]) -> None:
        self.conn.send(tasks)

    def results(self) -> list:
        try:
            ok, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the report's seaborn process died (exit code {self.process.exitcode})") from None
        if not ok:
            raise value
        return value

    def close(self, wait: bool) -> None:
        self.conn.close()  # the process returns at EOF
        self.process.join(2 if wait else 0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@dataclass
class Workers:
    pool: ProcessPoolExecutor
    seaborn: SeabornProcess


@contextlib.contextmanager
def workers():
    """The report's drawing processes, forked now; None where there is one core or no fork. The
    seaborn process is forked first: the pool's start leaves a thread in this process, and a fork
    after it is unsafe."""
    if (os.cpu_count() or 1) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    seaborn = SeabornProcess()
    pool = ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork"),
                               initializer=die_with_parent)
    pool.submit(int)  # the first submit forks the pool's processes
    try:
        yield Workers(pool, seaborn)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        seaborn.close(wait=False)
        raise
    pool.shutdown()
    seaborn.close(wait=True)


def _call(task: Callable[[], object]) -> object:
    return task()


def draw(tasks: list[Callable[[], object]], drawing: Workers | None) -> list:
    """Call every task (a picklable call: a function of a module and its arguments), the Seaborn ones
    in the seaborn process and the others on the pool, all at once; the results in task order. A
    task's exception is raised here, and ends the workers' use (the report fails with it)."""
    if drawing is None:
        return [task() for task in tasks]
    chosen = [isinstance(task, Seaborn) for task in tasks]
    drawing.seaborn.send([task for task, seaborn in zip(tasks, chosen) if seaborn])
    others = iter(list(drawing.pool.map(_call, [task for task, seaborn in zip(tasks, chosen) if not seaborn])))
    theirs = iter(drawing.seaborn.results())
    return [next(theirs) if seaborn else next(others) for seaborn in chosen]
