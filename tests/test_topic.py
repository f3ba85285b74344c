"""
Unit tests of L{zaichik.topic.Topic} and L{zaichik.subscription.Subscription}
against the "Semantics" section of the protocol spec (protocol-v1.md):
offsets, timestamps, retention (TTL and retained bytes), compaction, the four
subscribe starts, fan-out and the max_inflight window.

Deterministic: time comes only from a L{Clock}, moved to whole milliseconds.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.errors import ZaichikError
from zaichik.storage import StorageError
from zaichik.storage.memory import MemoryStorage
from zaichik.subscription import Output, Subscription
from zaichik.topic import ISubscriber, Topic

T0 = 1_700_000_000  # seconds since the epoch at the start of every test
T0_MS = T0 * 1000


def decode_frames(data: bytes) -> list:
    """Split whole length-prefixed frames and decode each with decode_reply."""
    out = []
    at = 0
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "big")
        body = data[at + 4 : at + 4 + n]
        assert len(body) == n, "truncated frame"
        out.append(codec.decode_reply(body))
        at += 4 + n
    return out


def messages(written: List[bytes]) -> List[codec.Message]:
    decoded = decode_frames(b"".join(written))
    for m in decoded:
        assert isinstance(m, codec.Message), m
    return decoded


def offsets(written: List[bytes]) -> List[int]:
    return [m.offset for m in messages(written)]


@implementer(ISubscriber)
class Recorder:
    """An ISubscriber that records each deliver call."""

    def __init__(self) -> None:
        self.calls: List[Tuple[int, List[bytes]]] = []

    def deliver(self, first_offset: int, frames: List[bytes]) -> None:
        self.calls.append((first_offset, list(frames)))

    @property
    def offsets(self) -> List[int]:
        return [m.offset for _, frames in self.calls for m in messages(frames)]


@implementer(ISubscriber)
class Raiser:
    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, first_offset: int, frames: List[bytes]) -> None:
        self.calls += 1
        raise RuntimeError("deliver broke")


@implementer(ISubscriber)
class AsyncFailer:
    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, first_offset: int, frames: List[bytes]):
        self.calls += 1
        return fail(ValueError("deliver failed later"))


class TopicCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.storage = MemoryStorage()

    def at(self, ms: int) -> None:
        """Move the clock to T0 + C{ms} milliseconds (forwards or backwards)."""
        now_ms = round(self.clock.seconds() * 1000)
        self.clock.advance((T0_MS + ms - now_ms) / 1000)
        self.assertEqual(round(self.clock.seconds() * 1000), T0_MS + ms)

    def topic(self, ttl: int = 0, window: int = 0, max_bytes: int = 0, name: str = "t") -> Topic:
        log = self.storage.open_log(name, ttl, window)
        return Topic(name, log, self.clock, ttl, window, max_bytes)

    def follow(self, topic: Topic, start: Optional[int] = None, max_inflight: int = 0):
        """A Subscription writing into a list, started at C{start} (None: the next published)."""
        written: List[bytes] = []
        output = Output(written.append)
        subscription = Subscription(topic, output, max_inflight, start=start)
        topic.subscribe(subscription)
        subscription.drain()
        return subscription, written, output

    def new_reader(self, topic: Topic, start: Start = Start.EARLIEST, offset: int = 0,
                   committed: Optional[int] = None) -> List[int]:
        """The offsets a brand-new subscription with C{start} is sent at once."""
        first = topic.start_offset(start, offset, committed)
        subscription, written, _ = self.follow(topic, first)
        subscription.cancel()
        return offsets(written)


class OffsetTests(TopicCase):
    def test_offsets_0_1_2_without_gaps(self):
        topic = self.topic(ttl=60_000)
        recorder = Recorder()
        topic.subscribe(recorder)
        self.assertEqual(topic.next_offset, 0)
        self.assertEqual([topic.publish(None, b"a"), topic.publish(b"k", b"b"), topic.publish(None, b"c")],
                         [(0, False), (1, False), (2, False)])
        self.assertEqual(topic.next_offset, 3)
        self.assertEqual(recorder.offsets, [0, 1, 2])
        self.assertEqual(self.new_reader(topic), [0, 1, 2])
        values = [m.value for m in messages([f for _, fs in recorder.calls for f in fs])]
        self.assertEqual(values, [b"a", b"b", b"c"])

    def test_duplicates_take_no_offset(self):
        topic = self.topic(ttl=60_000, window=1_000)
        recorder = Recorder()
        topic.subscribe(recorder)
        results = [topic.publish(k, b"v") for k in (b"a", b"a", b"b", b"a", None, b"b")]
        self.assertEqual(results, [(0, False), (0, True), (1, False), (0, True), (2, False), (1, True)])
        self.assertEqual(topic.next_offset, 3)
        self.assertEqual(recorder.offsets, [0, 1, 2])  # duplicates are delivered to no one
        self.assertEqual(self.new_reader(topic), [0, 1, 2])
        self.assertEqual(topic.duplicates, 3)

    def test_offsets_continue_from_next_offset(self):
        log = self.storage.open_log("t", 0, 0)
        topic = Topic("t", log, self.clock, next_offset=41)
        self.assertEqual(topic.publish(None, b"x"), (41, False))
        self.assertEqual(topic.publish(None, b"y"), (42, False))


class FailingLog:
    """Wraps a log; while C{broken}, appends fail as a full disk's would."""

    stores_at_once = False  # (its appends may fail: not the wrapped log's promise)

    def __init__(self, log) -> None:
        self._log = log
        self.broken = False

    def __getattr__(self, name):
        return getattr(self._log, name)

    def __len__(self) -> int:
        return len(self._log)

    def append(self, first, frames):
        if self.broken:
            return fail(StorageError("no space left on device", full=True))
        return self._log.append(first, frames)


