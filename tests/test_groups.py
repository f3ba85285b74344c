"""
Consumer groups (protocol 1.1, "Additions: Consumer groups"): what
SUBSCRIBE_GROUP, ACK and COMMIT on a group subscription mean, driven as
C{tests/test_session.py} does (a L{Clock} for ack timeouts, plain callables
for a connection's output, every frame in order), and the group's position
across a restart with the disk backend.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from typing import List

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_session import T0, Conn, SessionCase
from zaichik import codec
from zaichik.auth import Permissions
from zaichik.codec import (
    Ack,
    Commit,
    CreateTopic,
    ErrorCode,
    ListTopics,
    Message,
    Ok,
    Ping,
    Publish,
    PublishBatch,
    Start,
    Subscribe,
    SubscribeGroup,
    Unsubscribe,
)
from zaichik.service import BrokerService, Limits
from zaichik.storage.disk import DiskStorage

HOUR = 3_600_000


def offsets(items: list) -> List[int]:
    return [m.offset for m in items if isinstance(m, Message)]


class GroupCase(SessionCase):
    def setUp(self):
        super().setUp()
        self.pub = self.conn()
        self.pub.send(CreateTopic(1, "jobs", HOUR, 0))

    def publish(self, count: int, topic: str = "jobs") -> None:
        self.pub.send(PublishBatch(0, topic, [(b"k%d" % i, b"job") for i in range(count)]))

    def member(self, group: str = "workers", max_inflight: int = 0, ack_timeout: int = 0,
               start: Start = Start.DEFAULT, offset: int = 0, topic: str = "jobs") -> Conn:
        c = self.conn()
        got = c.send(SubscribeGroup(1, topic, group, start, offset, max_inflight, ack_timeout))
        self.assertEqual(got[0], Ok(1))
        c.first = offsets(got)
        return c

    def group(self, name: str = "workers", topic: str = "jobs"):
        return self.service.groups[(topic, name)]


class RefusalTests(GroupCase):
    def test_retention_zero_is_bad_topic(self):
        c = self.conn()
        c.send(CreateTopic(1, "live", 0, 0))
        self.assertError(c.send(SubscribeGroup(2, "live", "g")), 2, ErrorCode.BAD_TOPIC)
        # A topic that does not exist would retain nothing (default retention 0): not made.
        self.assertError(c.send(SubscribeGroup(3, "nothing", "g")), 3, ErrorCode.BAD_TOPIC)
        self.assertNotIn("nothing", self.service.topics)
        self.assertEqual(self.service.groups, {})
        self.assertEqual(c.send(Ping(4)), [Ok(4)])

    def test_new_topic_with_default_retention_is_made(self):
        self.service.default_retention = HOUR
        c = self.conn()
        self.assertEqual(c.send(SubscribeGroup(1, "fresh", "g")), [Ok(1)])
        self.assertEqual(self.service.topics["fresh"].retention_ttl, HOUR)

    def test_pattern_is_bad_topic(self):
        c = self.conn()
        for rid, name in enumerate(("jobs.*", "jobs.>", "*", ">"), 1):
            self.assertError(c.send(SubscribeGroup(rid, name, "g")), rid, ErrorCode.BAD_TOPIC)

    def test_bad_topic_and_bad_group_names(self):
        c = self.conn()
        for rid, name in enumerate(("", "a b", "x" * 250, "caf\u00e9"), 1):
            self.assertError(c.send(SubscribeGroup(rid, name, "g")), rid, ErrorCode.BAD_TOPIC)
        for rid, group in enumerate(("", "a b", "x" * 250, "caf\u00e9", "g.*", ">"), 10):
            self.assertError(c.send(SubscribeGroup(rid, "jobs", group)), rid, ErrorCode.BAD_TOPIC)
        self.assertEqual(self.service.groups, {})

    def test_one_subscription_per_topic(self):
        c = self.conn()
        self.assertEqual(c.send(SubscribeGroup(1, "jobs", "g")), [Ok(1)])
        self.assertError(c.send(SubscribeGroup(2, "jobs", "g")), 2, ErrorCode.ALREADY_SUBSCRIBED)
        self.assertError(c.send(SubscribeGroup(3, "jobs", "other")), 3, ErrorCode.ALREADY_SUBSCRIBED)
        self.assertError(c.send(Subscribe(4, "jobs")), 4, ErrorCode.ALREADY_SUBSCRIBED)
        d = self.conn()
        d.send(Subscribe(1, "jobs"))
        self.assertError(d.send(SubscribeGroup(2, "jobs", "g")), 2, ErrorCode.ALREADY_SUBSCRIBED)
        # A pattern over the same topic is another subscription: allowed.
        self.assertEqual(c.send(Subscribe(5, "*")), [Ok(5)])

    def test_permission_subscribe(self):
        c = self.conn()
        c.session.permissions = Permissions(publish=["#"], subscribe=["other"], create=["#"])
        self.assertError(c.send(SubscribeGroup(1, "jobs", "g")), 1, ErrorCode.NOT_AUTHORIZED)
        self.assertEqual(self.service.groups, {})
        d = self.conn()
        d.session.permissions = Permissions(subscribe=["jobs"])
        self.assertEqual(d.send(SubscribeGroup(1, "jobs", "g")), [Ok(1)])

    def test_ack_refusals(self):
        self.publish(3)
        c = self.member(max_inflight=2)
        self.assertEqual(c.first, [0, 1])
        self.assertError(c.send(Ack(2, "jobs", 2)), 2, ErrorCode.BAD_OFFSET)  # not sent
        self.assertError(c.send(Ack(3, "other", 0)), 3, ErrorCode.NOT_SUBSCRIBED)
        self.assertError(c.send(Ack(4, "jobs.*", 0)), 4, ErrorCode.BAD_TOPIC)
        self.assertEqual(c.send(Ack(5, "jobs", 1))[0], Ok(5))
        self.assertError(c.send(Ack(6, "jobs", 1)), 6, ErrorCode.BAD_OFFSET)  # acknowledged already
        other = self.member()
        self.assertError(other.send(Ack(1, "jobs", 0)), 1, ErrorCode.BAD_OFFSET)  # another member's
        plain = self.conn()
        plain.send(Subscribe(1, "jobs", Start.EARLIEST))
        self.assertError(plain.send(Ack(2, "jobs", 0)), 2, ErrorCode.NOT_SUBSCRIBED)

    def test_commit_past_what_was_sent(self):
        self.publish(3)
        c = self.member(max_inflight=2)
        self.assertError(c.send(Commit(2, "jobs", 2)), 2, ErrorCode.BAD_OFFSET)
        empty = self.member(group="late", start=Start.LATEST)
        self.assertError(empty.send(Commit(2, "jobs", 0)), 2, ErrorCode.BAD_OFFSET)

    def test_limit(self):
        self.service.limits = Limits(max_subscriptions=1)
        c = self.conn()
        c.send(Subscribe(1, "other"))
        self.assertError(c.send(SubscribeGroup(2, "jobs", "g")), 2, ErrorCode.LIMIT)
        self.service.limits = Limits(max_groups=1)
        self.assertEqual(self.conn().send(SubscribeGroup(1, "jobs", "a")), [Ok(1)])
        self.assertError(self.conn().send(SubscribeGroup(1, "jobs", "b")), 1, ErrorCode.LIMIT)
        self.assertEqual(self.conn().send(SubscribeGroup(1, "jobs", "a")), [Ok(1)])  # a known group


class DeliveryTests(GroupCase):
    def test_one_member_at_a_time(self):
        self.publish(6)
        a = self.member(max_inflight=2)
        b = self.member(max_inflight=2)
        self.assertEqual((a.first, b.first), ([0, 1], [2, 3]))
        got = a.send(Ack(2, "jobs", 1))
        self.assertEqual((got[0], offsets(got)), (Ok(2), [4]))  # the OK before what it releases
        got = b.send(Commit(3, "jobs", 3))  # acknowledges 2 and 3
        self.assertEqual((got[0], offsets(got)), (Ok(3), [5]))
        self.publish(1)
        self.assertEqual((offsets(a.new()), offsets(b.new())), ([], [6]))  # b has room, a has none
        self.publish(1)
        self.assertEqual((offsets(a.new()), offsets(b.new())), ([], []))  # no room: it waits
        self.assertEqual(offsets(a.send(Ack(4, "jobs", 0))), [7])

    def test_plain_subscribers_get_everything(self):
        plain = self.conn()
        plain.send(Subscribe(1, "jobs", Start.LATEST))
        a = self.member()
        b = self.member()
        self.publish(4)
        self.assertEqual(offsets(plain.new()), [0, 1, 2, 3])
        self.assertEqual(sorted(offsets(a.new()) + offsets(b.new())), [0, 1, 2, 3])

    def test_groups_are_independent(self):
        self.publish(2)
        a = self.member("one")
        b = self.member("two")
        self.assertEqual((a.first, b.first), ([0, 1], [0, 1]))

    def test_max_inflight_zero_means_a_thousand(self):
        self.publish(1200)
        c = self.member()
        self.assertEqual(c.first, list(range(1000)))

    def test_ack_any_outstanding(self):
        self.publish(4)
        c = self.member(max_inflight=3)
        self.assertEqual(c.first, [0, 1, 2])
        self.assertEqual(offsets(c.send(Ack(2, "jobs", 2))), [3])
        self.assertEqual(self.group().position, 0)
        c.send(Ack(3, "jobs", 0))
        self.assertEqual(self.group().position, 1)
        c.send(Ack(4, "jobs", 1))
        self.assertEqual(self.group().position, 3)
        c.send(Ack(5, "jobs", 3))
        self.assertEqual(self.group().position, 4)
        self.assertEqual(self.service.storage.group_positions(), {"jobs": {"workers": 4}})

    def test_commit_is_cumulative(self):
        self.publish(5)
        c = self.member(max_inflight=4)
        self.assertEqual(c.first, [0, 1, 2, 3])
        self.assertEqual(offsets(c.send(Ack(2, "jobs", 1))), [4])
        self.assertEqual(c.send(Commit(3, "jobs", 2)), [Ok(3)])  # acknowledges 0 and 2 (1 was already)
        self.assertEqual(self.group().position, 3)
        self.publish(2)
        self.assertEqual(offsets(c.new()), [5, 6])
        self.assertEqual(c.send(Commit(4, "jobs", 0)), [Ok(4)])  # nothing outstanding below: OK
        self.assertError(c.send(Ack(5, "jobs", 2)), 5, ErrorCode.BAD_OFFSET)
        self.assertEqual(self.service.durable_positions(), {})  # a group's COMMIT is not a client's

    def test_start_sets_a_new_groups_position(self):
        self.publish(5)
        self.assertEqual(self.member("d").first, [0, 1, 2, 3, 4])  # DEFAULT means EARLIEST
        self.assertEqual(self.member("l", start=Start.LATEST).first, [])
        self.assertEqual(self.member("o", start=Start.OFFSET, offset=3).first, [3, 4])
        self.assertEqual(self.member("e", start=Start.EARLIEST).first, [0, 1, 2, 3, 4])
        # Ignored afterwards: a second member of "l" starts where "l" is.
        self.publish(1)
        late = self.member("l", start=Start.EARLIEST)
        self.assertEqual(late.first, [])

    def test_position_outlives_the_members(self):
        self.publish(4)
        c = self.member(max_inflight=2)
        c.send(Ack(2, "jobs", 0))
        c.session.close()
        self.assertEqual(self.group().position, 1)
        self.publish(1)
        again = self.member(start=Start.LATEST)  # (ignored: the group exists)
        self.assertEqual(again.first, [1, 2, 3, 4])

    def test_topics_counts_members(self):
        self.member()
        self.member()
        self.member("other")
        plain = self.conn()
        plain.send(Subscribe(1, "jobs"))
        self.assertEqual(plain.send(ListTopics(2))[0].topics[0].subscribers, 4)
        plain.send(Unsubscribe(3, "jobs"))
        self.assertEqual(plain.send(ListTopics(4))[0].topics[0].subscribers, 3)

    def test_fair_spread(self):
        """Equal members, no failures: none gets more than its share plus max_inflight."""
        inflight = 5
        members = [self.member(max_inflight=inflight) for _ in range(3)]
        total = 300
        self.publish(total)
        got: Counter = Counter()
        pending = {id(m): offsets(m.new()) for m in members}
        for m in members:
            got[id(m)] += len(pending[id(m)])
        self.assertEqual(list(got.values()), [inflight] * 3)
        turn = 0
        while any(pending.values()):
            m = members[turn % 3]
            turn += 1
            if not pending[id(m)]:
                continue
            offset = pending[id(m)].pop(0)
            new = offsets(m.send(Ack(turn, "jobs", offset)))
            pending[id(m)].extend(new)
            got[id(m)] += len(new)
        self.assertEqual(sum(got.values()), total)
        for count in got.values():
            self.assertLessEqual(count, total // 3 + inflight)
        self.assertEqual(self.group().position, total)

    def test_fair_spread_of_live_messages(self):
        members = [self.member(max_inflight=1000) for _ in range(4)]
        for _ in range(25):
            self.publish(4)
        for m in members:
            self.assertEqual(len(offsets(m.new())), 25)

    def test_unsubscribe_leaves(self):
        self.publish(3)
        a = self.member(max_inflight=2)
        b = self.member(max_inflight=2)
        self.assertEqual((a.first, b.first), ([0, 1], [2]))
        a.send(Ack(1, "jobs", 0))
        a.new()
        self.assertEqual(a.send(Unsubscribe(2, "jobs")), [Ok(2)])
        self.assertEqual(offsets(b.new()), [1])  # what a had outstanding goes to b
        self.assertEqual(self.group().redelivered, 1)
        self.assertError(a.send(Ack(3, "jobs", 1)), 3, ErrorCode.NOT_SUBSCRIBED)
        self.assertError(a.send(Unsubscribe(4, "jobs")), 4, ErrorCode.NOT_SUBSCRIBED)
        self.publish(1)
        self.assertEqual(offsets(a.new()), [])


class RedeliveryTests(GroupCase):
    def frames(self, c: Conn) -> dict:
        return {m.offset: m for m in c.decoded() if isinstance(m, Message)}

    def test_after_ack_timeout_to_any_member(self):
        self.publish(2)
        a = self.member(max_inflight=2, ack_timeout=1000)
        self.assertEqual(a.first, [0, 1])
        self.clock.advance(0.5)
        b = self.member(max_inflight=1, ack_timeout=1000)
        self.assertEqual(b.first, [])
        a.send(Ack(2, "jobs", 1))
        self.clock.advance(0.499)
        self.assertEqual((a.new(), b.new()), ([], []))
        self.clock.advance(0.001)
        got_a, got_b = offsets(a.new()), offsets(b.new())
        self.assertEqual(sorted(got_a + got_b), [0])  # once, to one member
        self.assertError(a.send(Ack(3, "jobs", 0)) if got_b else b.send(Ack(3, "jobs", 0)), 3,
                         ErrorCode.BAD_OFFSET)  # the late member's ACK is too late
        self.assertEqual(self.group().redelivered, 1)

    def test_same_offset_timestamp_key_and_value(self):
        self.pub.send(Publish(1, "jobs", b"payload", b"key"))
        self.at(5_000)  # later than the message's timestamp
        a = self.member(ack_timeout=100)
        first = self.frames(a)[0]
        self.clock.advance(0.1)
        again = [m for m in a.decoded() if isinstance(m, Message)]
        self.assertEqual(len(again), 2)
        self.assertEqual(again[1], first)
        self.assertEqual(first, Message("jobs", 0, T0 * 1000, b"payload", b"key"))

    def test_default_ack_timeout_is_thirty_seconds(self):
        self.publish(1)
        a = self.member()
        self.clock.advance(29.999)
        self.assertEqual(a.new(), [])
        self.clock.advance(0.001)
        self.assertEqual(offsets(a.new()), [0])

    def test_timeouts_keep_going(self):
        """A member that never acknowledges gets its messages again every ack_timeout."""
        self.publish(1)
        a = self.member(ack_timeout=1000)
        for _ in range(3):
            self.clock.advance(1)
            self.assertEqual(offsets(a.new()), [0])
        a.send(Ack(2, "jobs", 0))
        self.clock.advance(5)
        self.assertEqual(a.new(), [])

    def test_after_disconnect(self):
        self.publish(4)
        a = self.member(max_inflight=3)
        b = self.member(max_inflight=3)
        self.assertEqual((a.first, b.first), ([0, 1, 2], [3]))
        a.session.end()
        self.assertEqual(offsets(b.new()), [0, 1])
        self.assertEqual(offsets(b.send(Ack(1, "jobs", 3))), [2])
        self.assertEqual(self.group().members, [b.session.groups["jobs"]])

    def test_last_member_leaves_then_one_joins(self):
        self.publish(2)
        a = self.member()
        a.session.end()
        self.assertEqual(self.service.topics["jobs"].subscribers, [])
        b = self.member()
        self.assertEqual(b.first, [0, 1])

    def test_ack_resets_nothing_for_others(self):
        """A member's timeouts are its own: another member's ACKs do not delay or hurry them."""
        self.publish(2)
        a = self.member(max_inflight=1, ack_timeout=1000)
        b = self.member(max_inflight=1, ack_timeout=3000)
        self.clock.advance(1)
        self.assertEqual((offsets(a.new()), b.new()), ([0], []))


class ExpiryTests(SessionCase):
    def test_expired_before_acknowledgement_is_skipped(self):
        pub = self.conn()
        pub.send(CreateTopic(1, "short", 1_000, 0))
        pub.send(PublishBatch(2, "short", [(None, b"a"), (None, b"b")]))
        c = self.conn()
        got = c.send(SubscribeGroup(1, "short", "g", Start.DEFAULT, 0, 1, 5_000))
        self.assertEqual(offsets(got), [0])
        group = self.service.groups[("short", "g")]
        self.clock.advance(2)  # both expire: 0 while outstanding, 1 before it was sent
        self.service.sweep()
        self.assertEqual(group.position, 2)
        self.clock.advance(3)  # 0's ack timeout: not sent again, it has expired
        self.assertEqual(c.new(), [])
        self.assertEqual(group.skipped, 2)
        pub.send(Publish(3, "short", b"c"))
        self.assertEqual(offsets(c.new()), [2])
        self.assertEqual(group.position, 2)
        self.assertEqual(self.service.storage.group_positions(), {"short": {"g": 2}})

    def test_expired_while_outstanding_then_acknowledged(self):
        pub = self.conn()
        pub.send(CreateTopic(1, "short", 1_000, 0))
        pub.send(Publish(2, "short", b"a"))
        c = self.conn()
        c.send(SubscribeGroup(1, "short", "g", Start.DEFAULT, 0, 1, 5_000))
        self.clock.advance(2)
        self.assertEqual(c.send(Ack(2, "short", 0)), [Ok(2)])  # outstanding still: OK
        self.assertEqual(self.service.groups[("short", "g")].position, 1)

    def test_expired_waiting_messages_are_skipped(self):
        pub = self.conn()
        pub.send(CreateTopic(1, "short", 1_000, 0))
        pub.send(PublishBatch(2, "short", [(None, b"a"), (None, b"b"), (None, b"c")]))
        c = self.conn()
        c.send(SubscribeGroup(1, "short", "g", Start.DEFAULT, 0, 1, 60_000))
        self.clock.advance(0.5)
        pub.send(Publish(3, "short", b"d"))
        self.clock.advance(0.7)  # 0-2 expired, 3 not
        got = c.send(Ack(2, "short", 0))
        self.assertEqual(offsets(got), [3])
        self.assertEqual(self.service.groups[("short", "g")].position, 3)


def run_now(f, *args):
    return maybeDeferred(f, *args)


class DurableTests(SynchronousTestCase):
    """The group's position with --data-dir: it resumes at its lowest unacknowledged offset."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="zaichik-groups-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(T0)
        self.service = None
        self.addCleanup(self.stop)

    def start(self, fsync: str = "interval", run_blocking=run_now) -> BrokerService:
        self.stop()
        self.storage = DiskStorage(self.dir, fsync=fsync, clock=self.clock, run_blocking=run_blocking)
        self.service = BrokerService(storage=self.storage, clock=self.clock)
        self.service.startService()
        return self.service

    def stop(self):
        if self.service is not None and self.service.running:
            self.successResultOf(self.service.stopService())
        self.service = None

    def test_position_survives_a_restart(self):
        service = self.start()
        pub = Conn(service)
        pub.send(CreateTopic(1, "jobs", HOUR, 0))
        pub.send(PublishBatch(2, "jobs", [(None, b"%d" % i) for i in range(6)]))
        c = Conn(service)
        self.assertEqual(offsets(c.send(SubscribeGroup(3, "jobs", "w", Start.DEFAULT, 0, 4))), [0, 1, 2, 3])
        c.send(Ack(4, "jobs", 0))
        c.send(Ack(5, "jobs", 2))  # above the position: sent again after a restart (at least once)
        c.send(Ack(6, "jobs", 1))
        self.assertEqual(service.groups[("jobs", "w")].position, 3)
        late = Conn(service)
        late.send(SubscribeGroup(1, "jobs", "late", Start.LATEST))  # made, never acknowledged
        service = self.start()  # a restart
        self.assertEqual(service.storage.group_positions(), {"jobs": {"w": 3, "late": 6}})
        again = Conn(service)
        self.assertEqual(offsets(again.send(SubscribeGroup(1, "jobs", "w", Start.EARLIEST))), [3, 4, 5])
        late = Conn(service)
        self.assertEqual(offsets(late.send(SubscribeGroup(1, "jobs", "late", Start.EARLIEST))), [])
        with open(os.path.join(self.dir, "commits.log"), encoding="utf-8") as f:
            self.assertIn('["group", "jobs", "w", 3,', f.read())

    def test_no_client_id_can_name_a_group(self):
        """A durable client called "group" keeps its own commits apart from every group's position."""
        service = self.start()
        pub = Conn(service)
        pub.send(CreateTopic(1, "jobs", HOUR, 0))
        pub.send(PublishBatch(2, "jobs", [(None, b"x")] * 3))
        c = Conn(service)
        c.send(codec.Hello(1, "group", ""))
        c.send(Subscribe(2, "jobs", Start.EARLIEST))
        c.send(Commit(3, "jobs", 2))
        g = Conn(service)
        g.send(SubscribeGroup(1, "jobs", "jobs", Start.EARLIEST, 0, 1))
        g.send(Ack(2, "jobs", 0))
        service = self.start()
        self.assertEqual(service.durable_positions(), {"group": {"jobs": 2}})
        self.assertEqual(service.storage.group_positions(), {"jobs": {"jobs": 1}})

    def test_ack_reply_waits_for_storage_with_fsync_always(self):
        held = []

        def later(f, *args):
            d: Deferred = Deferred()
            held.append((d, f, args))
            return d

        service = self.start(fsync="always", run_blocking=later)
        service.create_topic("jobs", HOUR, 0)
        service.topics["jobs"].publish(None, b"x")
        service.work.flush()
        while held:
            d, f, args = held.pop(0)
            f(*args)
            d.callback(None)
        c = Conn(service)
        c.send(SubscribeGroup(1, "jobs", "w", Start.EARLIEST))
        while held:
            d, f, args = held.pop(0)
            f(*args)
            d.callback(None)
        self.assertEqual(offsets(c.new()), [0])
        self.assertEqual(c.send(Ack(2, "jobs", 0)), [])  # not durable yet
        while held:
            d, f, args = held.pop(0)
            f(*args)
            d.callback(None)
        self.assertEqual(c.new(), [Ok(2)])


