"""Tests for clipseg_pipeline/background.py: work run by a forked process, its result or error brought back, the
process ended; computed in place where no process can be forked."""

from __future__ import annotations

import os

import pytest

from clipseg_pipeline.background import Background
from clipseg_pipeline.errors import PipelineError


class Refused(PipelineError):
    pass


def refuse(name: str) -> None:
    raise Refused(f"{name} is not welcome")


def test_the_result_comes_from_another_process_which_has_ended_when_it_is_taken():
    job = Background(os.getpid)
    assert job.forked
    pid = job.result()
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # ended and reaped: an idle one would keep its memory
        os.kill(pid, 0)
    job.close()  # closing again is harmless


def test_what_the_function_raises_is_raised_by_result():
    with pytest.raises(Refused, match="x is not welcome"):
        Background(refuse, "x").result()


def test_where_no_process_can_be_forked_the_work_is_done_when_asked_for(monkeypatch):
    monkeypatch.setattr("multiprocessing.get_all_start_methods", lambda: ["spawn"])
    job = Background(os.getpid)
    assert not job.forked
    assert job.result() == os.getpid()


def test_a_process_that_dies_is_reported_as_such():
    job = Background(os._exit, 3)  # as a process killed for want of memory ends: without a word
    with pytest.raises(PipelineError, match=r"the process running _exit ended without finishing .*Rerun the stage"):
        job.result()
