"""``evaluate_sae`` under torchrun: two ranks (the launch of :mod:`tests.distributed.test_counting`) each return the
figures one process gives; the firing counts exactly, the float sums to their order of addition."""

from __future__ import annotations

import json

import pytest

from tests.distributed.job import evaluation, tiny_model, tiny_saes


def test_two_ranks_evaluate_as_one_process(runs: dict) -> None:
    expected = evaluation(tiny_model(), tiny_saes())
    for r in (0, 1):
        got = json.loads((runs["tmp"] / f"evaluate.{r}.json").read_text())
        assert got["firing_counts"] == expected["firing_counts"] and sum(got["firing_counts"]) > 0
        assert got["n_tokens"] == expected["n_tokens"] == 60
        for key, value in expected.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
            else:
                assert got[key] == value, key