class FlowTests(GroupCase):
    def test_paused_output_holds_back_then_resumes(self):
        a = self.member(max_inflight=10)
        b = self.member(max_inflight=10)
        a.session.pause_output()
        self.publish(4)
        self.assertEqual((offsets(a.new()), offsets(b.new())), ([], [0, 1, 2, 3]))  # a has no room meanwhile
        self.publish(12)
        self.assertEqual(offsets(b.new()), [4, 5, 6, 7, 8, 9])
        a.session.resume_output()
        self.assertEqual(offsets(a.new()), list(range(10, 16)))


class DelayedLog:
    """A log whose reads answer later (as a backend that must reach a disk or a server would)."""

    def __init__(self, log, held: list) -> None:
        self._log = log
        self._held = held

    def __getattr__(self, name):
        return getattr(self._log, name)

    def __len__(self) -> int:
        return len(self._log)

    def read(self, offset: int, limit: int) -> Deferred:
        d: Deferred = Deferred()
        self._held.append((d, self._log.get(offset, limit)))
        return d


class DelayedReadTests(SynchronousTestCase):
    def setUp(self):
        from zaichik.storage.memory import MemoryStorage

        self.held: list = []
        held = self.held

        class Storage(MemoryStorage):
            def open_log(self, name, retention_ttl, compaction_window):
                return DelayedLog(super().open_log(name, retention_ttl, compaction_window), held)

        self.clock = Clock()
        self.clock.advance(T0)
        self.service = BrokerService(storage=Storage(), clock=self.clock)

    def answer(self) -> None:
        while self.held:
            d, result = self.held.pop(0)
            d.callback(result)

    def test_delivered_while_reading(self):
        """
        A message stored while the subscription's read of the log is under
        way is sent even when that read (asked before it was stored) comes
        back without it: the subscription reads again.  (Found when replies
        began reaching clients sooner: a SUBSCRIBE answered, then a publish,
        lost to a subscriber whose first read of a Redis-backed topic was
        still out.)
        """
        pub = Conn(self.service)
        pub.send(CreateTopic(1, "news", HOUR, 0))
        c = Conn(self.service)
        self.assertEqual(c.send(Subscribe(1, "news", Start.EARLIEST)), [Ok(1)])
        self.assertEqual(len(self.held), 1)  # (the read from EARLIEST: nothing there yet)
        pub.send(Publish(0, "news", b"a"))
        self.answer()  # (the read comes back empty)
        self.answer()  # (the read asked again)
        self.assertEqual([(m.offset, m.value) for m in c.new()], [(0, b"a")])

    def test_backlog_and_redelivery_read_later(self):
        pub = Conn(self.service)
        pub.send(CreateTopic(1, "jobs", HOUR, 0))
        pub.send(PublishBatch(2, "jobs", [(None, b"a"), (None, b"b"), (None, b"c")]))
        c = Conn(self.service)
        self.assertEqual(c.send(SubscribeGroup(1, "jobs", "g", Start.EARLIEST, 0, 2, 1000)), [Ok(1)])
        self.answer()
        self.assertEqual(offsets(c.new()), [0, 1])
        self.clock.advance(1)  # both time out: read again, one at a time
        self.answer()
        self.answer()
        self.assertEqual(offsets(c.new()), [0, 1])
        c.send(Ack(2, "jobs", 0))
        self.answer()
        self.assertEqual(offsets(c.new()), [2])
        self.assertEqual(self.service.groups[("jobs", "g")].position, 1)