class StoresAtOnceTests(TopicCase):
    """A log that stores when add returns (in memory) is given its appends without a Deferred."""

    def calls(self, log_class) -> list:
        calls: list = []

        class Log(log_class):  # type: ignore[misc, valid-type]
            def add(self, first, frames):
                calls.append(("add", first, list(frames)))
                super().add(first, frames)

            def append(self, first, frames):
                calls.append(("append", first, list(frames)))
                return super().append(first, frames)

        log = Log(codec.message_frame_offsets("t")[1], False)
        topic = Topic("t", log, self.clock, 0, 0)
        recorder = Recorder()
        topic.subscribe(recorder)
        topic.publish(None, b"a")
        topic.publish_all([(None, b"b"), (None, b"c")])
        self.assertEqual(recorder.offsets, [0, 1, 2])
        self.assertTrue(topic.pending.done)
        return [(name, first, len(frames)) for name, first, frames in calls]

    def test_in_memory(self):
        from zaichik.storage.memory import MemoryLog

        self.assertEqual(self.calls(MemoryLog), [("add", 0, 1), ("add", 1, 2)])

    def test_a_log_that_may_fail_later(self):
        from zaichik.storage.memory import MemoryLog

        class Later(MemoryLog):
            stores_at_once = False

        # (MemoryLog.append adds: both seen, append first.)
        self.assertEqual(self.calls(Later), [("append", 0, 1), ("add", 0, 1), ("append", 1, 2), ("add", 1, 2)])
        self.assertTrue(Topic("u", Later(0), self.clock, 0, 0).fails_later)


class FailedStoreTests(TopicCase):
    """A message the log could not store is not stored: no offset, no compaction entry, no delivery."""

    def check(self, ttl: int) -> None:
        log = FailingLog(self.storage.open_log("f", ttl, 1_000))
        topic = Topic("f", log, self.clock, ttl, 1_000)
        recorder = Recorder()
        topic.subscribe(recorder)
        self.assertEqual(topic.publish(b"a", b"0"), (0, False))
        self.assertTrue(topic.pending.done)
        self.assertIsNone(topic.pending.error)
        log.broken = True
        self.assertEqual(topic.publish(b"k", b"lost"), (1, False))
        self.assertEqual(topic.pending.error.code, ErrorCode.LIMIT)
        self.assertEqual(topic.next_offset, 1)
        self.assertEqual(recorder.offsets, [0])  # never delivered
        log.broken = False
        # The next message takes offset 1 (no gap), and "k" was never stored.
        self.assertEqual(topic.publish(b"k", b"1"), (1, False))
        self.assertEqual(recorder.offsets, [0, 1])
        self.assertEqual(topic.store_errors, 1)

    def test_retaining_topic(self):
        self.check(60_000)

    def test_non_retaining_topic(self):
        self.check(0)


