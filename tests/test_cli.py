"""
The C{zaichik} command end to end: subprocesses against a real broker,
checking output and exit codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from twisted.trial.unittest import TestCase

from zaichik import cli, units
from zaichik.testing import ROOT, free_port, shared_broker


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class CommandTests(TestCase):
    def setUp(self) -> None:
        self.broker = shared_broker()

    def zaichik(self, *args: str, stdin: str = "", server: str = "") -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        return subprocess.run(
            [sys.executable, "-m", "zaichik.cli", "--server", server or self.broker.address, *args],
            input=stdin, capture_output=True, text=True, timeout=60, env=env,
        )

    def test_pub_ack_and_sub_json(self):
        topic = unique("cli")
        created = self.zaichik("create", topic, "--retention", "60s", "--compaction-window", "10s")
        self.assertEqual(created.returncode, 0, created.stderr)
        published = self.zaichik("pub", topic, "--key-from", "1", "--ack", stdin="a 1\nb 2\na 3\n")
        self.assertEqual((published.returncode, published.stdout), (0, "0\n1\n0 duplicate\n"))
        sub = self.zaichik("sub", topic, "--from", "earliest", "--count", "2", "--format", "json")
        self.assertEqual(sub.returncode, 0, sub.stderr)
        lines = [json.loads(line) for line in sub.stdout.splitlines()]
        self.assertEqual([(m["offset"], m["key"], m["value"]) for m in lines],
                         [(0, "a", "a 1"), (1, "b", "b 2")])
        self.assertEqual({m["topic"] for m in lines}, {topic})

    def test_sub_from_offset_text(self):
        topic = unique("cli")
        self.zaichik("create", topic, "--retention", "1m")
        self.assertEqual(self.zaichik("pub", topic, "one", "two", "three").returncode, 0)
        sub = self.zaichik("sub", topic, "--from", "offset:1", "--count", "2")
        self.assertEqual(sub.stdout, f"{topic} 1 two\n{topic} 2 three\n")

    def test_durable_commit_resumes(self):
        topic = unique("cli")
        client_id = unique("reader")
        self.zaichik("create", topic, "--retention", "1m")
        self.zaichik("pub", topic, "a", "b", "c")
        first = self.zaichik("--client-id", client_id, "sub", topic, "--commit", "--count", "2")
        self.assertEqual(first.stdout, f"{topic} 0 a\n{topic} 1 b\n")
        second = self.zaichik("--client-id", client_id, "sub", topic, "--count", "1")
        self.assertEqual(second.stdout, f"{topic} 2 c\n")

    def test_topics_table(self):
        topic = unique("cli")
        self.zaichik("create", topic, "--retention", "2h", "--compaction-window", "500ms")
        self.zaichik("pub", topic, "x")
        listing = self.zaichik("topics")
        self.assertEqual(listing.returncode, 0)
        row = next(line for line in listing.stdout.splitlines() if line.startswith(topic))
        self.assertEqual(row.split(), [topic, "2h", "500ms", "1", "1", "0"])

    def test_broker_error_is_one_line(self):
        done = self.zaichik("pub", "bad topic", "x")
        self.assertEqual(done.returncode, cli.EXIT_BROKER_ERROR)
        self.assertEqual(done.stderr.count("\n"), 1)
        self.assertIn("BAD_TOPIC", done.stderr)

    def test_refused_connection(self):
        done = self.zaichik("topics", server=f"127.0.0.1:{free_port()}")
        self.assertEqual(done.returncode, cli.EXIT_CONNECTION)
        self.assertTrue(done.stderr.startswith("zaichik: cannot connect"), done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_bad_duration_is_usage_error(self):
        done = self.zaichik("create", unique("cli"), "--retention", "soon")
        self.assertEqual(done.returncode, cli.EXIT_USAGE)
        self.assertIn("not a duration", done.stderr)


class DurationTests(TestCase):
    def test_parse(self):
        self.assertEqual([units.parse_duration(t) for t in ("250", "500ms", "60s", "5m", "2h", "1d", "1.5s")],
                         [250, 500, 60_000, 300_000, 7_200_000, 86_400_000, 1500])

    def test_reject(self):
        for text in ("", "soon", "5 parsecs", "-1s", "1e3"):
            self.assertRaises(ValueError, units.parse_duration, text)

    def test_format_round_trip(self):
        for ms in (0, 1, 999, 1000, 60_000, 90_000, 3_600_000, 86_400_000):
            self.assertEqual(units.parse_duration(units.format_duration(ms)), ms)
