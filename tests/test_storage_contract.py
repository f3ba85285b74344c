"""
The storage contract (L{zaichik.storage.IStorage} and
L{zaichik.storage.IMessageLog}), as their docstrings state it: one suite,
L{StorageContract}, run against every backend.

Each backend is one L{SynchronousTestCase} subclass that says how to make a
storage (C{new_storage}) and whether it persists (C{reopen} closes it and
opens a new one on the same place; backends that keep nothing skip those
tests).  The disk backend runs several times: with C{--fsync never}, with
C{--fsync always} (its blocking fsyncs run at once), with segments so small
that every test crosses segment boundaries, and with a cache so small that
reads come from the segments.  A networked backend (the next issue) adds
one subclass here.

Frames are real MESSAGE frames (L{codec.message_frame}), since a backend
may read offsets, timestamps and keys back from them.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Dict, List, Optional, Tuple
from unittest import SkipTest

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from zaichik import codec
from zaichik.storage import IMessageLog, IStorage, TopicState
from zaichik.storage.disk import DiskStorage
from zaichik.storage.memory import MemoryStorage

T0 = 1_700_000_000  # the clock, in seconds
NOW = T0 * 1000  # ... and in ms, as timestamps are

HOUR = 3_600_000

Entry = Tuple[int, bytes]  # (offset, frame)


def run_now(f, *args):
    """The disk backend's blocking work (its fsyncs), run at once: deterministic."""
    return maybeDeferred(f, *args)


def make_frame(name: str, offset: int, timestamp: int, key: Optional[bytes] = None,
               value: Optional[bytes] = None) -> bytes:
    if value is None:
        # Sizes vary, so that byte accounting and segment boundaries are exercised.
        value = b"%s@%d:" % (name.encode(), offset) + b"x" * (offset * 7 % 53)
    return codec.message_frame(codec.topic_prefix(name), offset, timestamp, key, value)


def decode(frame: bytes) -> codec.Message:
    message = codec.decode_reply(frame[4:])
    assert type(message) is codec.Message, message
    return message


