"""Tests for stages/forked.py: work run by a forked process, its result or error brought back, the process ended."""

from __future__ import annotations

import os

import pytest

from stages.errors import PipelineError
from stages.forked import Forked


class Refused(PipelineError):
    pass


def refuse(name: str) -> None:
    raise Refused(f"{name} is not welcome")


def test_the_result_comes_from_another_process_which_has_ended_when_it_is_taken():
    forked = Forked.start(os.getpid)
    assert forked is not None and forked.call == (os.getpid, ())
    pid = forked.result()
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # ended and reaped: an idle one would keep its memory
        os.kill(pid, 0)
    forked.close()  # closing again is harmless


def test_what_the_function_raises_is_raised_by_result():
    forked = Forked.start(refuse, "x")
    with pytest.raises(Refused, match="x is not welcome"):
        forked.result()


def test_nothing_is_started_where_processes_cannot_be_forked(monkeypatch):
    monkeypatch.setattr("multiprocessing.get_all_start_methods", lambda: ["spawn"])
    assert Forked.start(os.getpid) is None


def test_a_process_that_dies_is_reported_as_such():
    forked = Forked.start(os._exit, 3)  # as a process killed for want of memory ends: without a word
    with pytest.raises(PipelineError, match=r"the process running _exit ended without finishing .*Rerun the stage"):
        forked.result()
