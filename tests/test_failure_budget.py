"""The failure budget's window: the running count of transient outcomes it keeps must give the
same decisions as counting the window on every element."""
from __future__ import annotations

import random

import pytest

from pipelines.budget import BudgetExceeded, FailureBudget, check
from pipelines.types import Failure, ShardOutcome


def _outcome(i: int, kind: str) -> ShardOutcome:
    reason = {"ok": None, "transient": "http_503", "permanent": "corrupt"}[kind]
    failures = [] if reason is None else [Failure(f"k{i}", "src", "caption", reason, "http://h:1/v1 down")]
    return ShardOutcome(f"k{i}", "s0", None, None, failures, {})


@pytest.mark.parametrize("seed", range(6))
def test_running_count_decides_as_a_full_scan(seed: int) -> None:
    rng = random.Random(seed)
    limit, window = rng.choice([0.2, 0.5]), rng.randint(3, 12)
    min_samples = rng.randint(2, window)
    budget = FailureBudget(limit, min_samples, window)
    budget.setup()
    for i in range(400):
        kind = rng.choices(["ok", "transient", "permanent"], [6, 1 + i // 20, 2])[0]
        outcome = _outcome(i, kind)
        # what a full scan of the window decides once this outcome is in it
        expected = check((list(budget.recent) + [outcome])[-window:], limit, min_samples)
        if expected is None:
            assert list(budget.process(outcome)) == [outcome]
            assert budget.transient_count == sum(o.transient for o in budget.recent)
        else:
            with pytest.raises(BudgetExceeded) as raised:
                list(budget.process(outcome))
            assert str(raised.value) == expected
            return
    pytest.fail("the budget never stopped although transient failures grew to most outcomes")
