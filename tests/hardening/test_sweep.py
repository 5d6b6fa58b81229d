"""Issue 13: the hardening sweep (tests/hardening/sweep.py) as a test: every case is clear but those still open.

A case marked ``open="file"`` is one the sweep found unclear or silent whose fix belongs to that file; it must not
be clear (then its mark is stale: remove it), so the list of open cases stays true in both directions.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.hardening import sweep


@pytest.fixture(scope="module")
def outcomes() -> list[sweep.Outcome]:
    return sweep.run_cases(sweep.all_cases())


def test_the_sweep_covers_every_kind_of_the_issue_with_at_least_160_cases(outcomes):
    kinds = Counter(o.case.kind for o in outcomes)
    assert len(outcomes) >= 160
    issue = {"tokens", "forward", "hooks", "generate", "model config", "loading", "sae files", "config fields"}
    issue |= {"settings", "damaged files", "cli", "cache", "experiments", "tools", "pipelines"}
    assert set(kinds) == issue and min(kinds.values()) >= 3
    assert len({(o.case.kind, o.case.input) for o in outcomes}) == len(outcomes)  # one row per input


def test_no_case_is_lost(outcomes):
    lost = [f"{o.case.kind}: {o.case.input}: {o.got}" for o in outcomes if o.cls == "lost"]
    assert not lost, "\n".join(lost)


def test_every_case_not_marked_open_is_clear(outcomes):
    regressed = [
        f"{o.cls} {o.case.kind}: {o.case.input}: {o.got}" for o in outcomes if not o.case.open and o.cls != "clear"
    ]
    assert not regressed, "\n".join(regressed)


def test_every_case_marked_open_is_still_not_clear(outcomes):
    stale = [
        f"{o.case.kind}: {o.case.input} (open in {o.case.open})" for o in outcomes if o.case.open and o.cls == "clear"
    ]
    assert not stale, "now clear: remove the open mark of\n" + "\n".join(stale)


def test_the_classifier_tells_the_four_classes_apart():
    def refuse(env):
        raise ValueError("n_tokens must be at least 1: raise it")

    def raw(env):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def lose(env):
        raise sweep.Lost("the result is gone")

    cases = [
        sweep.Case("t", "clear", refuse, ("n_tokens", "raise it")),
        sweep.Case("t", "unclear: a word missing", refuse, ("n_tokens", "lower it")),
        sweep.Case("t", "unclear: another type", raw, ("shapes",)),
        sweep.Case("t", "silent", lambda env: None, ("anything",)),
        sweep.Case("t", "warning expected, none given", lambda env: None, ("x",), warns=True),
        sweep.Case("t", "lost", lose),
        sweep.Case("t", "kept", lambda env: 1, accept=True),
    ]
    got = [o.cls for o in sweep.run_cases(cases)]
    assert got == ["clear", "unclear", "unclear", "silent", "silent", "lost", "clear"]
