"""
A data dir written by release 0.1.0 (tests/fixtures/datadir-0.1.0, made by
tests/fixtures/make_datadir_0_1_0.py) is upgraded at start, never misread;
a data dir of a newer format is refused.

The fixture holds, at 1_700_000_000 s (message i at + i ms):

  - "retained" (retention ten years): "message 0" .. "message 9" at offsets 0..9;
  - "keyed/a.b-c_d" (retention and compaction window ten years): keys k0, k1,
    k2 stored at offsets 0, 1, 2 (values v0, v1, v2; the other seven were
    duplicates);
  - "plain" (retention 0): ten messages, none retained;
  - client "reader" committed offset 3 on "retained".

The fixture is copied to a temporary directory; it is never modified.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_disk import run_now
from zaichik import codec
from zaichik.codec import Start
from zaichik.service import BrokerService
from zaichik.session import Session
from zaichik.storage import disk
from zaichik.storage import segment as fmt
from zaichik.storage.disk import DataDirError, DiskStorage
from zaichik.testing import parse_frames

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "datadir-0.1.0")
T0 = 1_700_000_000
T0_MS = T0 * 1000
TEN_YEARS = 10 * 365 * 86400 * 1000


def tree(directory: str) -> Dict[str, bytes]:
    """Every file under C{directory} (but the lock), by relative path."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != "lock":
                with open(path, "rb") as f:
                    files[rel] = f.read()
    return files


class UpgradeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.assertTrue(os.path.isdir(FIXTURE), FIXTURE)
        self.fixture = tree(FIXTURE)
        work = tempfile.mkdtemp(prefix="zaichik-upgrade-")
        self.addCleanup(shutil.rmtree, work, True)
        self.dir = os.path.join(work, "data")
        shutil.copytree(FIXTURE, self.dir)
        self.clock = Clock()
        self.clock.advance(T0 + 5)
        self.service = None
        self.addCleanup(self.stop)
        self.addCleanup(self.assert_fixture_untouched)

    def assert_fixture_untouched(self) -> None:
        self.assertEqual(tree(FIXTURE), self.fixture)

    def start(self) -> BrokerService:
        self.stop()
        self.storage = DiskStorage(self.dir, fsync="always", clock=self.clock, run_blocking=run_now)
        self.service = BrokerService(storage=self.storage, clock=self.clock)
        self.service.startService()
        self.successResultOf(self.service.ready)
        return self.service

    def stop(self) -> None:
        if self.service is not None and self.service.running:
            self.successResultOf(self.service.stopService())
        self.service = None

    def session(self, client_id: str = ""):
        replies: list = []
        written: list = []
        session = Session(self.service, replies.append, written.append, lambda: None)
        if client_id:
            session.handle(codec.Hello(1, client_id))
            self.assertEqual(replies, [codec.Ok(1)])
        return session, replies, written

    def messages(self, name: str, start: Start = Start.EARLIEST, client_id: str = "") -> List[codec.Message]:
        session, replies, written = self.session(client_id)
        session.handle(codec.Subscribe(2, name, start))
        self.assertEqual(replies[-1], codec.Ok(2))
        return [m for m in parse_frames(b"".join(written)) if type(m) is codec.Message]

    def segments(self) -> List[str]:
        paths = []
        for root, _, names in os.walk(os.path.join(self.dir, "topics")):
            paths += [os.path.join(root, n) for n in names if n.endswith(".seg")]
        return sorted(paths)

    # -- what must be read back ----------------------------------------------------------------

    def check_contents(self) -> None:
        """Everything 0.1.0 stored, read by this release (read only: no publish)."""
        service = self.service
        self.assertEqual(sorted(service.topics), ["keyed/a.b-c_d", "plain", "retained"])
        settings = {name: (t.retention_ttl, t.compaction_window, t.next_offset)
                    for name, t in service.topics.items()}
        self.assertEqual(settings, {
            "retained": (TEN_YEARS, 0, 10),
            "keyed/a.b-c_d": (TEN_YEARS, TEN_YEARS, 3),
            "plain": (0, 0, 10),
        })
        self.assertEqual([(m.topic, m.offset, m.timestamp, m.key, m.value) for m in self.messages("retained")],
                         [("retained", i, T0_MS + i, None, b"message %d" % i) for i in range(10)])
        self.assertEqual([(m.offset, m.timestamp, m.key, m.value) for m in self.messages("keyed/a.b-c_d")],
                         [(i, T0_MS + i, b"k%d" % i, b"v%d" % i) for i in range(3)])
        self.assertEqual(self.messages("plain"), [])
        # The durable reader resumes after its commit.
        self.assertEqual([m.offset for m in self.messages("retained", Start.DEFAULT, "reader")],
                         [4, 5, 6, 7, 8, 9])
        self.assertEqual(service.durable_positions(), {"reader": {"retained": 3}})
        self.assertEqual((self.storage.damaged, self.storage.torn), (0, 0))

    def check_format(self) -> None:
        with open(os.path.join(self.dir, "FORMAT"), encoding="ascii") as f:
            self.assertEqual(f.read().strip(), "2")
        segments = self.segments()
        self.assertEqual(len(segments), 3)
        for path in segments:
            with open(path, "rb") as f:
                data = f.read()
            self.assertTrue(data.startswith(b"ZKSG"), path)
            magic, version, _, base = fmt.segment_header.unpack_from(data)
            self.assertEqual((version, base), (fmt.FORMAT, 0))
            scanned = fmt.scan(data, base)
            self.assertEqual((scanned.damage, scanned.torn), ([], None), path)
        self.assertFalse([n for n in tree(self.dir) if n.endswith(".upgrade") or n.endswith(".tmp")])

    # -- the tests -----------------------------------------------------------------------------

    def test_fixture_is_release_0_1_0s(self):
        """(What the other tests rely on: the copy is in the old format.)"""
        self.assertNotIn("FORMAT", self.fixture)
        segments = [p for p in self.fixture if p.endswith(".seg")]
        self.assertEqual(len(segments), 3)
        self.assertFalse(any(self.fixture[p].startswith(b"ZKSG") for p in segments))

    def test_upgrade(self):
        self.start()
        self.check_contents()
        self.check_format()
        self.stop()
        self.check_format()
        upgraded = {p: d for p, d in tree(self.dir).items() if p.endswith(".seg")}
        # A second start (already upgraded): the same, and nothing rewritten.
        self.start()
        self.check_contents()
        self.stop()
        self.assertEqual({p: d for p, d in tree(self.dir).items() if p.endswith(".seg")}, upgraded)

    def test_publishing_after_the_upgrade(self):
        for attempt in range(2):
            service = self.start()
            session, replies, _ = self.session()
            session.handle(codec.Publish(10, "keyed/a.b-c_d", b"again", b"k1"))  # inside the window
            session.handle(codec.Publish(11, "retained", b"message %d" % (10 + attempt)))
            session.handle(codec.Publish(12, "plain", b"live"))
            self.assertEqual(replies, [codec.Published(10, 1, True), codec.Published(11, 10 + attempt),
                                       codec.Published(12, 10 + attempt)])
            self.assertEqual(service.topics["keyed/a.b-c_d"].next_offset, 3)
        self.stop()
        self.start()
        self.assertEqual([m.value for m in self.messages("retained")],
                         [b"message %d" % i for i in range(12)])
        session, replies, _ = self.session()
        session.handle(codec.Publish(13, "keyed/a.b-c_d", b"new key", b"k3"))
        self.assertEqual(replies, [codec.Published(13, 3)])

    def test_compaction_window_after_the_upgrade(self):
        """
        The keys come back with their timestamps: a window (ten years) after
        k0 and k1 were stored they are stored again, while k2, stored 2 ms
        after k0, is still a duplicate.
        """
        self.clock = Clock()
        self.clock.advance(T0 + TEN_YEARS / 1000 + 0.001)  # k0 (T0) and k1 (T0 + 1 ms) just outside
        self.start()
        session, replies, _ = self.session()
        for rid, key in enumerate([b"k2", b"k0", b"k1", b"k0"], 10):
            session.handle(codec.Publish(rid, "keyed/a.b-c_d", b"again", key))
        self.assertEqual(replies, [codec.Published(10, 2, True), codec.Published(11, 3),
                                   codec.Published(12, 4), codec.Published(13, 3, True)])

    def write_format(self, text: str) -> Dict[str, bytes]:
        with open(os.path.join(self.dir, "FORMAT"), "w", encoding="ascii") as f:
            f.write(text)
        return tree(self.dir)

    def test_newer_format_is_refused(self):
        before = self.write_format("3\n")
        storage = DiskStorage(self.dir, fsync="always", clock=self.clock, run_blocking=run_now)
        failure = self.failureResultOf(storage.open(), DataDirError)
        self.assertIn("format 3", str(failure.value))
        self.assertEqual(tree(self.dir), before)  # nothing upgraded, nothing written

    def test_newer_format_is_refused_by_the_service(self):
        before = self.write_format("3\n")
        self.service = BrokerService(storage=DiskStorage(self.dir, clock=self.clock, run_blocking=run_now),
                                     clock=self.clock)
        from twisted.logger import LogLevel, formatEvent, globalLogPublisher

        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.service.startService()
        self.failureResultOf(self.service.ready, DataDirError)
        # Nothing else waits on ready here: the service says why, in one line (no traceback).
        said = [e for e in events if e.get("log_namespace") == "zaichik.service"
                and e.get("log_level") == LogLevel.critical]
        self.assertEqual(len(said), 1, events)
        self.assertIn("format 3", formatEvent(said[0]))
        self.assertNotIn("log_failure", said[0])
        self.assertEqual(self.service.topics, {})
        self.assertEqual(tree(self.dir), before)

    def test_refused_open_releases_the_data_dir(self):
        """A storage whose open() failed holds nothing: the data dir is not left locked."""
        self.write_format("3\n")
        storage = DiskStorage(self.dir, clock=self.clock, run_blocking=run_now)
        self.failureResultOf(storage.open(), DataDirError)
        disk.check_not_locked(self.dir)
        again = DiskStorage(self.dir, clock=self.clock, run_blocking=run_now)
        self.failureResultOf(again.open(), DataDirError)  # (not DataDirLocked)

    def test_unreadable_format_is_refused(self):
        self.write_format("two\n")
        storage = DiskStorage(self.dir, clock=self.clock, run_blocking=run_now)
        self.failureResultOf(storage.open(), DataDirError)
