"""
C{zaichik check DATA_DIR}: data dirs made by the real broker in-process
(as in tests/test_disk.py), then damaged by hand; the report is checked by
calling L{zaichik.storage.check.check} and by running the command.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from zaichik import cli, codec
from zaichik.codec import Start
from zaichik.session import Session
from zaichik.storage import check
from zaichik.storage import disk
from zaichik.storage import segment as fmt
from zaichik.storage.disk import DiskStorage
from tests.test_disk import DiskTestCase
from zaichik.testing import ROOT, parse_frames

T0 = 1_700_000_000
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "datadir-0.1.0")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
HOUR = 3_600_000


def run_now(f, *args):
    """Blocking work (the fsyncs) run at once, so tests stay deterministic."""
    return maybeDeferred(f, *args)


def snapshot(directory: str) -> dict:
    """Every file and directory under C{directory}: size, mtime and (for files) a hash of the contents."""
    found = {}
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            digest = None
            if name in files:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return found


def kinds(findings, severity=None) -> list:
    return [f.kind for f in findings if severity is None or f.severity == severity]


class CheckTestCase(DiskTestCase):
    """A data dir in a temp dir, written by a broker started and stopped (or crashed) in-process."""

    def served(self, name: str) -> list:
        """The offsets a subscriber from the earliest gets from the running broker."""
        written = []
        session = Session(self.service, lambda reply: None, written.append, lambda: None)
        session.handle(codec.Subscribe(2, name, Start.EARLIEST))
        return [m.offset for m in parse_frames(b"".join(written)) if type(m) is codec.Message]

    # -- the files ---------------------------------------------------------------------

    def topic_dir(self, name: str) -> str:
        return os.path.join(self.dir, "topics", name.encode().hex())

    def segments(self, name: str = "t") -> list:
        directory = self.topic_dir(name)
        return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".seg"))

    def batches(self, path: str) -> list:
        with open(path, "rb") as f:
            result = fmt.scan(f.read(), int(os.path.basename(path)[:-4]))
        self.assertEqual((result.damage, result.torn), ([], None))
        return [b for b in result.batches if not b.is_reservation]

    def flip(self, path: str, at: int) -> None:
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))

    def write(self, relpath: str, data: bytes, mode: str = "wb") -> None:
        with open(os.path.join(self.dir, relpath), mode) as f:
            f.write(data)

    def several_segments(self, messages: int = 60, per_batch: int = 1, stop: bool = True) -> int:
        """Topic "t" over several 2000-byte segments; returns the next offset."""
        service = self.start(segment_bytes=2_000)
        topic = service.create_topic("t", HOUR, 0)
        for i in range(0, messages, per_batch):
            topic.publish_many([(None, b"message %04d " % (i + j) + b"x" * 60) for j in range(per_batch)])
        self.assertGreater(len(self.segments()), 1)
        if stop:
            self.stop()
        else:
            self.crash()
        return messages

    # -- checking ------------------------------------------------------------------------

    def check(self, directory: str = None) -> check.Report:
        return check.check(directory or self.dir)

    def cli(self, *args: str, directory: str = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zaichik.cli", "check", *args, directory or self.dir],
                              capture_output=True, text=True, timeout=60, env=ENV)

    def segment_report(self, report: check.Report, path: str, topic: str = "t") -> check.SegmentReport:
        (t,) = [t for t in report.topics if t.name == topic]
        (s,) = [s for s in t.segments if s.path == os.path.relpath(path, self.dir)]
        return s


class CleanTests(CheckTestCase):
    def test_clean_stop_reports_nothing(self):
        self.several_segments(60, per_batch=3)
        report = self.check()
        self.assertEqual(list(report.all_findings()), [])
        self.assertEqual((report.exit_code, report.status), (0, "ok"))
        (topic,) = report.topics
        self.assertEqual((topic.name, topic.messages, topic.next_offset), ("t", 60, 60))
        # The segments follow each other: each starts where the previous ended.
        ranges = [(s.first_offset, s.last_offset, s.end_offset) for s in topic.segments]
        self.assertEqual(ranges[0][0], 0)
        for (_, last, end), (first, _, _) in zip(ranges, ranges[1:]):
            self.assertEqual((last + 1, end), (first, first))
        self.assertEqual([s.bytes for s in topic.segments], [os.path.getsize(p) for p in self.segments()])
        summary = report.summary
        self.assertEqual((summary["topics"], summary["segments"], summary["messages"], summary["damaged_ranges"],
                          summary["torn_tails"]), (1, len(self.segments()), 60, 0, 0))

        done = self.cli()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, "")  # no progress bar: stderr is not a terminal
        self.assertIn('topic "t" (topics/74, retention 1h, compaction window 0)', done.stdout)
        first = topic.segments[0]
        self.assertIn(f"\n  00000000000000000000.seg: {first.messages} messages, offsets 0..{first.last_offset}, "
                      f"{first.bytes} bytes\n", done.stdout)
        self.assertTrue(done.stdout.endswith(
            f"summary: 1 topic, {len(self.segments())} segments, 60 messages ({check.human_bytes(summary['bytes'])}), "
            "0 damaged ranges, 0 torn tails: no damage (exit 0)\n"), done.stdout)

    def test_crash_without_torn_write_is_clean(self):
        """After kill -9 the newest segment has no index; that is not worth a word."""
        self.several_segments(40, stop=False)
        self.assertFalse(os.path.exists(self.segments()[-1][:-4] + ".idx"))
        report = self.check()
        self.assertEqual(list(report.all_findings()), [])
        self.assertEqual(report.topics[0].messages, 40)


class DamageTests(CheckTestCase):
    def test_flipped_byte_in_a_middle_segment(self):
        self.several_segments(60, per_batch=3)
        path = self.segments()[1]
        batches = self.batches(path)
        hit = batches[len(batches) // 2]
        self.flip(path, hit.pos + fmt.BATCH_HEADER + hit.record_bytes // 2)
        report = self.check()
        segment = self.segment_report(report, path)
        finding = segment.findings[0]
        self.assertEqual((finding.severity, finding.kind), ("damage", "damage"))
        self.assertEqual((finding.at, finding.length), (hit.pos, hit.end - hit.pos))
        self.assertEqual(finding.offsets, (hit.first, hit.first + 2))  # the batch's three messages
        self.assertEqual(segment.messages, sum(b.count for b in batches) - 3)
        # The segment's index was made before the damage: the broker trusts it.
        self.assertEqual(kinds(segment.findings, "note"), ["index"])
        self.assertEqual((report.exit_code, report.summary["damaged_ranges"], report.summary["offsets_lost"]),
                         (1, 1, 3))

        # The broker skips exactly those offsets.
        self.start(segment_bytes=2_000)
        lost = set(range(hit.first, hit.first + 3))
        self.assertEqual(self.served("t"), [o for o in range(60) if o not in lost])
        self.stop()

        done = self.cli()
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"DAMAGE: damaged: bytes {hit.pos} to {hit.end - 1} ({hit.end - hit.pos} bytes) hold no valid "
                      f"batch; offsets {hit.first} to {hit.first + 2} are lost (3 offsets)", done.stdout)
        self.assertIn("1 damaged range (3 offsets lost), 0 torn tails: DAMAGED (exit 1)", done.stdout)

    def test_flipped_byte_in_the_newest_segment(self):
        self.several_segments(60, stop=False)
        path = self.segments()[-1]
        batches = self.batches(path)
        self.assertGreater(len(batches), 2)
        hit = batches[1]
        self.flip(path, hit.pos + fmt.BATCH_HEADER + 10)
        report = self.check()
        finding = self.segment_report(report, path).findings[0]
        self.assertEqual((finding.kind, finding.offsets, finding.at), ("damage", (hit.first, hit.first), hit.pos))
        self.assertEqual(report.exit_code, 1)
        # Not closed cleanly: the broker goes on from its reservation, which the report predicts.
        self.assertGreaterEqual(report.topics[0].next_offset, 60)
        service = self.start(segment_bytes=2_000)
        self.assertEqual(service.topics["t"].next_offset, report.topics[0].next_offset)
        served = self.served("t")
        self.assertNotIn(hit.first, served)
        self.assertEqual(served[-1], 59)  # nothing after the damage is lost

    def test_flipped_byte_in_the_last_batch_of_the_newest_segment(self):
        """A whole batch whose CRC fails is damage, though the broker takes it for a torn write."""
        self.several_segments(60, stop=False)
        path = self.segments()[-1]
        last = self.batches(path)[-1]
        self.flip(path, last.end - 5)
        report = self.check()
        (finding,) = self.segment_report(report, path).findings
        self.assertEqual((finding.severity, finding.kind, finding.at, finding.length),
                         ("damage", "bad-last-batch", last.pos, last.end - last.pos))
        self.assertEqual(report.exit_code, 1)
        service = self.start(segment_bytes=2_000)
        # What the report said the broker goes on from (after a crash: the reservation, beyond the batch).
        self.assertEqual(service.topics["t"].next_offset, report.topics[0].next_offset)
        self.assertGreater(report.topics[0].next_offset, finding.offsets[1])
        self.assertEqual(self.served("t"), list(range(59)))

    def test_truncated_newest_segment_is_a_torn_tail(self):
        self.several_segments(60, stop=False)
        path = self.segments()[-1]
        last = self.batches(path)[-1]
        with open(path, "r+b") as f:
            f.truncate(last.end - 11)  # a crash in the middle of the last write
        report = self.check()
        (finding,) = self.segment_report(report, path).findings
        kept = last.end - 11 - last.pos
        self.assertEqual((finding.severity, finding.kind, finding.at, finding.length),
                         ("warning", "torn-tail", last.pos, kept))
        self.assertEqual(finding.offsets[0], 59)
        self.assertEqual((report.exit_code, report.status, report.summary["torn_tails"]), (0, "warnings", 1))
        self.assertGreater(report.topics[0].next_offset, finding.offsets[1])  # (the reservation, after a crash)

        done = self.cli()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"warning: torn tail: the last {kept} bytes (from byte {last.pos}) are not a whole batch, which "
                      f"is what a crash leaves", done.stdout)
        self.assertIn(f"uses up offsets 59 to {finding.offsets[1]} so that none is given twice", done.stdout)
        self.assertIn("1 torn tail: no damage; warnings above (exit 0)", done.stdout)

        # The broker uses up what the report said, and writes a gap marker after
        # the tail; checked again, that is an old torn tail, still not damage.
        service = self.start(segment_bytes=2_000)
        self.assertEqual(service.topics["t"].next_offset, report.topics[0].next_offset)
        self.assertEqual(self.storage.torn, 1)
        service.topics["t"].publish(None, b"after")
        self.stop()
        report = self.check()
        (finding2,) = self.segment_report(report, path).findings
        self.assertEqual((finding2.severity, finding2.kind, finding2.at, finding2.length, finding2.offsets),
                         ("warning", "old-torn-tail", last.pos, kept, finding.offsets))
        self.assertEqual((report.exit_code, report.topics[0].messages), (0, 60))

    def test_bad_tail_of_a_segment_that_is_not_the_newest(self):
        self.several_segments(60)
        path, following = self.segments()[1:3]
        batches = self.batches(path)
        self.flip(path, batches[-1].end - 1)
        report = self.check()
        segment = self.segment_report(report, path)
        finding = segment.findings[0]
        next_base = int(os.path.basename(following)[:-4])
        self.assertEqual((finding.kind, finding.at, finding.offsets),
                         ("bad-tail", batches[-1].pos, (batches[-1].first, next_base - 1)))
        self.assertEqual(segment.end_offset, batches[-1].first)
        self.assertEqual(report.exit_code, 1)
        # No gap reported on top of it: those offsets are already said lost.
        self.assertNotIn("gap", kinds(report.all_findings()))

    def test_damaged_segment_header(self):
        self.several_segments(60)
        first, second = self.segments()[:2]
        self.flip(first, 1)  # the magic
        self.flip(second, 15)  # the base offset
        report = self.check()
        one, two = self.segment_report(report, first), self.segment_report(report, second)
        self.assertEqual((one.format, one.messages), (2, len(self.batches_of(first))))
        self.assertEqual(kinds(one.findings), ["header"])
        self.assertIn("damaged segment header: magic b'Z\\xb4SG' (not b'ZKSG'); the batches after it are read "
                      f"anyway ({one.messages} messages)", one.findings[0].message)
        self.assertNotIn("restore", one.findings[0].message)
        self.assertEqual(kinds(two.findings), ["header"])
        self.assertIn(f"(the file name says {two.base})", two.findings[0].message)
        self.assertEqual((report.exit_code, report.summary["damaged_ranges"], report.summary["offsets_lost"]),
                         (1, 2, 0))
        # Nothing of it is lost: the broker reads past a damaged header.
        self.start(segment_bytes=2_000)
        self.assertEqual(self.served("t"), list(range(60)))

    def test_damaged_magic_without_format_file(self):
        """Without FORMAT the broker upgrades what lacks the magic: the report says to restore it first."""
        self.several_segments(60)
        first = self.segments()[0]
        self.flip(first, 0)
        os.unlink(os.path.join(self.dir, "FORMAT"))
        report = self.check()
        segment = self.segment_report(report, first)
        self.assertEqual((segment.format, kinds(segment.findings)), (2, ["header"]))
        self.assertIn("restore the first 4 bytes to 'ZKSG' before starting the broker", segment.findings[0].message)
        self.assertEqual(report.exit_code, 1)

    def batches_of(self, path: str) -> list:
        with open(path, "rb") as f:
            return [b for b in fmt.scan(f.read(), int(os.path.basename(path)[:-4])).batches
                    if not b.is_reservation]

    def test_gap_between_segments_is_informational(self):
        self.several_segments(60)
        removed = self.segments()[2]
        after = self.segments()[3]
        end = self.batches(self.segments()[1])[-1]
        os.unlink(removed)
        os.unlink(removed[:-4] + ".idx")
        report = self.check()
        base = int(os.path.basename(after)[:-4])
        (finding,) = self.segment_report(report, after).findings
        self.assertEqual((finding.severity, finding.kind, finding.offsets),
                         ("note", "gap", (end.first + end.count, base - 1)))
        self.assertEqual(report.exit_code, 0)

    def test_broken_meta_json(self):
        self.several_segments(60)
        self.write("topics/74/meta.json", b'{"name": "t", "retent')
        report = self.check()
        (topic,) = report.topics
        self.assertIsNone(topic.name)
        self.assertEqual([(f.severity, f.kind) for f in topic.findings], [("damage", "meta"), ("note", "meta")])
        self.assertIn("the broker skips this topic", topic.findings[0].message)
        self.assertIn("the directory's name says the topic is 't'", topic.findings[1].message)
        self.assertEqual(topic.messages, 60)  # its segments are still checked
        self.assertEqual((report.exit_code, report.summary["other_problems"]), (1, 1))
        done = self.cli()
        self.assertEqual(done.returncode, 1)
        self.assertIn("topic (name unknown) (topics/74): ", done.stdout)

    def test_meta_json_without_its_settings(self):
        self.several_segments(20)
        self.write("topics/74/meta.json", b'{"name": "t"}')
        (topic,) = self.check().topics
        self.assertEqual(topic.name, "t")
        self.assertIn("meta.json has no valid retention_ttl, no valid compaction_window", topic.findings[0].message)

    def test_garbage_in_commits_log(self):
        service = self.start()
        service.create_topic("t", HOUR, 0).publish(None, b"x")
        self.stop()
        self.write("commits.log",
                   b'["reader", "t", 0]\ngarbage\nnull\n["a", "t", "x"]\n["r", "t", 0]\n["cut", "t', "ab")
        report = self.check()
        self.assertEqual(report.commit_lines, 6)
        self.assertEqual([(f.severity, f.kind, f.message.split(" (")[0]) for f in report.commit_findings], [
            ("damage", "commits", "line 2 is not a commit line"),
            ("damage", "commits", "line 3 is not a commit line"),
            ("damage", "commits", "line 4 is not a commit line"),
            ("warning", "commits-torn", "line 6, the last, is cut short"),
        ])
        self.assertIn("the broker skips it", report.commit_findings[1].message)  # null
        self.assertEqual((report.commit_findings[0].at, report.commit_findings[0].length), (19, 8))
        self.assertEqual((report.exit_code, report.summary["other_problems"]), (1, 3))

    def test_group_positions_in_commits_log(self):
        """A consumer group's position (protocol 1.1) is a commit line of its own shape; a malformed one is damage."""
        service = self.start()
        service.create_topic("t", HOUR, 0).publish(None, b"x")
        d = service.storage.record_group_position("t", "workers", 1)
        service.storage.sync()
        self.successResultOf(d)
        self.stop()
        self.assertEqual(kinds(self.check().all_findings()), [])
        self.write("commits.log", b'["group", "t", "w", -1, 0]\n["group", "t", 5, 1, 0]\n["r", "t", 0]\n', "ab")
        report = self.check()
        self.assertEqual([(f.kind, f.message.split(" (")[0]) for f in report.commit_findings], [
            ("commits", "line 2 is not a commit line"),
            ("commits", "line 3 is not a commit line"),
        ])

    def test_torn_last_commit_line_alone_is_a_warning(self):
        service = self.start()
        service.create_topic("t", HOUR, 0).publish(None, b"x")
        self.stop()
        self.write("commits.log", b'["reader", "t", 0]\n["reader", "t", 1', "ab")
        report = self.check()
        self.assertEqual(kinds(report.all_findings()), ["commits-torn"])
        self.assertEqual(report.exit_code, 0)


