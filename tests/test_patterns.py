"""
Wildcard subscriptions (protocol 1.1, "Additions: Wildcard subscriptions"):
the pattern index (L{zaichik.patterns}) and what SUBSCRIBE with a pattern
means for a connection (L{zaichik.session.Session}), driven as
C{tests/test_session.py} does: a L{Clock}, plain callables, every frame a
connection is sent in order.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.test_session import SessionCase
from zaichik import codec
from zaichik.auth import Permissions
from zaichik.codec import (
    Ack,
    Commit,
    CreateTopic,
    ErrorCode,
    Hello,
    ListTopics,
    Message,
    Ok,
    Publish,
    PublishBatch,
    Start,
    Subscribe,
    SubscribeGroup,
    Unsubscribe,
)
from zaichik.patterns import PatternIndex, PatternSubscription, literal_prefix, matches
from zaichik.service import Limits


def pairs(items: list) -> list:
    """(topic, offset) of each MESSAGE."""
    return [(m.topic, m.offset) for m in items if isinstance(m, Message)]


class PatternSyntaxTests(SynchronousTestCase):
    """Which names are patterns, and what they match: the spec's own examples first."""

    def test_spec_examples(self):
        self.assertTrue(matches("sensors.*.temp", "sensors.a.temp"))
        self.assertFalse(matches("sensors.*.temp", "sensors.a.b.temp"))
        self.assertTrue(matches("sensors.>", "sensors.a"))
        self.assertTrue(matches("sensors.>", "sensors.a.b"))
        self.assertFalse(matches("sensors.>", "sensors"))

    def test_more_matches(self):
        cases = [
            ("*", "a", True), ("*", "a.b", False), (">", "a", True), (">", "a.b.c", True),
            ("*.*", "a.b", True), ("*.*", "a", False), ("a.*.>", "a.b", False), ("a.*.>", "a.b.c", True),
            ("a.*", "a.", True),  # an empty segment is a segment ("a." splits into "a" and "")
            ("a.*", "ab", False), ("a.b.*", "a.c.d", False), ("*.b", "a/x.b", True),
        ]
        for pattern, name, want in cases:
            self.assertEqual(matches(pattern, name), want, (pattern, name))

    def test_is_pattern(self):
        for name in ("*", ">", "a.*", "a.>", "*.b", "a.*.c", "a.*.>", "*.*", "a..*", "x-1/y_2.*"):
            self.assertTrue(codec.is_pattern(name), name)
            self.assertFalse(codec.is_valid_topic(name), name)
        for name in ("a", "a.b", "", "a*", "*a", "a.b*", ">a", "a.>.b", ">.a", "a.**", "a.*>", "a b.*",
                     "caf\u00e9.*", "a:b.*", "a.*" + "x" * 248):
            self.assertFalse(codec.is_pattern(name), name)
        self.assertTrue(codec.is_pattern("x" * 247 + ".*"))  # 249 bytes

    def test_literal_prefix(self):
        self.assertEqual(literal_prefix("a.b.*.c"), "a.b.")
        self.assertEqual(literal_prefix("a.>"), "a.")
        self.assertEqual(literal_prefix("*.a"), "")


SEGMENTS = st.sampled_from(["a", "b", "c", ""])


