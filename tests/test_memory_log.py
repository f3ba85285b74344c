"""
MemoryLog.trim (the disk cache's and --max-retained-bytes' trim) against a
plain model: drop the oldest frames until at most the budget is kept.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zaichik.storage.memory import MemoryLog

# Runs of frames (each a size), a gap (in offsets) before each run, and the
# budgets trimmed to after each run.
runs = st.lists(
    st.tuples(st.lists(st.integers(1, 50), min_size=1, max_size=20), st.integers(0, 3), st.integers(0, 400)),
    min_size=1, max_size=12)


class TrimTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(runs, st.sampled_from([1, 2, 3, 4096]))
    def test_trim_keeps_the_newest_within_the_budget(self, plan, step):
        log = MemoryLog(0)
        log._TRIM_STEP = step  # (small steps: the slices' edges)
        model: list = []  # (offset, frame), oldest first
        offset = 0
        for sizes, gap, budget in plan:
            offset += gap
            frames = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
            log.add(offset, frames)
            model += [(offset + i, f) for i, f in enumerate(frames)]
            offset += len(frames)
            dropped = 0
            while sum(len(f) for _, f in model) > budget:
                model.pop(0)
                dropped += 1
            self.assertEqual(log.trim(budget), dropped)
            self.assertEqual(log.nbytes, sum(len(f) for _, f in model))
            self.assertEqual(len(log), len(model))
            kept = []
            at = log.first_offset()
            while at is not None and at < offset:
                first, got = log.get(at, 1000)
                kept += [(first + i, f) for i, f in enumerate(got)]
                at = first + len(got) if got else at + 1
            self.assertEqual(kept, model)

    def test_under_the_budget_drops_nothing(self):
        log = MemoryLog(0)
        log.add(0, [b"x" * 10] * 3)
        self.assertEqual((log.trim(30), log.trim(100), log.nbytes, len(log)), (0, 0, 30, 3))
