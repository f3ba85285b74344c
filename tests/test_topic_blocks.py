"""
A topic whose log takes blocks of frames (codec.FrameBlock) behaves as one
whose log takes lists: a differential hypothesis test over random units of
work.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.errors import ZaichikError
from zaichik.storage import StorageError
from zaichik.storage.memory import MemoryLog
from zaichik.subscription import Output, Subscription
from zaichik.topic import KeyBudget, Topic
from zaichik.work import UnitOfWork

T0 = 1_700_000_000


class RecordingLog(MemoryLog):
    """A MemoryLog that records appends and may answer later (async)."""

    def __init__(self, blocks, async_):
        super().__init__(codec.message_frame_offsets("t")[1], False)
        self.takes_blocks = blocks
        self.async_ = async_
        self.stores_at_once = not async_  # (a topic then calls add: see IMessageLog.append)
        self.appends = []
        self.ds = []

    def _record(self, first, frames):
        self.appends.append((first, type(frames).__name__ == "FrameBlock", list(frames)))

    def add(self, first, frames):
        self._record(first, frames)
        super().add(first, frames)

    def append(self, first, frames):
        if self.async_:
            self._record(first, frames)
            d = Deferred()
            self.ds.append(d)
            return d
        return super().append(first, frames)


class AnySubscriber:
    def __init__(self):
        self.calls = []

    def deliver(self, first, frames):
        self.calls.append((first, list(frames)))

    def stopped(self, why):
        pass


entry = st.tuples(st.sampled_from([None, b"", b"k", b"j", b"long", b"m"]), st.binary(max_size=20))
op = st.one_of(
    st.tuples(st.just("publish"), entry),
    st.tuples(st.just("many"), st.lists(entry, max_size=4)),
    st.tuples(st.just("batch"), st.lists(entry, max_size=4)),
    st.tuples(st.just("tick"), st.integers(0, 3)),
    st.tuples(st.just("sub"), st.integers(0, 3)),
    st.tuples(st.just("ack"), st.integers(0, 3)),
)
unit = st.lists(op, max_size=6)


def run_units(blocks, async_, window, units, fail_at):
    clock = Clock()
    clock.advance(T0)
    work = UnitOfWork(lambda: None)
    log = RecordingLog(blocks, async_)
    topic = Topic("t", log, clock, 0, window, 0, 0, work, max_frame_size=40, keys=KeyBudget(2, 2, 3))
    rec = AnySubscriber()
    topic.subscribe(rec)
    out = []
    subs = []
    pendings = []
    for u in units:
        with work:
            for kind, arg in u:
                try:
                    if kind == "publish":
                        out.append(topic.publish(*arg))
                    elif kind == "many":
                        out.append(topic.publish_many(arg))
                    elif kind == "batch":
                        out.append(topic.published_batch(7, arg))
                    elif kind == "sub":
                        w = []
                        sub = Subscription(topic, Output(w.append), arg, start=None)
                        topic.subscribe(sub)
                        sub.drain()
                        subs.append((sub, w))
                        continue
                    elif kind == "ack":
                        for sub, _ in subs:
                            if sub.last_sent is not None:
                                sub.acknowledge(sub.last_sent - arg)
                        continue
                    else:
                        clock.advance(arg / 1000)
                        continue
                except ZaichikError as e:
                    out.append(("error", e.code))
                except (IndexError, ValueError) as e:
                    out.append(("exc", type(e).__name__))
                p = topic.waiting()
                pendings.append(p)
                out.append(topic.next_offset)
        if async_:
            for i, d in enumerate(log.ds):
                if not d.called:
                    if fail_at is not None and i >= fail_at:
                        d.errback(StorageError("nope"))
                    else:
                        d.callback(None)
            out.append(("after", topic.next_offset))
    # normalise pending ids to first-seen order
    ids = {}
    norm = [None if p is None else ids.setdefault(id(p), len(ids)) for p in pendings]
    appends = [(f, fr) for f, _, fr in log.appends]
    used_blocks = any(block for _, block, _ in log.appends)
    return (out, [b"".join(w) for _, w in subs], norm, appends, rec.calls, topic.store_errors), used_blocks


class BlockDifferentialTests(SynchronousTestCase):
    """
    Random units of work (publish, publish_many, published_batch, with or
    without keys and compaction, refusals, clock ticks, subscriptions with
    windows and acks, appends answered later and failing from some point
    on) on two topics that differ only in whether their log takes blocks:
    the same results, offsets, pendings, appends, deliveries and writes.
    (From a review of the block staging.)
    """

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(unit, max_size=4), st.booleans(), st.sampled_from([0, 1000]),
           st.one_of(st.none(), st.integers(0, 3)))
    def test_blocks_change_nothing_seen(self, units, async_, window, fail_at):
        a, _ = run_units(True, async_, window, units, fail_at)
        b, unused = run_units(False, async_, window, units, fail_at)
        self.assertEqual(a, b)
        self.assertFalse(unused)

    def test_the_blocks_are_used(self):
        """(The differential compares something: unkeyed runs do reach the log as blocks.)"""
        _, used = run_units(True, False, 0, [[("many", [(None, b"a"), (None, b"b")]), ("publish", (b"k", b"c"))],
                                              [("batch", [(None, b"d")] * 3)]], None)
        self.assertTrue(used)


def as_entries(entries):
    """C{entries} as parse_publish_run gives them from a read (compiled: an Entries)."""
    data = b"".join(codec.frame(codec.Publish(0, "t", v, k).encode()) for k, v in entries)
    groups, count, _ = codec.parse_publish_run(data, 0, len(data), 1 << 20)
    assert count == len(entries)
    return groups["t"]


class EntriesThroughTopicTests(SynchronousTestCase):
    """The same units with each publish_many given a run's entries (Entries where compiled). (From a review.)"""

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(unit, max_size=4), st.booleans(), st.sampled_from([0, 1000]),
           st.one_of(st.none(), st.integers(0, 3)))
    def test_entries_same_as_lists(self, units, async_, window, fail_at):
        listed = [[(k, [(key or None, v) for key, v in a]) if k == "many" else (k, a) for k, a in u] for u in units]
        parsed = [[(k, as_entries(a)) if k == "many" and a else (k, a) for k, a in u] for u in listed]
        a, _ = run_units(True, async_, window, parsed, fail_at)
        b, _ = run_units(False, async_, window, listed, fail_at)
        self.assertEqual(a, b)
