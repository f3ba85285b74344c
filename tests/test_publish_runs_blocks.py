"""
Runs of fire-and-forget publishes on topics that retain nothing (where
Topic.stage_run stages them as blocks) against the same publishes one by
one: the same replies, deliveries, offsets and duplicates.  (From a review.)
"""
from __future__ import annotations

from operator import attrgetter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zaichik.codec import CreateTopic, Ping, Publish, Start, Subscribe

import tests.test_publish_runs as pr

# Topics that retain nothing, so stage_run applies: compaction without retention,
# plain, and one made by its first message.
TOPICS = ["dedup", "plain", "auto", "kept", ""]


# Topics that retain nothing (so stage_run applies: compaction without
# retention, and plain), one that retains, all subscribed from the latest.
SETUP = (CreateTopic(1, "dedup", 0, 10_000), CreateTopic(2, "plain", 0, 0), CreateTopic(5, "kept", 60_000, 0),
         Subscribe(3, "dedup", Start.LATEST), Subscribe(4, "plain", Start.LATEST), Subscribe(6, "kept", Start.LATEST))
# Each topic's next offset and duplicates dropped.
COUNTS = attrgetter("next_offset", "duplicates")


strategy = st.lists(
    st.one_of(
        st.builds(Publish, st.sampled_from([0, 0, 0, 0, 5]), st.sampled_from(TOPICS),
                  st.sampled_from([b"", b"v", b"x" * 100, b"z" * 380, b"y" * pr.MAX_FRAME]),
                  st.sampled_from([None, b"", b"k1", b"k2", b"k" * 9])),
        st.just(Ping(9)),
    ),
    max_size=30,
)


class NonRetainingRunTests(SynchronousTestCase):
    @settings(max_examples=200, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def test_same_as_one_by_one(self, requests) -> None:
        for one_read, token in ((True, "all"), (False, "all"), (True, "some")):
            with_runs, one_by_one = (pr.run(requests, one_read, runs, token, SETUP, COUNTS, max_compaction_keys=2)
                                     for runs in (True, False))
            self.assertEqual(pr.per_topic(with_runs), pr.per_topic(one_by_one))
