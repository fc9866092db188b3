"""Work a stage begins in a forked process before it imports torch or transformers, so that the machine's other core
does it meanwhile (runner.run_stage's `start`).

A thread would wait for the interpreter lock between its steps while the imports hold it (measured: a numpy thread hid
about half of its work, a torch one none); a forked process does not. What the function returns or raises comes back
pickled, so it should return little (a digest, not tensors). It must compute on one thread: a fork copies no threads.
Where no process can be forked, the function runs when its result is asked for: the same result, later.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .errors import PipelineError


class Background:
    """`function(*args)`, running in a forked process from the moment this is made."""

    def __init__(self, function: Callable[..., Any], *args: Any):
        self._function, self._args = function, args
        self._pool: ProcessPoolExecutor | None = None
        if "fork" in multiprocessing.get_all_start_methods():
            try:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
                self._future = self._pool.submit(function, *args)
            except OSError:  # no process to be had (a process limit, no memory): computed by result() instead
                self._pool = None

    @property
    def forked(self) -> bool:
        return self._pool is not None

    def result(self) -> Any:
        """What the function returned; raises what it raised. The process has ended when this returns: an idle one
        would keep its memory while the stage goes on."""
        if self._pool is None:
            return self._function(*self._args)
        try:
            return self._future.result()
        except BrokenProcessPool as exc:
            raise PipelineError(f"the process running {self._function.__name__} ended without finishing ({exc}); was "
                                "it killed (out of memory)? Rerun the stage") from exc
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the process to end (what it writes may be removed after this)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
