"""The conftest rule "no test leaks a KV block" fails a test that leaks, in a real pytest run.

A pytest run of its own (this conftest, a real tiny engine) runs tests written to leak: an engine held
only by a test's local variable, and a module-scoped fixture's engine leaked by its second
user. Each must fail at its own teardown; the clean tests around them must pass.
"""

from __future__ import annotations

import re
import textwrap

import pytest

LEAKY_TESTS = '''
import os

import pytest

from engine import SamplingParams
from engine.llm_engine import LLMEngine

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def make_engine():
    return LLMEngine(model=os.environ["LEAK_TEST_MODEL"], num_kv_blocks=16)


@pytest.fixture(scope="module")
def shared_engine():
    return make_engine()


def run_to_end(engine, request_id):
    engine.add_request(request_id, [1, 2, 3, 4, 5], PARAMS)
    while engine.has_unfinished_requests():
        engine.step()


def test_local_engine_left_mid_request():
    engine = make_engine()
    engine.add_request("left", [1, 2, 3, 4, 5], PARAMS)
    engine.step()  # prefilled, holding its blocks, never finished


def test_local_engine_run_to_the_end():
    run_to_end(make_engine(), "done")


def test_fixture_engine_first_user_is_clean(shared_engine):
    run_to_end(shared_engine, "first")


def test_fixture_engine_second_user_leaks(shared_engine):
    shared_engine.add_request("leak", [1, 2, 3, 4, 5], PARAMS)
    shared_engine.step()


def test_fixture_engine_third_user_cleans_up(shared_engine):
    shared_engine.abort_request("leak")
    run_to_end(shared_engine, "third")
'''


@pytest.mark.slow
def test_the_leak_check_fails_exactly_the_tests_that_leak(tiny_path, pytester, monkeypatch):
    # In this process (pytester's in-process run, its own session, modules restored after): a
    # child interpreter cost ~8 s of imports for the same report.
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403\n")
    pytester.makepyfile(test_leaky=textwrap.dedent(LEAKY_TESTS))
    monkeypatch.setenv("LEAK_TEST_MODEL", tiny_path)
    run = pytester.runpytest_inprocess("-q", "-rA", "-p", "no:cacheprovider", "test_leaky.py")
    report = "\n".join(run.outlines + run.errlines)
    assert run.ret == 1, report
    errored = set(re.findall(r"^ERROR test_leaky\.py::(\w+)", report, re.M))
    assert errored == {"test_local_engine_left_mid_request", "test_fixture_engine_second_user_leaks"}, report
    # A test whose body passed and whose teardown check failed counts once in each.
    assert re.search(r"^5 passed, 2 errors in ", report, re.M), report
    assert report.count("KV blocks leaked") >= 2 and "requests left behind: ['leak']" in report, report