class TimestampTests(TopicCase):
    def test_timestamp_is_the_clock_in_milliseconds(self):
        topic = self.topic(ttl=60_000)
        recorder = Recorder()
        topic.subscribe(recorder)
        self.at(123)
        topic.publish(None, b"a")
        self.at(5_000)
        topic.publish(b"k", b"b")
        stamps = [m.timestamp for _, fs in recorder.calls for m in messages(fs)]
        self.assertEqual(stamps, [T0_MS + 123, T0_MS + 5_000])

    def test_timestamps_never_go_backwards_when_the_clock_steps_back(self):
        topic = self.topic(ttl=60_000)
        recorder = Recorder()
        topic.subscribe(recorder)
        self.at(2_000)
        topic.publish(None, b"a")
        self.at(1_000)  # stepped back a second
        topic.publish(None, b"b")
        self.at(1_500)
        topic.publish(None, b"c")
        self.at(2_500)  # past the first again
        topic.publish(None, b"d")
        stamps = [m.timestamp for _, fs in recorder.calls for m in messages(fs)]
        self.assertEqual(stamps, [T0_MS + 2_000] * 3 + [T0_MS + 2_500])
        self.assertEqual(stamps, sorted(stamps))

    def test_step_back_does_not_resurrect_or_extend_compaction(self):
        """The compaction window is measured on the non-decreasing topic time."""
        topic = self.topic(window=1_000)
        self.at(5_000)
        self.assertEqual(topic.publish(b"k", b"1"), (0, False))
        self.at(0)  # clock stepped far back: topic time stays at 5000
        self.assertEqual(topic.publish(b"k", b"2"), (0, True))
        self.at(6_000)
        self.assertEqual(topic.publish(b"k", b"3"), (1, False))


class RetentionTests(TopicCase):
    def test_expires_at_exactly_ts_plus_ttl(self):
        topic = self.topic(ttl=1_000)
        self.at(0)
        topic.publish(None, b"first")  # ts = 0
        self.at(300)
        topic.publish(None, b"second")  # ts = 300
        self.at(999)  # ts + T - 1: still retained
        self.assertEqual(topic.info().retained, 2)
        self.assertEqual(self.new_reader(topic), [0, 1])
        self.at(1_000)  # ts + T: gone
        self.assertEqual(topic.info().retained, 1)
        self.assertEqual(self.new_reader(topic), [1])
        self.at(1_299)
        self.assertEqual(topic.info().retained, 1)
        self.assertEqual(self.new_reader(topic), [1])
        self.at(1_300)
        self.assertEqual(topic.info().retained, 0)
        self.assertEqual(self.new_reader(topic), [])
        self.assertEqual(topic.expired, 2)
        # Offsets carry on after expiry.
        self.assertEqual(topic.publish(None, b"third"), (2, False))
        self.assertEqual(self.new_reader(topic), [2])

    def test_expiry_seen_by_read_without_a_sweep(self):
        topic = self.topic(ttl=10)
        topic.publish(None, b"x")
        self.at(9)
        self.assertEqual(self.successResultOf(topic.read(0, 10))[0], 0)
        self.assertEqual(len(self.successResultOf(topic.read(0, 10))[1]), 1)
        self.at(10)
        self.assertEqual(self.successResultOf(topic.read(0, 10)), (1, []))

    def test_ttl_zero_keeps_nothing_but_present_subscribers_get_it(self):
        topic = self.topic(ttl=0)
        recorder = Recorder()
        topic.subscribe(recorder)
        _, written, _ = self.follow(topic)
        self.assertEqual(topic.publish(None, b"now"), (0, False))
        self.assertEqual(topic.publish(b"k", b"again"), (1, False))
        self.assertEqual(recorder.offsets, [0, 1])
        self.assertEqual(offsets(written), [0, 1])
        self.assertEqual(topic.info().retained, 0)
        self.assertEqual(topic.retained_bytes, 0)
        self.assertEqual(self.new_reader(topic, Start.EARLIEST), [])
        self.assertEqual(self.new_reader(topic, Start.OFFSET, 0), [])
        # A later subscriber sees only what is published after it came.
        late, late_written, _ = self.follow(topic, topic.start_offset(Start.EARLIEST))
        topic.publish(None, b"later")
        self.assertEqual(offsets(late_written), [2])

    def frame_size(self, name: str, value: bytes, key: bytes = b"") -> int:
        return len(codec.message_frame(codec.topic_prefix(name), 0, 0, key or None, value))

    def test_max_retained_bytes_trims_oldest_first(self):
        size = self.frame_size("t", b"x" * 10)
        topic = self.topic(ttl=60_000, max_bytes=2 * size)
        for i in range(2):
            topic.publish(None, b"%010d" % i)
        self.assertEqual((topic.info().retained, topic.retained_bytes), (2, 2 * size))
        topic.publish(None, b"%010d" % 2)
        self.assertEqual((topic.info().retained, topic.retained_bytes), (2, 2 * size))
        self.assertEqual(self.new_reader(topic), [1, 2])
        topic.publish(None, b"%010d" % 3)
        topic.publish(None, b"%010d" % 4)
        self.assertEqual(self.new_reader(topic), [3, 4])
        self.assertEqual(topic.expired, 3)
        self.assertLessEqual(topic.retained_bytes, 2 * size)
        # A subscription asking for a trimmed offset starts at the oldest retained one.
        self.assertEqual(topic.start_offset(Start.OFFSET, 0), 3)

    def test_present_subscriber_gets_a_message_bigger_than_the_bound(self):
        topic = self.topic(ttl=60_000, max_bytes=100)
        recorder = Recorder()
        topic.subscribe(recorder)
        _, written, _ = self.follow(topic)
        small = b"s"
        topic.publish(None, small)
        big = b"B" * 500
        self.assertEqual(topic.publish(None, big), (1, False))
        self.assertEqual(recorder.offsets, [0, 1])
        self.assertEqual([m.value for m in messages(written)], [small, big])
        # Neither is retained now: the big one alone is over the bound.
        self.assertEqual(topic.info().retained, 0)
        self.assertEqual(topic.retained_bytes, 0)
        self.assertEqual(self.new_reader(topic), [])
        self.assertEqual(topic.next_offset, 2)