class FormatTests(CheckTestCase):
    def test_newer_format(self):
        self.several_segments(20)
        self.write("FORMAT", b"3\n")
        report = self.check()
        self.assertEqual((report.format, kinds(report.findings), report.topics), (3, ["format-newer"], []))
        self.assertEqual(report.exit_code, 1)
        self.assertIn("made by a newer release", report.findings[0].message)

    def test_format_not_a_number_and_missing(self):
        self.several_segments(20)
        self.write("FORMAT", b"two\n")
        self.assertEqual(kinds(self.check().findings, "damage"), ["format-invalid"])
        self.write("FORMAT", b"1\n")
        self.assertEqual(kinds(self.check().findings, "damage"), ["format-invalid"])
        storage = DiskStorage(self.dir, clock=self.clock, run_blocking=run_now)
        self.failureResultOf(storage.open(), disk.DataDirError)  # the broker refuses it too
        os.unlink(os.path.join(self.dir, "FORMAT"))
        report = self.check()
        self.assertEqual((kinds(report.findings), report.exit_code, report.topics[0].messages),
                         (["format-missing"], 0, 20))


class ReleaseZeroOneTests(CheckTestCase):
    def setUp(self) -> None:
        super().setUp()
        shutil.rmtree(self.dir)
        shutil.copytree(FIXTURE, self.dir)

    def test_fixture_reports_its_old_segments_and_exits_0(self):
        report = self.check()
        self.assertEqual([(t.name, [(s.format, s.messages, s.first_offset, s.last_offset) for s in t.segments])
                          for t in report.topics],
                         [("keyed/a.b-c_d", [(1, 3, 0, 2)]), ("plain", [(1, 10, 0, 9)]),
                          ("retained", [(1, 10, 0, 9)])])
        self.assertEqual(kinds(report.all_findings()), ["format-missing", "v1", "v1", "v1"])
        self.assertIn("will be upgraded when the broker starts", list(report.all_findings())[1].message)
        self.assertEqual((report.exit_code, report.status, report.commit_lines), (0, "warnings", 1))
        before = snapshot(self.dir)
        done = self.cli()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("00000000000000000000.seg (release 0.1.0's format): 10 messages, offsets 0..9", done.stdout)
        self.assertEqual(snapshot(self.dir), before)  # not upgraded, no FORMAT written

    def test_torn_old_segment(self):
        path = os.path.join(self.dir, "topics", b"retained".hex(), "00000000000000000000.seg")
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 5)
        report = self.check()
        (segment,) = report.topics[2].segments
        self.assertEqual((segment.messages, segment.last_offset), (9, 8))
        (torn,) = [f for f in segment.findings if f.kind == "v1-torn"]
        self.assertEqual((torn.severity, torn.at, torn.length), ("warning", size // 10 * 9, size // 10 - 5))
        self.assertEqual(report.exit_code, 0)


class SafetyTests(CheckTestCase):
    def test_never_modifies_the_data_dir(self):
        """Not even what the broker changes when it starts: torn tails, 0.1.0 segments, FORMAT, commits.log."""
        self.several_segments(60, stop=False)
        path = self.segments()[-1]
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 3)
        self.flip(self.segments()[1], 300)
        shutil.copytree(os.path.join(FIXTURE, "topics", b"plain".hex()),
                        os.path.join(self.dir, "topics", b"plain".hex()))
        os.unlink(os.path.join(self.dir, "FORMAT"))
        self.write("commits.log", b'["r", "t", 1]\n["r", "t", 2]\nbad\n', "ab")
        before = snapshot(self.dir)
        report = self.check()
        self.assertEqual(sorted(set(kinds(report.all_findings()))),
                         ["commits", "damage", "format-missing", "index", "torn-tail", "v1"])
        for args in ([], ["--json"], ["--quiet", "--progress"]):
            self.assertEqual(self.cli(*args).returncode, 1)
        self.assertEqual(snapshot(self.dir), before)

    def test_running_broker_keeps_its_lock(self):
        if not os.path.exists("/proc/locks"):
            self.skipTest("no /proc/locks")
        self.several_segments(20, stop=True)
        self.start(segment_bytes=2_000)
        report = self.check()
        self.assertEqual(kinds(report.findings), ["in-use"])
        self.assertIn(f"(pid {os.getpid()})", report.findings[0].message)
        self.assertRaises(disk.DataDirLocked, disk.check_not_locked, self.dir)  # still held by the broker
        self.assertEqual(report.exit_code, 0)

    def test_usage_errors(self):
        not_data = tempfile.mkdtemp(prefix="zaichik-check-")
        self.addCleanup(shutil.rmtree, not_data, True)
        a_file = os.path.join(not_data, "file")
        self.write(a_file, b"x")
        for path, why in ((not_data, "it has no topics/ folder"), (a_file, "is not a directory"),
                          (os.path.join(not_data, "nothing"), "is not a directory")):
            self.assertRaises(check.NotADataDir, check.check, path)
            done = self.cli(directory=path)
            self.assertEqual((done.returncode, done.stdout), (2, ""))
            self.assertTrue(done.stderr.startswith("zaichik: ") and why in done.stderr, done.stderr)
        done = subprocess.run([sys.executable, "-m", "zaichik.cli", "check", "--json", "--quiet", self.dir],
                              capture_output=True, text=True, timeout=60, env=ENV)
        self.assertEqual(done.returncode, 2)
        self.assertIn("not allowed with argument", done.stderr)


class OutputTests(CheckTestCase):
    def test_help_gives_the_exit_codes(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertRaises(SystemExit, cli.parser().parse_args, ["check", "--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn("usage: zaichik check [-h] [--json | --quiet] [--progress] DATA_DIR", text)
        self.assertIn("0 no damage. Torn tails (the end of a write a crash cut short) and segments of release 0.1.0 "
                      "(upgraded when the broker starts) are warnings: they still exit 0", text)
        self.assertIn("1 damage found", text)
        self.assertIn("2 usage error", text)
        self.assertEqual((cli.EXIT_DAMAGE, cli.EXIT_USAGE), (check.EXIT_DAMAGE, check.EXIT_USAGE))


    def damaged(self):
        """A data dir with one damaged range, a torn tail and a stale index."""
        self.several_segments(60, stop=False)
        middle = self.segments()[1]
        hit = self.batches(middle)[2]
        self.flip(middle, hit.pos + 50)
        newest = self.segments()[-1]
        with open(newest, "r+b") as f:
            f.truncate(os.path.getsize(newest) - 3)
        return hit

    def test_json(self):
        hit = self.damaged()
        done = self.cli("--json")
        self.assertEqual(done.returncode, 1)
        report = json.loads(done.stdout)
        self.assertEqual(sorted(report), ["commits", "data_dir", "exit_code", "findings", "format", "status",
                                          "summary", "topics"])
        self.assertEqual((report["status"], report["exit_code"], report["format"]), ("damaged", 1, 2))
        self.assertEqual({k: report["summary"][k] for k in ("topics", "messages", "damaged_ranges", "offsets_lost",
                                                             "torn_tails", "other_problems")},
                         {"topics": 1, "messages": 58, "damaged_ranges": 1, "offsets_lost": 1, "torn_tails": 1,
                          "other_problems": 0})
        (topic,) = report["topics"]
        self.assertEqual(sorted(topic), ["bytes", "findings", "messages", "name", "next_offset", "path", "segments",
                                         "settings"])
        self.assertEqual(topic["settings"], {"name": "t", "retention_ttl": HOUR, "compaction_window": 0})
        segment = topic["segments"][1]
        self.assertEqual(sorted(segment), ["base", "bytes", "end_offset", "findings", "first_offset", "format",
                                           "last_offset", "messages", "not_kept", "path"])
        self.assertEqual(segment["findings"][0], {
            "severity": "damage", "kind": "damage", "path": f"topics/74/{os.path.basename(self.segments()[1])}",
            "message": segment["findings"][0]["message"], "at": hit.pos, "length": hit.end - hit.pos,
            "offsets": {"first": hit.first, "last": hit.first, "count": 1}})
        torn = topic["segments"][-1]["findings"][0]
        self.assertEqual((torn["kind"], torn["severity"], torn["offsets"]["first"]), ("torn-tail", "warning", 59))
        self.assertEqual(report["commits"], {"path": "commits.log", "lines": 0, "findings": []})

    def test_quiet(self):
        self.damaged()
        done = self.cli("--quiet")
        self.assertEqual(done.returncode, 1)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 2, done.stdout)
        self.assertTrue(lines[0].startswith(f"DAMAGE: topics/74/{os.path.basename(self.segments()[1])}: damaged: "))
        self.assertTrue(lines[1].startswith("summary: 1 topic, "))
        self.assertIn("1 damaged range (1 offset lost), 1 torn tail: DAMAGED (exit 1)", lines[1])

    def test_text_shows_notes_and_warnings(self):
        self.damaged()
        text = check.render_text(self.check())
        self.assertRegex(text, r"\n    note: topics/74/\d{20}\.idx: does not match the segment")
        self.assertIn("\n    warning: torn tail: the last ", text)

    def test_progress_on_request(self):
        self.several_segments(30)
        done = subprocess.run([sys.executable, "-m", "zaichik.cli", "check", "--progress", self.dir],
                              capture_output=True, timeout=60, env=ENV)
        done.stderr = done.stderr.decode()  # (text=True would turn each \r into \n)
        self.assertEqual(done.returncode, 0)
        total = check.human_bytes(sum(os.path.getsize(p) for p in self.segments()))
        self.assertTrue(done.stderr.startswith("\r[      "), repr(done.stderr))
        self.assertRegex(done.stderr, re.escape(f"\r[{'#' * 30}] 100% {total}/{total}") + " *\n$")


class ProgressBarTests(SynchronousTestCase):
    def test_draws_at_most_ten_times_a_second(self):
        now = [0]
        out = io.StringIO()
        bar = check.ProgressBar(out, width=10, interval=100, clock=lambda: now[0])  # a clock in ms
        total = 3 * 1024 ** 3
        for i in range(1000):  # 1000 updates over 999 ms
            bar(i * 1024 ** 2, total)
            now[0] += 1
        bar(total, total)
        bar(total, total)
        bar.close()
        frames = out.getvalue().split("\r")[1:]
        self.assertEqual(len(frames), 11)  # 0.0, 0.1, ... 0.9 s, then 100% once
        self.assertEqual(frames[0].rstrip(), "[          ]   0% 0 B/3.0 GiB")
        self.assertEqual(frames[5].rstrip(), "[#         ]  16% 500.0 MiB/3.0 GiB")
        # The last frame is padded over what the longer one before it left.
        self.assertEqual(frames[-1], "[##########] 100% 3.0 GiB/3.0 GiB" + " " * (len(frames[-2]) - 33) + "\n")

    def test_human_bytes(self):
        self.assertEqual([check.human_bytes(n) for n in (0, 1023, 1024, 1536, 1.4 * 1024 ** 3, 2.7 * 1024 ** 3)],
                         ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "1.4 GiB", "2.7 GiB"])
        self.assertTrue(re.fullmatch(r"\d+\.\d TiB", check.human_bytes(5 * 1024 ** 4)))
