"""megatron-core's GPTModel equals the plain-PyTorch reference under every TP/PP layout."""

import pytest

from conftest import run_workers


@pytest.mark.timeout(900)
def test_megatron_logits_equal_reference_under_tp_pp():
    results = run_workers("model_equivalence.py", 4)
    seen = {(r["tp"], r["pp"], r["tied"]) for r in results}
    expected = {(tp, pp, tied) for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)] for tied in (False, True)}
    assert seen == expected, results
    for r in results:
        assert r["max_abs_diff"] <= 1e-5, r