class CompactionTests(TopicCase):
    def test_window_edges(self):
        topic = self.topic(ttl=60_000, window=1_000)
        self.at(0)
        self.assertEqual(topic.publish(b"k", b"1"), (0, False))
        self.at(999)  # ts + W - 1: dropped, with the original's offset
        self.assertEqual(topic.publish(b"k", b"2"), (0, True))
        self.assertEqual(topic.next_offset, 1)
        self.at(1_000)  # ts + W: stored
        self.assertEqual(topic.publish(b"k", b"3"), (1, False))
        self.assertEqual([m.value for m in messages(self.successResultOf(topic.read(0, 10))[1])], [b"1", b"3"])

    def test_window_not_extended_by_dropped_duplicates(self):
        topic = self.topic(window=1_000)
        for ms, expected in [(0, (0, False)), (500, (0, True)), (999, (0, True)),
                             (1_000, (1, False)), (1_001, (1, True)), (1_999, (1, True)),
                             (2_000, (2, False))]:
            self.at(ms)
            self.assertEqual(topic.publish(b"k", b"v"), expected, f"at {ms} ms")

    def test_keyless_messages_never_dropped(self):
        topic = self.topic(window=1_000)
        self.assertEqual([topic.publish(None, b"same") for _ in range(3)],
                         [(0, False), (1, False), (2, False)])
        # An empty key is no key.
        self.assertEqual(topic.publish(b"", b"same"), (3, False))
        self.assertEqual(topic.publish(b"", b"same"), (4, False))

    def test_window_zero_drops_nothing(self):
        topic = self.topic(ttl=60_000, window=0)
        self.assertEqual([topic.publish(b"k", b"v") for _ in range(3)],
                         [(0, False), (1, False), (2, False)])
        self.assertEqual(topic.duplicates, 0)
        self.assertEqual(topic._keys, {})

    def test_keys_are_independent(self):
        topic = self.topic(window=1_000)
        self.at(0)
        self.assertEqual(topic.publish(b"a", b"v"), (0, False))
        self.at(600)
        self.assertEqual(topic.publish(b"b", b"v"), (1, False))
        self.assertEqual(topic.publish(b"a", b"v"), (0, True))
        self.at(1_000)  # a's window is over, b's is not
        self.assertEqual(topic.publish(b"a", b"v"), (2, False))
        self.assertEqual(topic.publish(b"b", b"v"), (1, True))
        self.at(1_600)
        self.assertEqual(topic.publish(b"b", b"v"), (3, False))
        self.assertEqual(topic.publish(b"a", b"v"), (2, True))

    def test_duplicate_of_an_expired_message_still_dropped(self):
        """The window runs from the stored message's timestamp, whatever retention does."""
        topic = self.topic(ttl=100, window=1_000)
        topic.publish(b"k", b"v")
        self.at(500)
        self.assertEqual(topic.info().retained, 0)
        self.assertEqual(topic.publish(b"k", b"v"), (0, True))

    def test_key_map_shrinks_after_windows_pass(self):
        topic = self.topic(window=1_000)
        for i in range(5_000):
            topic.publish(b"key-%d" % i, b"v")
        self.assertEqual(len(topic._keys), 5_000)
        self.at(500)
        topic.expire()
        self.assertEqual(len(topic._keys), 5_000)  # still inside the window
        self.at(1_000)
        topic.expire()
        self.assertEqual((len(topic._keys), len(topic._key_order)), (0, 0))
        # And forgetting does not change the decisions: the keys are new again.
        self.assertEqual(topic.publish(b"key-0", b"v"), (5_000, False))

    def test_forgetting_keeps_keys_stored_again(self):
        topic = self.topic(window=1_000)
        topic.publish(b"k", b"v")  # ts 0, offset 0
        self.at(1_000)
        self.assertEqual(topic.publish(b"k", b"v"), (1, False))  # ts 1000
        self.at(1_500)
        topic.expire()  # the ts-0 entry goes, the ts-1000 one stays
        self.assertEqual(len(topic._keys), 1)
        self.at(1_999)
        self.assertEqual(topic.publish(b"k", b"v"), (1, True))
        self.at(2_000)
        topic.expire()
        self.assertEqual(len(topic._keys), 0)

    def test_key_order_bounded_without_sweeps_for_a_recurring_key(self):
        topic = self.topic(window=10)
        for i in range(1_000):
            self.at(i * 10)
            self.assertEqual(topic.publish(b"k", b"v"), (i, False))
        self.assertLessEqual(len(topic._key_order), 2 * len(topic._keys) + 65)

    def test_publish_many_decides_each_message_and_delivers_once(self):
        topic = self.topic(ttl=60_000, window=1_000)
        first, second = Recorder(), Recorder()
        topic.subscribe(first)
        topic.subscribe(second)
        self.assertEqual(topic.publish(b"old", b"0"), (0, False))
        first.calls.clear()
        second.calls.clear()
        self.at(10)
        results = topic.publish_many([(b"a", b"1"), (b"a", b"2"), (b"old", b"3"),
                                      (None, b"4"), (None, b"5"), (b"b", b"6"), (b"b", b"7")])
        self.assertEqual(results, [(1, False), (1, True), (0, True), (2, False), (3, False),
                                   (4, False), (4, True)])
        for recorder in (first, second):
            self.assertEqual(len(recorder.calls), 1)  # one deliver call per subscriber
            self.assertEqual(recorder.calls[0][0], 1)
            self.assertEqual([m.value for m in messages(recorder.calls[0][1])], [b"1", b"4", b"5", b"6"])
        self.assertEqual(topic.next_offset, 5)

    def test_publish_many_of_only_duplicates_delivers_nothing(self):
        topic = self.topic(window=1_000)
        topic.publish(b"a", b"v")
        recorder = Recorder()
        topic.subscribe(recorder)
        self.assertEqual(topic.publish_many([(b"a", b"x"), (b"a", b"y")]), [(0, True), (0, True)])
        self.assertEqual(recorder.calls, [])