class PatternIndexTests(SynchronousTestCase):
    def setUp(self):
        self.index = PatternIndex()

    def sub(self, pattern: str) -> PatternSubscription:
        s = PatternSubscription(pattern, lambda topic, start: None)
        self.index.add(s)
        return s

    def found(self, name: str) -> set:
        return {s.pattern for s in self.index.match(name)}

    def test_match(self):
        for p in ("sensors.*.temp", "sensors.>", "*", ">", "a.b", "sensors.a.*", "*.a.>"):
            self.sub(p)
        self.assertEqual(self.found("sensors.a.temp"),
                         {"sensors.*.temp", "sensors.>", ">", "sensors.a.*", "*.a.>"})
        self.assertEqual(self.found("sensors"), {"*", ">"})
        self.assertEqual(self.found("x.a.b.c"), {">", "*.a.>"})
        self.assertEqual(self.found("x.a"), {">"})

    def test_remove_prunes(self):
        a, b = self.sub("a.*.c"), self.sub("a.>")
        self.assertEqual(len(self.index), 2)
        self.index.remove(a)
        self.assertEqual(self.found("a.b.c"), {"a.>"})
        self.index.remove(b)
        self.index.remove(b)  # (twice: nothing)
        self.assertEqual(len(self.index), 0)
        self.assertTrue(self.index._root.empty())

    def test_the_same_pattern_twice(self):
        """Two connections' subscriptions to one pattern are two entries."""
        a, b = self.sub("a.*"), self.sub("a.*")
        self.assertEqual(self.index.match("a.x"), [a, b])
        self.index.remove(a)
        self.assertEqual(self.index.match("a.x"), [b])

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.lists(st.one_of(SEGMENTS, st.just("*")), min_size=1, max_size=4)
                    .flatmap(lambda segs: st.sampled_from([segs, segs + [">"]])), max_size=12),
           st.lists(st.lists(SEGMENTS, min_size=1, max_size=5), min_size=1, max_size=8))
    def test_index_agrees_with_one_by_one_matching(self, patterns, names):
        subs = [self.sub(".".join(p)) for p in patterns]
        for segments in names:
            name = ".".join(segments)
            want = sorted(id(s) for s in subs if matches(s.pattern, name))
            self.assertEqual(sorted(id(s) for s in self.index.match(name)), want, name)
        for s in subs:
            self.index.remove(s)
        self.assertTrue(self.index._root.empty())

    def test_many_patterns_visit_few_nodes(self):
        """10,000 literal-prefixed patterns: matching a name walks its own segments only."""
        rng = random.Random(7)
        for i in range(10_000):
            self.sub(f"p{i}.{rng.choice(['*', 'x'])}.>")
        self.assertEqual(self.found("q.x.y"), set())
        self.assertEqual(self.found("p17.x.y") & {"p17.x.>", "p17.*.>"} != set(), True)