class StorageContract:
    """
    The contract tests; a subclass supplies C{new_storage()} and says
    whether the backend persists (C{persistent}) and whether an append's
    Deferred fires before the unit of work ends (C{fires_before_sync}).
    """

    persistent = True
    fires_before_sync = True

    def new_storage(self):
        raise NotImplementedError()

    # -- the fixture ------------------------------------------------------------

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.storage = self.new_storage()
        self.states = self.successResultOf(self.storage.open())
        self.addCleanup(self._close)

    def _close(self) -> None:
        if self.storage is not None:
            self.successResultOf(self.storage.close())
            self.storage = None

    def make_log(self, name: str, retention: int = HOUR, window: int = 0):
        return self.storage.open_log(name, retention, window)

    def reopen(self) -> Dict[str, TopicState]:
        """Close the storage and open it again (what a restart does): the states it reports."""
        if not self.persistent:
            raise SkipTest("this backend keeps nothing over a restart")
        self.successResultOf(self.storage.close())
        self.storage = self.new_storage()
        self.states = self.successResultOf(self.storage.open())
        return {state.name: state for state in self.states}

    # -- helpers ----------------------------------------------------------------

    def append(self, log, first: int, frames: List[bytes]) -> None:
        """One unit of work: append, end the unit (sync), and the append has fired."""
        d = log.append(first, frames)
        self.storage.sync()
        self.assertIsNone(self.successResultOf(d))

    def add(self, log, name: str, first: int, count: int, timestamp: int = NOW,
            keys: Optional[List[Optional[bytes]]] = None) -> List[Entry]:
        """Append C{count} messages from offset C{first}, all at C{timestamp}; returns them."""
        frames = [make_frame(name, first + i, timestamp, keys[i] if keys else None) for i in range(count)]
        self.append(log, first, frames)
        return list(zip(range(first, first + count), frames))

    def read(self, log, offset: int, limit: int) -> Tuple[int, List[bytes]]:
        """One read, checked: at most C{limit} frames, with consecutive offsets from C{first} >= C{offset}."""
        first, frames = self.successResultOf(log.read(offset, limit))
        self.assertLessEqual(len(frames), limit)
        self.assertGreaterEqual(first, offset, f"read({offset}, {limit}) began before the offset asked for")
        self.assertEqual([decode(f).offset for f in frames], list(range(first, first + len(frames))),
                         f"read({offset}, {limit}) returned offsets that do not follow from {first}")
        return first, frames

    def read_run(self, log, offset: int, limit: int) -> Tuple[int, List[bytes]]:
        """
        What one read returns, or several when one returns fewer than
        C{limit} (allowed: "up to"; the disk backend stops at its cache's
        start): the frames from C{offset} on, up to C{limit}, the gap or the end.
        """
        first, frames = self.read(log, offset, limit)
        frames = list(frames)
        while frames and len(frames) < limit:
            end = first + len(frames)
            more_first, more = self.read(log, end, limit - len(frames))
            if not more or more_first != end:
                break
            frames += more
        return first, frames

    def read_all(self, log, offset: int = 0, limit: int = 1000) -> List[Entry]:
        """Read on from C{offset} until a read returns nothing, as a subscriber does."""
        out: List[Entry] = []
        for _ in range(100_000):
            first, frames = self.read(log, offset, limit)
            if not frames:
                return out
            out.extend(zip(range(first, first + len(frames)), frames))
            offset = first + len(frames)
        self.fail("read_all does not end")

    def check(self, log, expected: List[Entry], limits=(1, 3, 1000)) -> None:
        """The log holds exactly C{expected}, and its length, first offset and bytes say so."""
        for limit in limits:
            self.assertEqual(self.read_all(log, 0, limit), expected, f"reading with limit {limit}")
        self.assertEqual(len(log), len(expected))
        self.assertEqual(log.nbytes, sum(len(frame) for _, frame in expected))
        self.assertEqual(log.first_offset(), expected[0][0] if expected else None)

    # -- the interfaces -----------------------------------------------------------

    def test_provides_the_interfaces(self):
        self.assertTrue(verifyObject(IStorage, self.storage))
        self.assertTrue(verifyObject(IMessageLog, self.make_log("t")))

    def test_a_new_storage_knows_no_topics(self):
        self.assertEqual(self.states, [])
        self.assertEqual(self.storage.commits(), {})
        self.assertEqual(self.storage.damaged, 0)

    # -- append and read -----------------------------------------------------------

    def test_empty_log(self):
        log = self.make_log("t")
        self.assertEqual((len(log), log.nbytes, log.first_offset()), (0, 0, None))
        first, frames = self.read(log, 0, 10)
        self.assertEqual(frames, [])
        first, frames = self.read(log, 5, 10)
        self.assertEqual(frames, [])

    def test_append_fires_then_read_returns_the_frames(self):
        log = self.make_log("t")
        expected = self.add(log, "t", 0, 3)
        self.assertEqual(self.read_run(log, 0, 10), (0, [frame for _, frame in expected]))
        self.check(log, expected)

    def test_appends_accumulate(self):
        log = self.make_log("t")
        expected: List[Entry] = []
        offset = 0
        for run in range(40):
            count = run % 5 + 1
            expected += self.add(log, "t", offset, count, NOW + run)
            offset += count
        self.check(log, expected, limits=(1, 2, 7, 1000))

    def test_read_from_inside_a_run(self):
        log = self.make_log("t")
        expected = self.add(log, "t", 0, 10)
        self.assertEqual(self.read_run(log, 4, 3), (4, [f for _, f in expected[4:7]]))
        self.assertEqual(self.read_run(log, 9, 3), (9, [expected[9][1]]))
        self.assertEqual(self.read_all(log, 6), expected[6:])

    def test_limit_is_honoured(self):
        log = self.make_log("t")
        expected = self.add(log, "t", 0, 20)
        for limit in (1, 2, 5, 19, 20, 21):
            first, frames = self.read(log, 0, limit)  # (checks len(frames) <= limit)
            self.assertTrue(frames)
            self.assertEqual((first, frames), (0, [f for _, f in expected[:len(frames)]]))
            self.assertEqual(self.read_run(log, 0, limit), (0, [f for _, f in expected[:limit]]))

    def test_read_older_than_the_oldest(self):
        """A log may begin at any offset (a topic's next offset after a restart); reads start at its oldest."""
        log = self.make_log("t")
        expected = self.add(log, "t", 100, 5)
        self.assertEqual(self.read_run(log, 0, 2), (100, [f for _, f in expected[:2]]))
        self.assertEqual(self.read_run(log, 99, 10), (100, [f for _, f in expected]))
        self.check(log, expected)

    def test_read_past_the_end(self):
        log = self.make_log("t")
        self.add(log, "t", 0, 5)
        for offset in (5, 6, 1000):
            first, frames = self.read(log, offset, 10)
            self.assertEqual(frames, [])
        # What comes later is read from where the last read ended.
        expected = self.add(log, "t", 5, 2)
        self.assertEqual(self.read_run(log, 5, 10), (5, [f for _, f in expected]))

    def test_appends_fire_in_the_order_they_were_made(self):
        log = self.make_log("t")
        fired = []
        for i in range(3):
            log.append(i * 2, [make_frame("t", i * 2, NOW), make_frame("t", i * 2 + 1, NOW)]).addCallback(
                lambda _, i=i: fired.append(i))
        self.storage.sync()
        self.assertEqual(fired, [0, 1, 2])
        self.assertEqual([o for o, _ in self.read_all(log)], list(range(6)))

    def test_nothing_is_read_before_its_append_fires(self):
        log = self.make_log("t")
        self.add(log, "t", 0, 2)
        d = log.append(2, [make_frame("t", 2, NOW)])
        self.assertEqual(d.called, self.fires_before_sync)
        if not d.called:
            first, frames = self.read(log, 0, 10)
            self.assertEqual([decode(f).offset for f in frames], [0, 1])
            first, frames = self.read(log, 2, 10)
            self.assertEqual(frames, [])
        self.storage.sync()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([o for o, _ in self.read_all(log)], [0, 1, 2])

    def test_large_and_empty_messages(self):
        """Messages larger than a small segment or cache, and empty ones, come back byte for byte."""
        log = self.make_log("t")
        expected: List[Entry] = []
        values = [b"", b"v" * 3000, b"", b"\x00\xff" * 2500, b"k", b"w" * 70_000]
        for offset, value in enumerate(values):
            frames = [make_frame("t", offset, NOW + offset, b"key%d" % offset if offset % 2 else None, value)]
            self.append(log, offset, frames)
            expected.append((offset, frames[0]))
        self.check(log, expected)
        self.assertEqual([decode(f).value for _, f in self.read_all(log)], values)
        bound = sum(len(f) for _, f in expected[-2:])  # the two newest fit, exactly
        self.assertEqual(log.trim(bound), 4)
        self.check(log, expected[4:])
        if self.persistent:
            self.reopen()
            log = self.make_log("t")
            log.trim(bound)
            self.check(log, expected[4:])

    def test_several_logs_in_one_storage(self):
        logs = {name: self.make_log(name) for name in ("a", "b/c.d-e_f", "g")}
        expected: Dict[str, List[Entry]] = {name: [] for name in logs}
        for i in range(30):
            for n, (name, log) in enumerate(logs.items()):
                count = (i + n) % 3 + 1
                first = len(expected[name])
                expected[name] += self.add(log, name, first, count, NOW + i)
        for name, log in logs.items():
            self.check(log, expected[name])
            self.assertTrue(all(decode(f).topic == name for _, f in expected[name]))

    # -- gaps ------------------------------------------------------------------

    def test_gap(self):
        """
        A run whose offsets jump (a failed append's, a damaged range): a read
        stops at the gap, and a read from inside it goes on at the next run.
        """
        log = self.make_log("t")
        before = self.add(log, "t", 0, 3)
        after = self.add(log, "t", 10, 2)
        self.assertEqual(self.read_run(log, 0, 100), (0, [f for _, f in before]))
        for offset in (3, 5, 9, 10):
            self.assertEqual(self.read_run(log, offset, 100), (10, [f for _, f in after]))
        self.assertEqual(self.read_run(log, 11, 100), (11, [after[1][1]]))
        self.assertEqual(self.read_run(log, 12, 100)[1], [])
        self.check(log, before + after)

    def test_many_gaps(self):
        log = self.make_log("t")
        expected: List[Entry] = []
        offset = 3  # a log that begins after a gap, too
        for run in range(25):
            count = run % 4 + 1
            expected += self.add(log, "t", offset, count, NOW + run)
            offset += count + (run % 3) * 5  # no gap, a gap of 5, a gap of 10
        self.check(log, expected, limits=(1, 2, 1000))
        # A read from every offset (gaps included) begins at the next retained one.
        offsets = [o for o, _ in expected]
        for wanted in range(0, offset + 2):
            first, frames = self.read(log, wanted, 1)
            later = [o for o in offsets if o >= wanted]
            if later:
                self.assertEqual((first, decode(frames[0]).offset), (later[0], later[0]))
            else:
                self.assertEqual(frames, [])

    # -- retention ---------------------------------------------------------------

    def test_expire_by_timestamp(self):
        log = self.make_log("t")
        expected: List[Entry] = []
        for i in range(10):
            # Two messages a millisecond apart, then two at the same time.
            expected += self.add(log, "t", i * 2, 2, NOW + i * 10)
        self.assertEqual(log.expire(NOW - 1), 0)
        self.check(log, expected)
        self.assertEqual(log.expire(NOW + 20), 6)  # at or before the cutoff: 3 pairs
        expected = expected[6:]
        self.check(log, expected)
        self.assertEqual(self.read_run(log, 0, 2), (6, [f for _, f in expected[:2]]))
        self.assertEqual(log.expire(NOW + 20), 0)  # again: nothing more
        self.assertEqual(log.expire(NOW + 29), 0)  # just before the next pair
        self.assertEqual(log.expire(NOW + 30), 2)
        self.check(log, expected[2:])

    def test_expire_everything_then_append(self):
        log = self.make_log("t")
        self.add(log, "t", 0, 5, NOW)
        self.add(log, "t", 5, 5, NOW + 1)
        self.assertEqual(log.expire(NOW + 1), 10)
        self.check(log, [])
        first, frames = self.read(log, 0, 10)
        self.assertEqual(frames, [])
        expected = self.add(log, "t", 10, 3, NOW + 2)
        self.check(log, expected)
        self.assertEqual(self.read_run(log, 0, 10)[0], 10)

    def test_expire_across_a_gap(self):
        log = self.make_log("t")
        a = self.add(log, "t", 0, 4, NOW)
        b = self.add(log, "t", 20, 4, NOW + 5)
        c = self.add(log, "t", 40, 4, NOW + 10)
        self.assertEqual(log.expire(NOW), 4)
        self.check(log, b + c)
        self.assertEqual(self.read_run(log, 0, 100), (20, [f for _, f in b]))
        self.assertEqual(log.expire(NOW + 7), 4)
        self.check(log, c)
        del a

    def test_trim(self):
        log = self.make_log("t")
        expected: List[Entry] = []
        for i in range(12):
            expected += self.add(log, "t", i * 3, 3, NOW + i)
        total = log.nbytes
        for max_bytes in (total, total - 1, total // 2, total // 3 + 7, 200, 1):
            # The oldest go, as few as will make it fit.
            keep = len(expected)
            while sum(len(f) for _, f in expected[len(expected) - keep:]) > max_bytes:
                keep -= 1
            should_drop = len(expected) - keep
            self.assertEqual(log.trim(max_bytes), should_drop, f"trim({max_bytes})")
            expected = expected[should_drop:]
            self.check(log, expected)
            self.assertLessEqual(log.nbytes, max_bytes)
        self.assertEqual(log.trim(0), len(expected))
        self.check(log, [])

    def test_trim_across_a_gap(self):
        log = self.make_log("t")
        a = self.add(log, "t", 0, 3)
        b = self.add(log, "t", 10, 3)
        size = sum(len(f) for _, f in b) + len(a[2][1])
        self.assertEqual(log.trim(size), 2)
        self.check(log, a[2:] + b)
        self.assertEqual(log.trim(size - 1), 1)
        self.check(log, b)

    def test_a_log_that_retains_nothing(self):
        log = self.make_log("live", retention=0)
        for i in range(3):
            self.add(log, "live", i * 2, 2, NOW + i)
        self.assertEqual((len(log), log.nbytes, log.first_offset()), (0, 0, None))
        for offset in (0, 3, 6, 100):
            self.assertEqual(self.read_run(log, offset, 10)[1], [])
        self.assertEqual(log.expire(NOW + 100), 0)
        self.assertEqual(log.trim(0), 0)

    def test_a_log_that_retains_nothing_keeps_its_next_offset(self):
        log = self.make_log("live", retention=0)
        for i in range(3):
            self.add(log, "live", i * 2, 2, NOW + i)
        states = self.reopen()
        self.assertEqual(states["live"].next_offset, 6)
        self.assertEqual(states["live"].last_timestamp, NOW + 2)
        log = self.make_log("live", retention=0)
        self.assertEqual((len(log), log.nbytes, log.first_offset()), (0, 0, None))
        self.assertEqual(self.read_run(log, 0, 10)[1], [])
        self.add(log, "live", 6, 1, NOW + 3)
        self.assertEqual(self.reopen()["live"].next_offset, 7)

    # -- commits ---------------------------------------------------------------

    def test_record_commit(self):
        d = self.storage.record_commit("worker", "t", 3)
        self.storage.sync()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.storage.commits(), {"worker": {"t": 3}})
        for client, topic, offset in [("worker", "t", 7), ("worker", "u/v", 0), ("other", "t", 1)]:
            d = self.storage.record_commit(client, topic, offset)
            self.storage.sync()
            self.successResultOf(d)
        self.assertEqual(self.storage.commits(), {"worker": {"t": 7, "u/v": 0}, "other": {"t": 1}})

    def test_commits_survive_a_restart(self):
        for client, topic, offset in [("worker", "t", 3), ("worker", "t", 7), ("other", "u", 1)]:
            d = self.storage.record_commit(client, topic, offset)
            self.storage.sync()
            self.successResultOf(d)
        self.reopen()
        self.assertEqual(self.storage.commits(), {"worker": {"t": 7}, "other": {"u": 1}})

    # -- consumer groups' positions (protocol 1.1) ----------------------------------

    def record_group(self, topic: str, group: str, offset: int) -> None:
        d = self.storage.record_group_position(topic, group, offset)
        self.storage.sync()
        self.assertIsNone(self.successResultOf(d))

    def test_record_group_position(self):
        self.assertEqual(self.storage.group_positions(), {})
        for topic, group, offset in [("jobs", "w", 0), ("jobs", "w", 4), ("jobs", "x", 1), ("u/v", "w", 9)]:
            self.record_group(topic, group, offset)
        self.assertEqual(self.storage.group_positions(), {"jobs": {"w": 4, "x": 1}, "u/v": {"w": 9}})
        self.assertEqual(self.storage.commits(), {})  # apart from the clients' commits

    def test_group_positions_survive_a_restart_apart_from_commits(self):
        # A client_id may be any string, "group" included: it never names a group's position.
        for client_id in ("group", "jobs", "group:w"):
            d = self.storage.record_commit(client_id, "jobs", 2)
            self.storage.sync()
            self.successResultOf(d)
        self.record_group("jobs", "w", 3)
        self.record_group("jobs", "w", 5)
        self.record_group("group", "jobs", 7)
        self.reopen()
        self.assertEqual(self.storage.group_positions(), {"jobs": {"w": 5}, "group": {"jobs": 7}})
        self.assertEqual(self.storage.commits(), {"group": {"jobs": 2}, "jobs": {"jobs": 2}, "group:w": {"jobs": 2}})
        self.storage.forget_client("group")
        self.storage.sync()
        self.reopen()
        self.assertEqual(self.storage.group_positions(), {"jobs": {"w": 5}, "group": {"jobs": 7}})
        self.assertNotIn("group", self.storage.commits())

    # -- open and close ------------------------------------------------------------

    def test_open_reports_the_topics(self):
        keyed = self.make_log("keyed", HOUR, 60_000)
        stamps = [NOW - 120_000, NOW - 60_000, NOW - 59_999, NOW - 10, NOW - 5]
        keys = [b"a", b"b", b"c", None, b"a"]
        for offset, (ts, key) in enumerate(zip(stamps, keys)):
            self.append(keyed, offset, [make_frame("keyed", offset, ts, key)])
        plain = self.make_log("plain/1", 2 * HOUR, 0)
        self.add(plain, "plain/1", 0, 4, NOW - 3, keys=[b"a", b"b", None, b"d"])
        live = self.make_log("live", 0, 60_000)
        self.add(live, "live", 0, 2, NOW - 1, keys=[b"x", b"y"])
        empty = self.make_log("empty", HOUR, 1000)
        del empty
        states = self.reopen()
        self.assertEqual(sorted(states), ["empty", "keyed", "live", "plain/1"])
        got = {name: (s.retention_ttl, s.compaction_window, s.next_offset, s.last_timestamp, s.keys)
               for name, s in states.items()}
        self.assertEqual(got, {
            # Inside the window: NOW - ts < 60 s (the topic's own test for a duplicate).
            "keyed": (HOUR, 60_000, 5, NOW - 5, [(b"c", NOW - 59_999, 2), (b"a", NOW - 5, 4)]),
            "plain/1": (2 * HOUR, 0, 4, NOW - 3, []),
            "live": (0, 60_000, 2, NOW - 1, [(b"x", NOW - 1, 0), (b"y", NOW - 1, 1)]),
            "empty": (HOUR, 1000, 0, 0, []),
        })

    def test_close_then_reopen_gives_the_same_reads(self):
        log = self.make_log("t")
        expected: List[Entry] = []
        offset = 0
        for run in range(30):
            count = run % 4 + 1
            expected += self.add(log, "t", offset, count, NOW + run)
            offset += count + (5 if run % 7 == 6 else 0)
        other = self.make_log("u")
        others = self.add(other, "u", 0, 7)
        before = {start: self.read_all(log, start, limit)
                  for start in (0, 1, 17, 40, offset - 3, offset) for limit in (1, 4, 1000)}
        self.check(log, expected)
        states = self.reopen()
        self.assertEqual((states["t"].next_offset, states["u"].next_offset), (expected[-1][0] + 1, 7))
        log = self.make_log("t")
        self.check(log, expected)
        self.check(self.make_log("u"), others)
        after = {start: self.read_all(log, start, limit)
                 for start in (0, 1, 17, 40, offset - 3, offset) for limit in (1, 4, 1000)}
        self.assertEqual(after, before)
        self.assertEqual(self.storage.damaged, 0)

    def test_appends_go_on_after_a_restart(self):
        log = self.make_log("t")
        expected = self.add(log, "t", 0, 5)
        self.assertEqual(self.reopen()["t"].next_offset, 5)
        log = self.make_log("t")
        expected += self.add(log, "t", 5, 5, NOW + 1)
        self.check(log, expected)
        self.assertEqual(self.reopen()["t"].next_offset, 10)
        self.check(self.make_log("t"), expected)

    def test_gaps_survive_a_restart(self):
        log = self.make_log("t")
        expected = self.add(log, "t", 2, 3) + self.add(log, "t", 9, 2) + self.add(log, "t", 30, 1)
        self.assertEqual(self.reopen()["t"].next_offset, 31)
        log = self.make_log("t")
        self.check(log, expected)
        self.assertEqual(self.read_run(log, 5, 10), (9, [f for _, f in expected[3:5]]))
        self.assertEqual(self.read_run(log, 11, 10), (30, [expected[5][1]]))

    def test_expiry_and_trimming_hold_after_a_restart(self):
        """What retention dropped stays dropped once the same cutoff is applied again (as the service does)."""
        log = self.make_log("t")
        expected: List[Entry] = []
        for i in range(20):
            expected += self.add(log, "t", i * 2, 2, NOW + i)
        self.assertEqual(log.expire(NOW + 4), 10)
        expected = expected[10:]
        self.check(log, expected)
        self.reopen()
        log = self.make_log("t")
        log.expire(NOW + 4)
        self.check(log, expected)
        bound = sum(len(f) for _, f in expected[-7:])
        self.assertEqual(log.trim(bound), len(expected) - 7)
        expected = expected[-7:]
        self.reopen()
        log = self.make_log("t")
        log.expire(NOW + 4)
        log.trim(bound)
        self.check(log, expected)

    def test_expired_everything_keeps_the_next_offset(self):
        log = self.make_log("t")
        self.add(log, "t", 0, 6, NOW)
        self.assertEqual(log.expire(NOW), 6)
        self.assertEqual(self.reopen()["t"].next_offset, 6)