class StartTests(TopicCase):
    def setUp(self) -> None:
        super().setUp()
        self.t = self.topic(ttl=1_000)
        self.at(0)
        self.t.publish(None, b"0")
        self.at(400)
        for i in range(1, 4):
            self.t.publish(None, b"%d" % i)  # offsets 1, 2, 3 at ts 400
        self.at(1_000)  # offset 0 has expired; 1..3 retained

    def test_default_without_commit_is_oldest_retained(self):
        self.assertEqual(self.t.start_offset(Start.DEFAULT, 3), 1)
        self.assertEqual(self.new_reader(self.t, Start.DEFAULT), [1, 2, 3])

    def test_default_with_commit_resumes_after_it(self):
        self.assertEqual(self.t.start_offset(Start.DEFAULT, 0, committed=1), 2)
        self.assertEqual(self.new_reader(self.t, Start.DEFAULT, committed=1), [2, 3])
        self.assertEqual(self.new_reader(self.t, Start.DEFAULT, committed=3), [])
        # Committed offset expired: the oldest retained.
        self.assertEqual(self.t.start_offset(Start.DEFAULT, committed=0), 1)

    def test_default_with_commit_then_new_messages(self):
        subscription, written, _ = self.follow(self.t, self.t.start_offset(Start.DEFAULT, committed=3))
        self.assertEqual(written, [])
        self.t.publish(None, b"4")
        self.assertEqual(offsets(written), [4])

    def test_latest_is_the_next_published(self):
        self.assertEqual(self.t.start_offset(Start.LATEST, 1), 4)
        subscription, written, _ = self.follow(self.t, self.t.start_offset(Start.LATEST))
        self.assertEqual(written, [])
        self.t.publish(None, b"4")
        self.assertEqual(offsets(written), [4])

    def test_offset_inside(self):
        self.assertEqual(self.t.start_offset(Start.OFFSET, 2), 2)
        self.assertEqual(self.new_reader(self.t, Start.OFFSET, 2), [2, 3])

    def test_offset_expired_is_oldest_retained(self):
        self.assertEqual(self.t.start_offset(Start.OFFSET, 0), 1)
        self.assertEqual(self.new_reader(self.t, Start.OFFSET, 0), [1, 2, 3])

    def test_offset_past_the_end_is_the_next_published(self):
        for offset in (4, 5, 1_000, 2**64 - 1):
            self.assertEqual(self.t.start_offset(Start.OFFSET, offset), 4, offset)
        subscription, written, _ = self.follow(self.t, self.t.start_offset(Start.OFFSET, 99))
        self.t.publish(None, b"4")
        self.assertEqual(offsets(written), [4])

    def test_earliest_is_oldest_retained(self):
        self.assertEqual(self.t.start_offset(Start.EARLIEST, 3, committed=2), 1)
        self.assertEqual(self.new_reader(self.t, Start.EARLIEST), [1, 2, 3])

    def test_starts_on_an_empty_retaining_topic(self):
        topic = self.topic(ttl=1_000, name="empty")
        for start in Start:
            self.assertEqual(topic.start_offset(start, 7, None), 0, start)