class WildcardSessionTests(SessionCase):
    def setUp(self):
        super().setUp()
        self.pub = self.conn()

    def publish(self, topic: str, value: bytes = b"v") -> None:
        self.pub.send(Publish(0, topic, value))

    def test_existing_topics_with_start_each(self):
        self.pub.send(CreateTopic(1, "s.a", 60_000, 0))
        self.pub.send(CreateTopic(2, "s.b", 60_000, 0))
        self.pub.send(CreateTopic(3, "other", 60_000, 0))
        for topic in ("s.a", "s.b", "s.a", "other"):
            self.publish(topic)
        c = self.conn()
        got = c.send(Subscribe(1, "s.*", Start.EARLIEST))
        self.assertEqual(got[0], Ok(1))  # the reply before the messages it releases
        self.assertEqual(sorted(pairs(got)), [("s.a", 0), ("s.a", 1), ("s.b", 0)])
        # OFFSET applies to each topic: past the end of s.b is its next message.
        d = self.conn()
        self.assertEqual(pairs(d.send(Subscribe(1, "s.*", Start.OFFSET, 1))), [("s.a", 1)])
        e = self.conn()
        self.assertEqual(e.send(Subscribe(1, "s.*", Start.LATEST)), [Ok(1)])
        self.publish("s.b")
        self.assertEqual(pairs(e.new()), [("s.b", 1)])

    def test_later_topics_from_their_first_message(self):
        c = self.conn()
        self.assertEqual(c.send(Subscribe(1, "s.>", Start.LATEST)), [Ok(1)])
        self.assertNotIn("s.>", self.service.topics)  # a pattern creates no topic
        self.assertEqual(self.service.topics, {})
        self.publish("s.new")  # made by PUBLISH
        self.pub.send(CreateTopic(1, "s.made", 60_000, 0))  # by CREATE_TOPIC
        self.conn().send(Subscribe(1, "s.x.y"))  # by SUBSCRIBE
        self.publish("s.made", b"m")
        self.publish("s.x.y", b"y")
        self.publish("s", b"not matched")
        self.publish("t.new", b"not matched")
        got = c.new()
        self.assertEqual(pairs(got), [("s.new", 0), ("s.made", 0), ("s.x.y", 0)])
        self.assertEqual([m.value for m in got], [b"v", b"m", b"y"])

    def test_later_topic_made_by_a_batch(self):
        c = self.conn()
        c.send(Subscribe(1, "b.*"))
        self.pub.send(PublishBatch(1, "b.1", [(None, b"x"), (None, b"y")]))
        self.assertEqual(pairs(c.new()), [("b.1", 0), ("b.1", 1)])

    def test_commit_names_the_concrete_topic(self):
        c = self.conn()
        c.send(Subscribe(1, "s.*", Start.EARLIEST, 0, 1))  # max_inflight 1, per topic
        self.publish("s.a")
        self.publish("s.b")
        self.publish("s.a")
        self.assertEqual(pairs(c.new()), [("s.a", 0), ("s.b", 0)])
        self.assertError(c.send(Commit(2, "s.*", 0)), 2, ErrorCode.BAD_TOPIC)
        self.assertError(c.send(Commit(3, "s.b", 1)), 3, ErrorCode.BAD_OFFSET)
        self.assertError(c.send(Commit(4, "s.c", 0)), 4, ErrorCode.NOT_SUBSCRIBED)
        got = c.send(Commit(5, "s.a", 0))
        self.assertEqual(got[0], Ok(5))
        self.assertEqual(pairs(got), [("s.a", 1)])

    def test_durable_positions_per_topic(self):
        c = self.conn()
        c.send(Hello(1, "reader", ""))
        for topic in ("s.a", "s.b"):
            self.pub.send(CreateTopic(1, topic, 60_000, 0))
            for _ in range(3):
                self.publish(topic)
        c.send(Subscribe(2, "s.*", Start.DEFAULT))
        c.new()
        c.send(Commit(3, "s.a", 1))
        c.send(Commit(4, "s.b", 0))
        self.assertEqual(self.service.durable_positions(), {"reader": {"s.a": 1, "s.b": 0}})
        c.session.close()
        again = self.conn()
        again.send(Hello(1, "reader", ""))
        self.assertEqual(sorted(pairs(again.send(Subscribe(2, "s.*")))), [("s.a", 2), ("s.b", 1), ("s.b", 2)])

    def test_unsubscribe_names_the_pattern_and_ends_all(self):
        c = self.conn()
        c.send(Subscribe(1, "s.*"))
        self.publish("s.a")
        c.new()
        self.assertError(c.send(Unsubscribe(2, "s.a")), 2, ErrorCode.NOT_SUBSCRIBED)
        self.assertError(c.send(Unsubscribe(3, "s.>")), 3, ErrorCode.NOT_SUBSCRIBED)
        self.assertEqual(c.send(Unsubscribe(4, "s.*")), [Ok(4)])
        self.assertEqual(len(self.service.patterns), 0)
        self.publish("s.a")
        self.publish("s.b")  # created later: not followed either
        self.assertEqual(c.new(), [])
        self.assertEqual(self.service.topics["s.a"].subscribers, [])
        self.assertError(c.send(Unsubscribe(5, "s.*")), 5, ErrorCode.NOT_SUBSCRIBED)
        # It may be subscribed again.
        self.assertEqual(c.send(Subscribe(6, "s.*", Start.LATEST)), [Ok(6)])

    def test_commit_after_unsubscribe_keeps_what_was_sent(self):
        """Resubscribed, a commit of an offset sent before is not BAD_OFFSET (the connection's high-water mark)."""
        c = self.conn()
        self.pub.send(CreateTopic(1, "s.a", 60_000, 0))
        c.send(Subscribe(1, "s.*"))
        self.publish("s.a")
        self.publish("s.a")
        c.send(Unsubscribe(2, "s.*"))
        c.new()
        c.send(Subscribe(3, "s.*", Start.LATEST))
        self.assertEqual(c.send(Commit(4, "s.a", 1)), [Ok(4)])

    def test_same_pattern_twice(self):
        c = self.conn()
        c.send(Subscribe(1, "s.*"))
        self.assertError(c.send(Subscribe(2, "s.*")), 2, ErrorCode.ALREADY_SUBSCRIBED)
        self.assertEqual(c.send(Subscribe(3, "s.>")), [Ok(3)])  # another pattern: fine

    def test_overlap_gives_one_copy_per_subscription(self):
        c = self.conn()
        c.send(Subscribe(1, "s.*"))
        c.send(Subscribe(2, "s.>"))
        c.send(Subscribe(3, "s.a"))
        c.send(Subscribe(4, "*.a"))
        self.publish("s.a")
        self.assertEqual(pairs(c.new()), [("s.a", 0)] * 4)
        self.publish("s.b")
        self.assertEqual(pairs(c.new()), [("s.b", 0)] * 2)
        self.assertEqual([t.subscribers for t in c.send(ListTopics(5))[0].topics], [4, 2])

    def test_commit_with_overlap_acknowledges_each(self):
        c = self.conn()
        c.send(Subscribe(1, "s.*", Start.EARLIEST, 0, 1))
        c.send(Subscribe(2, "s.a", Start.EARLIEST, 0, 1))
        self.publish("s.a")
        self.publish("s.a")
        self.assertEqual(pairs(c.new()), [("s.a", 0)] * 2)
        got = c.send(Commit(3, "s.a", 0))
        self.assertEqual(got[0], Ok(3))
        self.assertEqual(pairs(got), [("s.a", 1)] * 2)

    def test_credentials_filter_the_topics(self):
        for topic in ("s.open", "s.closed"):
            self.pub.send(CreateTopic(1, topic, 60_000, 0))
            self.publish(topic)
        c = self.conn()
        c.session.permissions = Permissions(subscribe=["s.open", "s.new*"])
        self.assertEqual(pairs(c.send(Subscribe(1, "s.*", Start.EARLIEST))), [("s.open", 0)])
        self.publish("s.newer")
        self.publish("s.hidden")
        self.publish("s.closed")
        self.assertEqual(pairs(c.new()), [("s.newer", 0)])
        # No permission on the pattern itself is needed, and none to create.
        self.assertEqual(c.send(Subscribe(2, "x.>")), [Ok(2)])
        self.assertNotIn("x.>", self.service.topics)

    def test_patterns_refused_outside_subscribe(self):
        c = self.conn()
        for request in (CreateTopic(1, "s.*"), Publish(1, "s.*", b"v"), Commit(1, "s.*", 0),
                        PublishBatch(1, "s.>", [(None, b"v")]), Ack(1, "s.*", 0),
                        SubscribeGroup(1, "s.*", "g"), Subscribe(1, "s.>.x"), Subscribe(1, "s*")):
            self.assertError(c.send(request), 1, ErrorCode.BAD_TOPIC)
        self.assertEqual(self.service.topics, {})

    def test_limit_counts_patterns(self):
        self.service.limits = Limits(max_subscriptions=2)
        c = self.conn()
        c.send(Subscribe(1, "a.*"))
        c.send(Subscribe(2, "b"))
        self.assertError(c.send(Subscribe(3, "c.*")), 3, ErrorCode.LIMIT)

    def test_disconnect_ends_the_patterns(self):
        c = self.conn()
        c.send(Subscribe(1, "s.*"))
        self.publish("s.a")
        c.session.end()
        self.assertEqual(len(self.service.patterns), 0)
        self.assertEqual(self.service.topics["s.a"].subscribers, [])
        self.publish("s.b")
        self.assertEqual(pairs(c.new()), [("s.a", 0)])

    def test_reply_before_released_messages_of_a_new_topic(self):
        """A publisher that follows a pattern gets PUBLISHED, then the message of the topic it made."""
        c = self.conn()
        c.send(Subscribe(1, "s.*"))
        got = c.send(Publish(2, "s.mine", b"v"))
        self.assertEqual([type(x).__name__ for x in got], ["Published", "Message"])

    def test_existing_topics_found_by_prefix_only(self):
        for name in ("a", "a.b", "a.b.c", "ab.c", "b.a.c", "a.c"):
            self.pub.send(CreateTopic(1, name, 60_000, 0))
            self.publish(name)
        c = self.conn()
        self.assertEqual(sorted(pairs(c.send(Subscribe(1, "a.>", Start.EARLIEST)))),
                         [("a.b", 0), ("a.b.c", 0), ("a.c", 0)])
        self.assertEqual(sorted(pairs(c.send(Subscribe(2, "*.*.c", Start.EARLIEST)))),
                         [("a.b.c", 0), ("b.a.c", 0)])

    def test_paused_output_then_resumed(self):
        for name in ("s.a", "s.b"):
            self.pub.send(CreateTopic(1, name, 60_000, 0))
        c = self.conn()
        c.send(Subscribe(1, "s.*"))
        c.session.pause_output()
        self.publish("s.a")
        self.publish("s.b")
        self.assertEqual(c.new(), [])
        c.session.resume_output()
        self.assertEqual(sorted(pairs(c.new())), [("s.a", 0), ("s.b", 0)])

    def test_a_failed_topic_is_dropped_and_told(self):
        """A per-topic subscription that fails ends alone: ERROR(0, INTERNAL), the other topics go on."""
        c = self.conn()
        c.send(Subscribe(1, "s.*"))
        self.publish("s.a")
        self.publish("s.b")
        c.new()
        pattern = c.session.patterns["s.*"]
        failing = pattern.subscriptions["s.a"]
        failing.stopped("reading the topic's messages failed")
        got = c.new()
        self.assertEqual((got[0].rid, got[0].code), (0, ErrorCode.INTERNAL))
        self.assertNotIn("s.a", pattern.subscriptions)
        self.publish("s.a")
        self.publish("s.b")
        self.assertEqual(pairs(c.new()), [("s.b", 1)])
