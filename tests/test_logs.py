"""
C{--log-format json}: the observer's output, event by event, and a real
C{twistd zaichik} writing it to a C{--logfile}.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from datetime import datetime

from twisted.logger import LogLevel, LogPublisher, Logger, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zaichik import logs
from zaichik.testing import BrokerProcess


class Thing:
    def __str__(self) -> str:
        return "a thing"


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = io.StringIO()
        self.publisher = LogPublisher(logs.JSONLinesObserver(self.out))
        self.log = Logger(namespace="zaichik.test", observer=self.publisher)

    def lines(self) -> list:
        text = self.out.getvalue()
        self.assertNotIn("\x1e", text)  # no record separator: JSON Lines
        self.assertTrue(text.endswith("\n"))
        return [json.loads(line) for line in text.splitlines()]

    def test_one_object_a_line_with_the_rendered_message(self):
        self.log.info("Created topic {topic} (retention {retention} ms)", topic="orders", retention=60_000)
        self.log.warn("Second {n}", n=2)
        first, second = self.lines()
        self.assertEqual(first["message"], "Created topic orders (retention 60000 ms)")
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "zaichik.test")
        self.assertEqual((first["topic"], first["retention"]), ("orders", 60_000))
        self.assertEqual((second["message"], second["level"]), ("Second 2", "warn"))

    def test_no_twisted_internals(self):
        self.log.info("Hello {name}", name="x")
        (line,) = self.lines()
        self.assertEqual(sorted(line), ["level", "message", "name", "namespace", "time"])

    def test_time_is_iso_8601(self):
        self.log.info("now")
        (line,) = self.lines()
        when = datetime.fromisoformat(line["time"])
        self.assertIsNotNone(when.tzinfo)
        self.assertLess(abs(when.timestamp() - datetime.now().timestamp()), 60)

    def test_failure_becomes_a_traceback(self):
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            self.log.failure("Sweep failed on {topic}", Failure(), topic="t")
        (line,) = self.lines()
        self.assertEqual(line["message"], "Sweep failed on t")
        self.assertEqual(line["level"], "critical")
        self.assertIn("ZeroDivisionError", line["traceback"])
        self.assertIn("Traceback", line["traceback"])
        self.assertNotIn("failure", line)

    def test_fields_json_cannot_hold(self):
        self.log.info("odd {thing}", thing=Thing(), data=b"\x00bytes", tags={"b"}, nan=float("nan"),
                      keys={(1, 2): "tuple key"})
        (line,) = self.lines()
        self.assertEqual(line["message"], "odd a thing")
        self.assertEqual(line["thing"], "a thing")
        self.assertEqual(line["data"], "\x00bytes")
        self.assertEqual(line["tags"], ["b"])
        self.assertIsInstance(line["nan"], str)
        self.assertIsInstance(line["keys"], str)

    def test_legacy_events(self):
        """Twisted's own twisted.python.log messages: their text, no legacy keys."""
        observer = logs.JSONLinesObserver(self.out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        legacy_log.msg("BrokerFactory starting on 8889")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            legacy_log.err(None, "Unhandled error in something")
        self.flushLoggedErrors(ZeroDivisionError)
        msg, err = self.lines()
        self.assertEqual(msg["message"], "BrokerFactory starting on 8889")
        self.assertEqual(msg["level"], "info")
        self.assertFalse({"isError", "system", "format", "log_legacy", "time_float"} & set(msg))
        self.assertEqual(err["message"], "Unhandled error in something")
        self.assertEqual(err["level"], "critical")
        self.assertIn("ZeroDivisionError", err["traceback"])
        self.assertNotIn("ZeroDivisionError", err["message"])
        self.assertNotIn("why", err)

    def test_level_names(self):
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical):
            self.log.emit(level, "at {level_name}", level_name=level.name)
        self.assertEqual([line["level"] for line in self.lines()], ["debug", "info", "warn", "error", "critical"])


class DestinationTests(SynchronousTestCase):
    def tearDown(self) -> None:
        logs.configure()

    def test_to_stdout(self):
        logs.configure(None, nodaemon=True)
        self.assertTrue(logs.to_stdout())
        logs.configure("-", nodaemon=True)
        self.assertTrue(logs.to_stdout())
        logs.configure("broker.log", nodaemon=True)
        self.assertFalse(logs.to_stdout())
        logs.configure(None, nodaemon=False)  # a daemon: twistd.log
        self.assertFalse(logs.to_stdout())
        logs.configure(None, nodaemon=True, syslog=True)
        self.assertFalse(logs.to_stdout())

    def test_logfile_rotates_like_twistds(self):
        from twisted.python.logfile import LogFile

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        logs.configure(os.path.join(directory, "broker.log"), nodaemon=True)
        observer = logs.json_observer()
        self.assertIsInstance(observer._out, LogFile)
        self.assertEqual(observer._out.rotateLength, 1_000_000)


class TwistdTests(TestCase):
    def test_json_to_a_logfile(self):
        """twistd -n zaichik --log-format json --logfile F: every line of F is one JSON object."""
        import time

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "broker.log")
        # --port PORT, bare; returns once the broker answers a PING (its stdout is BrokerProcess's log).
        broker = BrokerProcess("--log-format", "json", twistd_options=["--logfile", path], listen="{port}").start()
        self.addCleanup(broker.cleanup)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if os.path.exists(path) and "Ready" in open(path).read():
                break
            time.sleep(0.05)
        broker.stop()  # SIGTERM
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("\x1e", text)
        events = [json.loads(line) for line in text.splitlines()]
        self.assertTrue(any(e["message"].startswith("twistd ") for e in events), events)
        self.assertTrue(any(e.get("version") for e in events), events)
        for event in events:
            self.assertTrue({"time", "level", "namespace", "message"} <= set(event), event)
            self.assertFalse([key for key in event if key.startswith("log_")], event)