class FanOutTests(TopicCase):
    def test_raising_subscriber_removed_others_keep_receiving(self):
        topic = self.topic(ttl=60_000)
        before, bad, after = Recorder(), Raiser(), Recorder()
        for s in (before, bad, after):
            topic.subscribe(s)
        topic.publish(None, b"0")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(bad, topic.subscribers)
        self.assertEqual(topic.info().subscribers, 2)
        topic.publish(None, b"1")
        self.assertEqual(bad.calls, 1)
        self.assertEqual(before.offsets, [0, 1])
        self.assertEqual(after.offsets, [0, 1])

    def test_failing_deferred_removes_subscriber(self):
        topic = self.topic()
        good, bad = Recorder(), AsyncFailer()
        topic.subscribe(bad)
        topic.subscribe(good)
        topic.publish(None, b"0")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(topic.subscribers, [good])
        topic.publish(None, b"1")
        self.assertEqual((bad.calls, good.offsets), (1, [0, 1]))

    def test_unsubscribed_gets_nothing(self):
        topic = self.topic()
        recorder = Recorder()
        topic.subscribe(recorder)
        topic.publish(None, b"0")
        topic.unsubscribe(recorder)
        topic.unsubscribe(recorder)  # twice is harmless
        topic.publish(None, b"1")
        self.assertEqual(recorder.offsets, [0])