# -- the backends -------------------------------------------------------------------


class MemoryContractTests(StorageContract, SynchronousTestCase):
    persistent = False

    def new_storage(self):
        return MemoryStorage()


class DiskContract(StorageContract):
    """The disk backend in a temporary data dir, with a Clock and fsyncs run at once."""

    options: dict = {}

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zaichik-contract-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        super().setUp()

    def new_storage(self):
        options = dict(fsync="never")
        options.update(self.options)
        return DiskStorage(self.dir, clock=self.clock, run_blocking=run_now, **options)


class DiskFsyncNeverContractTests(DiskContract, SynchronousTestCase):
    options = dict(fsync="never")


class DiskFsyncAlwaysContractTests(DiskContract, SynchronousTestCase):
    """Appends fire once the unit of work's fsync is done (here at once, at the sync)."""

    options = dict(fsync="always")
    fires_before_sync = False


class DiskSmallSegmentsContractTests(DiskContract, SynchronousTestCase):
    """Segments of ~600 bytes: every test's runs cross segment boundaries."""

    options = dict(fsync="never", segment_bytes=600)

    def test_runs_cross_segments(self):
        log = self.make_log("t")
        expected = self.add(log, "t", 0, 3)
        for i in range(30):
            expected += self.add(log, "t", 3 + i, 1, NOW + i)
        self.assertGreaterEqual(len(log.segments), 4)
        self.check(log, expected)
        self.reopen()
        self.check(self.make_log("t"), expected)


class DiskWriterThreadContractTests(DiskContract, SynchronousTestCase):
    """
    --fsync never with appends written by the writer thread: each fires
    once written and booked (here when the unit of work ends).
    """

    options = dict(fsync="never")
    fires_before_sync = False

    def new_storage(self):
        from tests.test_disk import WaitingDiskStorage

        return WaitingDiskStorage(self.dir, clock=self.clock, run_blocking=run_now, **self.options)


class DiskWriterThreadSmallSegmentsContractTests(DiskWriterThreadContractTests):
    """The same with segments of ~600 bytes: rolls while writes are queued."""

    options = dict(fsync="interval", segment_bytes=600)
    test_runs_cross_segments = DiskSmallSegmentsContractTests.test_runs_cross_segments


class DiskSmallCacheContractTests(DiskContract, SynchronousTestCase):
    """A cache of 500 bytes for all topics: reads come from the segments."""

    options = dict(fsync="never", cache_size=500)

    def test_reads_come_from_disk(self):
        log = self.make_log("t")
        expected = self.add(log, "t", 0, 40)
        cached = log.cache.first_offset()
        self.assertTrue(cached is None or cached > 0, "everything is still cached")
        self.check(log, expected)
