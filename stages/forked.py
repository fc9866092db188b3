"""Work a stage starts in a forked process before it imports its libraries, so that the other core does it meanwhile.

Importing torch and transformers is seconds of one core's interpreter work; a stage whose inputs are at hand can have
the other core compute with them. A thread would wait for the interpreter lock between its steps while the imports hold
it (measured: a numpy thread hid about half of its work, a torch one none); a forked process does not. What the
function returns or raises comes back pickled. It must compute on one thread: a fork copies no threads, and an OpenMP
pool started again in the child of a process that had used it can hang (verify-outputs' forked work sets torch to one
thread; a stage forks before its own work starts any pool, a test process may have started them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import PipelineError


class Forked:
    """`function(*args)` running in a forked process. `call` is (function, args): a stage checks that the work is the
    one it needs before taking its result."""

    def __init__(self, function: Callable[..., Any], *args: Any):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.call = (function, args)
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        self._future = self._pool.submit(function, *args)

    @classmethod
    def start(cls, function: Callable[..., Any], *args: Any) -> Forked | None:
        """The work started, or None where no process can be forked (the stage then does the work itself)."""
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            return None
        try:
            return cls(function, *args)
        except OSError:  # no process to be had (a process limit, no memory)
            return None

    def result(self) -> Any:
        """What the function returned; raises what it raised. The process has ended when this returns: an idle one
        would keep its memory (the allocator keeps what it freed) while the stage goes on."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self._future.result()
        except BrokenProcessPool as exc:
            raise PipelineError(f"the process running {self.call[0].__name__} ended without finishing ({exc}); was it "
                                "killed (out of memory)? Rerun the stage") from exc
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the process to end (what it writes may be removed after this)."""
        self._pool.shutdown(wait=True)