class SubscriptionTests(TopicCase):
    def test_max_inflight_window_on_a_retaining_topic(self):
        topic = self.topic(ttl=60_000)
        for _ in range(5):
            topic.publish(None, b"v")
        subscription, written, _ = self.follow(topic, 0, max_inflight=2)
        self.assertEqual(offsets(written), [0, 1])
        self.assertEqual(subscription.inflight, 2)
        topic.publish(None, b"v")  # offset 5: waits
        self.assertEqual(offsets(written), [0, 1])
        subscription.acknowledge(0)
        self.assertEqual(offsets(written), [0, 1, 2])
        subscription.acknowledge(2)
        self.assertEqual(offsets(written), [0, 1, 2, 3, 4])
        subscription.acknowledge(4)
        self.assertEqual(offsets(written), [0, 1, 2, 3, 4, 5])
        self.assertEqual(subscription.inflight, 1)
        subscription.acknowledge(5)
        topic.publish(None, b"v")
        self.assertEqual(offsets(written), [0, 1, 2, 3, 4, 5, 6])

    def test_max_inflight_window_on_an_unretained_topic(self):
        topic = self.topic(ttl=0)
        subscription, written, _ = self.follow(topic, max_inflight=1)
        for _ in range(3):
            topic.publish(None, b"v")
        self.assertEqual(offsets(written), [0])
        self.assertEqual(subscription.pending, 2)
        subscription.acknowledge(0)
        self.assertEqual(offsets(written), [0, 1])
        subscription.acknowledge(1)
        self.assertEqual(offsets(written), [0, 1, 2])
        self.assertEqual(subscription.pending, 0)

    def test_no_window_when_max_inflight_is_zero(self):
        topic = self.topic(ttl=60_000)
        for _ in range(50):
            topic.publish(None, b"v")
        subscription, written, _ = self.follow(topic, 0, max_inflight=0)
        self.assertEqual(offsets(written), list(range(50)))
        self.assertEqual(subscription.inflight, 0)

    def test_expired_messages_waiting_are_skipped(self):
        topic = self.topic(ttl=1_000)
        self.at(0)
        subscription, written, _ = self.follow(topic, 0, max_inflight=1)
        for _ in range(3):
            topic.publish(None, b"v")  # 0 sent; 1 and 2 wait
        self.assertEqual(offsets(written), [0])
        self.at(1_000)  # 1 and 2 expire while waiting
        topic.publish(None, b"v")  # offset 3
        subscription.acknowledge(0)
        self.assertEqual(offsets(written), [0, 3])
        self.assertEqual(subscription.next, 4)

    def test_expired_messages_waiting_behind_a_paused_output_are_skipped(self):
        topic = self.topic(ttl=1_000)
        subscription, written, output = self.follow(topic, 0)
        output.paused = True
        topic.publish(None, b"old")
        self.at(500)
        topic.publish(None, b"young")
        self.assertEqual(written, [])
        self.at(1_000)  # the first has expired
        output.paused = False
        subscription.drain()
        self.assertEqual(offsets(written), [1])

    def test_cancel_stops_delivery(self):
        topic = self.topic(ttl=60_000)
        subscription, written, _ = self.follow(topic)
        topic.publish(None, b"v")
        subscription.cancel()
        topic.publish(None, b"v")
        subscription.drain()
        self.assertEqual(offsets(written), [0])
        self.assertEqual(topic.subscribers, [])

    def test_subscription_started_inside_a_unit_of_work_gets_each_message_once(self):
        from zaichik.work import UnitOfWork
        work = UnitOfWork(lambda: None)
        log = self.storage.open_log("b", 60_000, 0)
        topic = Topic("b", log, self.clock, 60_000, 0, work=work)
        with work:
            topic.publish(None, b"0")
            topic.publish(None, b"1")
            subscription, written, _ = self.follow(topic, topic.start_offset(Start.EARLIEST))
            # Staged, not stored yet: nothing is delivered before the unit ends.
            self.assertEqual(offsets(written), [])
            topic.publish(None, b"2")
            self.assertEqual(offsets(written), [])
        self.assertEqual(offsets(written), [0, 1, 2])


