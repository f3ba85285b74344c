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
from typing import List

from twisted.trial.unittest import TestCase

from zaichik import __version__, cli, units
from zaichik.testing import ROOT, BrokerProcess, free_port, shared_broker

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
ZAICHIK = [sys.executable, "-m", "zaichik.cli"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class CommandTests(TestCase):
    def setUp(self) -> None:
        self.broker = shared_broker()

    def zaichik(self, *args: str, stdin: str = "", server: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [*ZAICHIK, "--server", server or self.broker.address, *args],
            input=stdin, capture_output=True, text=True, timeout=60, env=ENV,
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
        self.assertIn("Connection refused", done.stderr)
        self.assertEqual(done.stderr.count("\n"), 1)

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


# --- behaving like mosquitto_pub/sub ---------------------------------------------------------------

import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

from zaichik.codec import Start  # noqa: E402
from zaichik.sync import connect  # noqa: E402


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll C{predicate} until true, for at most C{timeout} seconds (for other processes)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Behaviour(TestCase):
    """The command as people used to mosquitto_pub/sub, nats and kcat expect it."""

    def setUp(self) -> None:
        self.broker = shared_broker()
        self.client = connect(self.broker.address, keepalive=0)
        self.addCleanup(self.client.close)

    def run_cli(self, *args: str, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([*ZAICHIK, *args], input=stdin, capture_output=True, timeout=timeout, env=ENV)

    def retained(self, *values: bytes) -> str:
        topic = unique("cli")
        self.client.create_topic(topic, retention_ttl=600_000)
        if values:
            self.client.publish_batch(topic, [(None, v) for v in values])
        return topic

    def assertOneLineError(self, done: subprocess.CompletedProcess, status: int, *fragments: str) -> None:
        stderr = done.stderr.decode()
        self.assertEqual(done.returncode, status, stderr)
        self.assertEqual(stderr.count("\n"), 1, stderr)
        self.assertTrue(stderr.startswith("zaichik: "), stderr)
        for fragment in fragments:
            self.assertIn(fragment, stderr)

    # --- options before or after the subcommand ----------------------------------------------

    def test_options_after_the_subcommand(self):
        """The README's own `zaichik sub greetings --client-id w1 --commit`, and
        --server/-s on either side."""
        topic = self.retained(b"a", b"b", b"c")
        client_id = unique("w")
        first = self.run_cli("sub", topic, "--client-id", client_id, "--commit", "--count", "2",
                             "--server", self.broker.address)
        self.assertEqual((first.returncode, first.stdout), (0, f"{topic} 0 a\n{topic} 1 b\n".encode()))
        second = self.run_cli("-s", self.broker.address, "sub", topic, "--client-id", client_id, "--count", "1")
        self.assertEqual(second.stdout, f"{topic} 2 c\n".encode())
        published = self.run_cli("pub", "--server", self.broker.address, topic, "d", "--ack")
        self.assertEqual(published.stdout, b"3\n")
        published = self.run_cli("pub", topic, "e", "-s", self.broker.address, "--ack")
        self.assertEqual(published.stdout, b"4\n")

    def test_option_after_overrides_before(self):
        refused = f"127.0.0.1:{free_port()}"
        done = self.run_cli("--server", refused, "topics", "--server", self.broker.address)
        self.assertEqual(done.returncode, 0, done.stderr)
        done = self.run_cli("-s", self.broker.address, "topics", "-s", refused)
        self.assertEqual(done.returncode, cli.EXIT_CONNECTION)

    def test_subcommand_help_lists_the_options(self):
        text = self.run_cli("sub", "--help").stdout.decode()
        for option in ("-s SERVER, --server SERVER", "--client-id", "--token", "--tls", "--ca", "--timeout",
                       "--format {text,json,raw}", "130", "141", "--group NAME", "--no-ack",
                       "--ack-timeout DURATION", "zaichik sub 'sensors.>'", "zaichik sub jobs --group workers"):
            self.assertIn(option, text)

    def test_version(self):
        done = self.run_cli("--version")
        self.assertEqual((done.returncode, done.stdout), (0, f"zaichik {__version__}\n".encode()))

    # --- stdin ---------------------------------------------------------------------------------

    def test_stdin_is_streamed(self):
        """Each line is published as it is read: the first arrives while the
        writer is still writing (it waits for the test to see the first
        published before it writes the rest)."""
        topic = unique("stream")
        subscription = self.client.subscribe(topic, start=Start.LATEST)
        writer = subprocess.Popen([sys.executable, "-c",
                                   "import sys\n"
                                   "print('line', 0, flush=True)\n"
                                   "sys.stdin.readline()\n"
                                   "for i in range(1, 10):\n"
                                   "    print('line', i, flush=True)\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        go_on = writer.stdin
        assert go_on is not None
        self.addCleanup(writer.wait)
        self.addCleanup(go_on.close)  # (the writer ends, if the test did not get that far)
        publisher = subprocess.Popen([*ZAICHIK, "-s", self.broker.address, "pub", topic], stdin=writer.stdout,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        writer.stdout.close()
        # (A fixed-pace writer made this a race with the command's start-up:
        # the first line had to arrive within the writer's second.)
        first = subscription.get(timeout=10)
        self.assertEqual(first.value, b"line 0")
        self.assertIsNone(writer.poll(), "the first line arrived only after the writer finished")
        go_on.write(b"go on\n")
        go_on.flush()
        rest = [subscription.get(timeout=10).value for _ in range(9)]
        self.assertEqual(rest, [b"line %d" % i for i in range(1, 10)])
        out, err = publisher.communicate(timeout=30)
        self.assertEqual((publisher.returncode, out, err), (0, b"", b""))

    def test_300000_lines_in_bounded_memory(self):
        """Memory is bounded by backpressure, not by the input's size."""
        topic = unique("bulk")
        self.client.create_topic(topic)
        # A small parent runs a writer that streams the lines and the command
        # reading them, and reports the largest of its children's peak RSS.
        measure = ("import resource, subprocess, sys\n"
                   "writer = subprocess.Popen([sys.executable, '-c', 'import sys\\n'\n"
                   "    'out = sys.stdout.buffer\\n'\n"
                   "    'for i in range(300000):\\n'\n"
                   "    '    out.write(b\"%06d some log line of about sixty bytes, more or less\\\\n\" % i)\\n'],\n"
                   "    stdout=subprocess.PIPE)\n"
                   "p = subprocess.run(sys.argv[1:], stdin=writer.stdout, capture_output=True)\n"
                   "writer.wait()\n"
                   "sys.stderr.buffer.write(p.stderr)\n"
                   "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
        done = subprocess.run([sys.executable, "-c", measure, *ZAICHIK, "-s", self.broker.address, "pub", topic],
                              capture_output=True, timeout=120, env=ENV)
        status, peak_kib = map(int, done.stdout.split())
        self.assertEqual(status, 0, done.stderr)
        info = {t.name: t for t in self.client.list_topics()}[topic]
        self.assertEqual(info.next_offset, 300_000)
        self.assertLess(peak_kib, 50 * 1024, f"peak RSS {peak_kib} KiB")

    def test_crlf_and_raw_bytes(self):
        """\\r\\n ends a line like \\n; values are the line's bytes as they are
        (not UTF-8 too), and --format raw prints them alone."""
        topic = self.retained()
        done = self.run_cli("-s", self.broker.address, "pub", topic, stdin=b"one\r\ntwo\n\xff\xfe bytes\nlast")
        self.assertEqual(done.returncode, 0, done.stderr)
        raw = self.run_cli("-s", self.broker.address, "sub", topic, "--from", "earliest", "--count", "4",
                           "--format", "raw")
        self.assertEqual(raw.stdout, b"one\ntwo\n\xff\xfe bytes\nlast\n")
        text = self.run_cli("-s", self.broker.address, "sub", topic, "--from", "offset:2", "--count", "1")
        self.assertEqual(text.stdout.decode(), f"{topic} 2 \\xff\\xfe bytes\n")

    def test_input_that_cannot_be_used(self):
        """A line that is not UTF-8 where JSON is needed, a missing field, a
        topic that is not UTF-8: one line, exit 2."""
        topic = self.retained()
        done = self.run_cli("-s", self.broker.address, "pub", topic, "--key-from", "json:id",
                            stdin=b'{"id": 1}\n\xff\n')
        self.assertOneLineError(done, cli.EXIT_USAGE, "line 2", "UTF-8")
        done = self.run_cli("-s", self.broker.address, "pub", topic, "--key-from", "3", stdin=b"a b\n")
        self.assertOneLineError(done, cli.EXIT_USAGE, "line 1 has no field 3")
        done = subprocess.run([*ZAICHIK.copy(), "-s", self.broker.address, "pub", b"caf\xe9", "x"],
                              capture_output=True, timeout=30, env=ENV)
        self.assertOneLineError(done, cli.EXIT_USAGE, "not UTF-8")

    # --- Ctrl-C and a closed stdout -----------------------------------------------------------

    def start(self, *args: str, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen([*ZAICHIK, "-s", self.broker.address, *args], start_new_session=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, **kwargs)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        return process

    def subscribers(self, topic: str) -> int:
        return {t.name: t for t in self.client.list_topics()}.get(topic, None).subscribers if topic in {
            t.name for t in self.client.list_topics()} else 0

    def test_ctrl_c_on_sub(self):
        topic = unique("ctrlc")
        process = self.start("sub", topic)
        wait_until(lambda: self.subscribers(topic) == 1, what="the subscription")
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=10)
        self.assertEqual((process.returncode, out, err), (cli.EXIT_INTERRUPTED, b"", b""))

    def test_ctrl_c_on_pub_waiting_for_stdin(self):
        """Ctrl-C while pub waits for the next line: 130, nothing printed, and
        what was read is published."""
        topic = self.retained()
        process = self.start("pub", topic, stdin=subprocess.PIPE)
        process.stdin.write(b"first\n")
        process.stdin.flush()
        wait_until(lambda: {t.name: t for t in self.client.list_topics()}[topic].next_offset == 1,
                   what="the first line published")
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=10)
        self.assertEqual((process.returncode, out, err), (cli.EXIT_INTERRUPTED, b"", b""))

    def test_pipe_into_head(self):
        """`zaichik sub T --from earliest | head -2`: two lines, then a quiet exit."""
        topic = self.retained(*[b"message %d" % i for i in range(3000)])
        shell = (f"{' '.join(ZAICHIK)} -s {self.broker.address} sub {topic} --from earliest | head -2; "
                 "echo status=${PIPESTATUS[0]}")
        process = self.shell(shell)
        # sub learns that head has gone at its next write.  Unless the pipe's
        # buffer is too small for the 3000 retained messages (~100 KB: 64 KiB
        # pipes do not hold them, 1 MiB pipes, as with 64 KiB pages, do),
        # that write is of a message published after head exited: keep
        # publishing until the pipeline ends.
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            self.client.publish(topic, b"later")
            time.sleep(0.05)
        out, err = process.communicate(timeout=10)
        lines = out.decode().splitlines()
        self.assertEqual(lines, [f"{topic} 0 message 0", f"{topic} 1 message 1", f"status={cli.EXIT_PIPE}"])
        self.assertEqual(err, b"")

    def shell(self, command: str) -> subprocess.Popen:
        """bash -c C{command} in a session of its own (killed with all its children at the end)."""
        process = subprocess.Popen(["bash", "-c", command], start_new_session=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=ENV)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        return process

    # --- errors and timeouts ------------------------------------------------------------------------

    def test_frame_too_large_is_reported(self):
        """A 2 MB message: FRAME_TOO_LARGE from the broker (exit 1), not "connection lost"."""
        done = self.run_cli("-s", self.broker.address, "pub", unique("big"), stdin=b"x" * 2_000_000 + b"\n")
        self.assertOneLineError(done, cli.EXIT_BROKER_ERROR, "FRAME_TOO_LARGE")
        done = self.run_cli("-s", self.broker.address, "pub", unique("big"), "--ack", stdin=b"x" * 2_000_000)
        self.assertOneLineError(done, cli.EXIT_BROKER_ERROR, "FRAME_TOO_LARGE")

    def test_bad_topic_is_one_line(self):
        done = self.run_cli("-s", self.broker.address, "sub", "bad topic")
        self.assertOneLineError(done, cli.EXIT_BROKER_ERROR, "BAD_TOPIC")
        done = self.run_cli("-s", self.broker.address, "pub", "bad topic", "--ack", "x")  # options between
        self.assertOneLineError(done, cli.EXIT_BROKER_ERROR, "BAD_TOPIC")

    def test_a_server_that_never_answers(self):
        """Every command ends after --timeout against a server that accepts and
        says nothing."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        self.addCleanup(silent.close)
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        for args in (["topics"], ["sub", "t"], ["pub", "t", "x"], ["--client-id", "w", "create", "t"],
                     ["--tls", "topics"]):
            started = time.monotonic()
            done = self.run_cli("-s", address, "--timeout", "300ms", *args, timeout=20)
            self.assertOneLineError(done, cli.EXIT_CONNECTION)
            self.assertLess(time.monotonic() - started, 5, args)

    def test_tls_verification_failure_is_one_line(self):
        from tests.test_clients_shared import tls_broker

        _, address, files = tls_broker()
        done = self.run_cli("-s", address, "--tls", "topics")
        self.assertOneLineError(done, cli.EXIT_CONNECTION, "cannot connect", "certificate verif")
        done = self.run_cli("-s", address, "--ca", files.ca, "topics")
        self.assertEqual(done.returncode, 0, done.stderr)
        done = self.run_cli("-s", address, "--ca", "/nonexistent/ca.pem", "topics")
        self.assertOneLineError(done, cli.EXIT_USAGE, "/nonexistent/ca.pem")

    def test_usage_errors(self):
        done = self.run_cli("sub")
        self.assertEqual(done.returncode, cli.EXIT_USAGE)
        done = self.run_cli("--timeout", "soon", "topics")
        self.assertEqual(done.returncode, cli.EXIT_USAGE)
        self.assertIn("not a duration", done.stderr.decode())



class PatternAndGroupCommands(TestCase):
    """`zaichik sub 'sensors.>'` and `zaichik sub jobs --group workers` (protocol 1.1)."""

    setUp = Behaviour.setUp
    run_cli = Behaviour.run_cli
    retained = Behaviour.retained
    assertOneLineError = Behaviour.assertOneLineError
    start = Behaviour.start
    subscribers = Behaviour.subscribers

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run_cli("-s", self.broker.address, *args, **kwargs)

    def lines(self, done: subprocess.CompletedProcess) -> List[str]:
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.decode().splitlines()

    def test_sub_pattern(self):
        """Existing topics from --from, a topic created later from its first message."""
        base = unique("sensors")
        for name, value in ((f"{base}.a", b"21.5"), (f"{base}.b.c", b"19.0"), (f"{base}x", b"no")):
            self.client.create_topic(name, retention_ttl=600_000)
            self.client.publish(name, value)
        done = self.cli("sub", f"{base}.>", "--from", "earliest", "--count", "2")
        self.assertEqual(sorted(self.lines(done)), [f"{base}.a 0 21.5", f"{base}.b.c 0 19.0"])

        process = self.start("sub", f"{base}.*", "--from", "latest", "--count", "1", "--format", "json")
        wait_until(lambda: self.subscribers(f"{base}.a") == 1, what="the pattern following the topic")
        self.client.publish(f"{base}.new", b"later")
        out, err = process.communicate(timeout=10)
        self.assertEqual((process.returncode, err), (0, b""))
        self.assertEqual(json.loads(out)["topic"], f"{base}.new")

    def test_sub_pattern_commit(self):
        """--commit commits each message's own topic: a durable reader resumes per topic."""
        base = unique("p")
        for name in (f"{base}.a", f"{base}.b"):
            self.client.create_topic(name, retention_ttl=600_000)
            self.client.publish_batch(name, [(None, b"0"), (None, b"1")])
        client_id = unique("reader")
        first = self.cli("--client-id", client_id, "sub", f"{base}.*", "--commit", "--count", "4")
        self.assertEqual(len(self.lines(first)), 4)
        self.client.publish(f"{base}.b", b"2")
        second = self.cli("--client-id", client_id, "sub", f"{base}.*", "--count", "1")
        self.assertEqual(self.lines(second), [f"{base}.b 2 2"])

    def test_sub_group_shares_and_acks(self):
        """Two members share the jobs; each acks what it printed, so a member
        joining later gets only what is new."""
        topic = self.retained(*[b"job %d" % i for i in range(6)])
        first = self.start("sub", topic, "--group", "workers", "--count", "3", "--max-inflight", "3")
        second = self.start("sub", topic, "--group", "workers", "--count", "3", "--max-inflight", "3")
        outputs = [p.communicate(timeout=20) for p in (first, second)]
        self.assertEqual([p.returncode for p in (first, second)], [0, 0], outputs)
        lines = [line for out, _ in outputs for line in out.decode().splitlines()]
        self.assertEqual(sorted(lines), [f"{topic} {i} job {i}" for i in range(6)])
        self.client.publish(topic, b"job 6")
        third = self.cli("sub", topic, "--group", "workers", "--count", "1")
        self.assertEqual(self.lines(third), [f"{topic} 6 job 6"])

    def test_sub_group_no_ack(self):
        """--no-ack: what was printed goes back to the group when the member
        leaves, and comes again after --ack-timeout to a member that stays."""
        topic = self.retained(b"a", b"b")
        first = self.cli("sub", topic, "--group", "peek", "--no-ack", "--count", "2")
        self.assertEqual(self.lines(first), [f"{topic} 0 a", f"{topic} 1 b"])
        again = self.cli("sub", topic, "--group", "peek", "--no-ack", "--ack-timeout", "200ms", "--count", "4")
        self.assertEqual(self.lines(again), [f"{topic} 0 a", f"{topic} 1 b"] * 2)

    def test_group_usage_and_refusals(self):
        topic = self.retained()
        for args, fragment in (
                (["--no-ack"], "--no-ack is for a group member"),
                (["--ack-timeout", "1s"], "--ack-timeout is for a group member"),
                (["--group", "g", "--commit"], "--commit is for a plain subscription"),
                (["--group", "g", "--ack-timeout", "soon"], "not a duration")):
            done = self.cli("sub", topic, *args)
            self.assertEqual(done.returncode, cli.EXIT_USAGE, (args, done.stderr))
            self.assertIn(fragment, done.stderr.decode())
        live = unique("live")
        self.client.create_topic(live)   # retains nothing
        self.assertOneLineError(self.cli("sub", live, "--group", "g"), cli.EXIT_BROKER_ERROR, "BAD_TOPIC",
                                "retains nothing")
        self.assertOneLineError(self.cli("sub", f"{topic}.>", "--group", "g"), cli.EXIT_BROKER_ERROR, "BAD_TOPIC")


class TopicsWithGroups(TestCase):
    """`zaichik topics --metrics PORT`: the groups and their lag, from the broker's metrics endpoint."""

    def test_groups_and_lag(self):
        from zaichik.sync import Start, connect

        broker = BrokerProcess(http=True).start()  # its metrics on http_port
        self.addCleanup(broker.cleanup)
        metrics_port = broker.http_port
        topic = unique("jobs")
        with connect(broker.address, keepalive=0) as client:
            client.create_topic(topic, retention_ttl=600_000)
            for n in range(5):
                client.publish(topic, b"job %d" % n)
            with client.subscribe_group(topic, "workers", start=Start.EARLIEST, max_inflight=2) as member:
                member.get(timeout=10)  # two are outstanding (its window), none acknowledged
                done = subprocess.run([*ZAICHIK, "-s", broker.address, "topics", "--metrics", str(metrics_port)],
                                      capture_output=True, text=True, timeout=60, env=ENV)
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        header = lines.index(next(line for line in lines if line.startswith("topic") and "group" in line))
        self.assertEqual(lines[header].split(), ["topic", "group", "members", "outstanding", "lag", "redeliveries"])
        rows = [line.split() for line in lines[header + 1 :]]
        self.assertIn([topic, "workers", "1", "2", "5", "0"], rows)

    def test_metrics_unreachable_is_one_line(self):
        broker = shared_broker()
        done = subprocess.run([*ZAICHIK, "-s", broker.address, "topics", "--metrics", str(free_port())],
                              capture_output=True, text=True, timeout=60, env=ENV)
        self.assertEqual(done.returncode, 3)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        self.assertIn("cannot read the metrics", done.stderr)