class FrameBlockTests(TopicCase):
    """
    A topic that retains nothing stages its fire-and-forget runs as blocks
    of frames (codec.FrameBlock) and hands the unit's blocks to its log and
    subscribers as one: the same frames, offsets and order as the list path.
    """

    def publish_in_one_unit(self, topic: Topic, *runs) -> None:
        with topic._work:
            for run in runs:
                if callable(run):
                    run()
                else:
                    topic.publish_all(run)

    def test_a_units_runs_reach_subscribers_as_one_block(self):
        topic = self.topic()
        seen: list = []
        recorder = Recorder()
        topic.subscribe(recorder)
        original = recorder.deliver
        recorder.deliver = lambda first, frames: (seen.append(frames), original(first, frames))  # type: ignore
        _, written, _ = self.follow(topic)
        self.publish_in_one_unit(topic, [(None, b"a"), (None, b"b")], [(b"", b"c")])
        self.assertEqual(len(seen), 1)
        self.assertIsInstance(seen[0], codec.FrameBlock)
        self.assertEqual(len(seen[0]), 3)
        expected = codec.message_frames_py(topic._prefix, 0, T0_MS, [(None, b"a"), (None, b"b"), (None, b"c")])
        self.assertEqual(seen[0].data, b"".join(expected))
        self.assertEqual(recorder.calls, [(0, expected)])
        # The subscription wrote the block as it is, in one write.
        self.assertEqual(written, [b"".join(expected)])
        self.assertEqual(topic.next_offset, 3)

    def test_keyed_publish_after_a_block_keeps_the_order(self):
        """A keyed message staged after a block: the block is split first, so offsets stay in order."""
        topic = self.topic()
        _, written, _ = self.follow(topic)
        self.publish_in_one_unit(topic, [(None, b"a"), (None, b"b")], lambda: topic.publish(b"k", b"c"),
                                 [(None, b"d")])
        got = messages(written)
        self.assertEqual([m.offset for m in got], [0, 1, 2, 3])
        self.assertEqual([m.value for m in got], [b"a", b"b", b"c", b"d"])
        self.assertEqual([m.key for m in got], [None, None, b"k", None])

    def test_refused_run_after_a_block(self):
        """A run refused whole (a frame too large) after a block in the same unit: the block is delivered."""
        topic = self.topic()
        topic.max_frame_size = 100
        _, written, _ = self.follow(topic)

        def too_large():
            with self.assertRaises(ZaichikError) as raised:
                topic.publish_all([(None, b"x"), (None, b"y" * 200)])
            self.assertEqual(raised.exception.code, ErrorCode.LIMIT)

        self.publish_in_one_unit(topic, [(None, b"a")], too_large, [(None, b"b")])
        self.assertEqual([(m.offset, m.value) for m in messages(written)], [(0, b"a"), (1, b"b")])

    def test_retaining_topic_stages_frames(self):
        """A topic that retains keeps each frame for later readers: no block."""
        topic = self.topic(ttl=60_000)
        recorder = Recorder()
        seen: list = []
        recorder.deliver = lambda first, frames: seen.append(frames)  # type: ignore
        topic.subscribe(recorder)
        self.publish_in_one_unit(topic, [(None, b"a")], [(None, b"b")])
        self.assertEqual([type(frames) for frames in seen], [list])
        self.assertEqual(self.new_reader(topic), [0, 1])

    def test_slow_subscriber_queues_a_blocks_frames(self):
        """A subscriber without room (max_inflight) takes a block's frames one by one, in order."""
        topic = self.topic()
        subscription, written, _ = self.follow(topic, max_inflight=2)
        self.publish_in_one_unit(topic, [(None, b"a"), (None, b"b"), (None, b"c")])
        self.assertEqual(offsets(written), [0, 1])
        subscription.acknowledge(1)
        self.assertEqual(offsets(written), [0, 1, 2])


class FrameBlockSequenceTests(SynchronousTestCase):
    def test_reads_as_its_frames(self):
        frames = codec.message_frames_py(codec.topic_prefix("t"), 5, 9, [(None, b"a"), (None, b"bb"), (None, b"")])
        block = codec.FrameBlock(b"".join(frames), 3)
        self.assertEqual(len(block), 3)
        self.assertEqual(block[0], frames[0])
        self.assertEqual(block[-1], frames[-1])
        self.assertEqual(block[1:], frames[1:])
        self.assertEqual(list(block), frames)
        self.assertEqual(sum(map(len, block)), len(block.data))
        self.assertIs(codec.joined(block), block.data)
        self.assertEqual(codec.joined(frames), block.data)
        self.assertIs(codec.joined(frames[:1]), frames[0])

    def test_chunks(self):
        """Several blocks (a unit's reads): the same frames; joined only when data is asked for, then kept once."""
        frames = codec.message_frames_py(codec.topic_prefix("t"), 5, 9, [(None, b"a"), (None, b"bb"), (None, b"")])
        first, rest = b"".join(frames[:1]), b"".join(frames[1:])
        block = codec.FrameBlock([first, rest], 3)
        self.assertEqual(block.chunks, [first, rest])
        self.assertEqual(list(block), frames)
        self.assertEqual(block.data, first + rest)
        self.assertEqual(block.chunks, [block.data])
        self.assertIs(codec.FrameBlock([first], 1).data, first)
