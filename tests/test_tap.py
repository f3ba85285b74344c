"""
C{twistd zaichik}: its options and the service they build, in process; its
start-up errors and start-up log, from real C{twistd} processes; and that
twistd finds the plugin after C{pip install -e .}.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from twisted.application.service import MultiService
from twisted.python import usage
from twisted.scripts._twistd_unix import ServerOptions
from twisted.trial.unittest import SkipTest, TestCase

import zaichik
from zaichik import tap
from zaichik.testing import TWISTD, BrokerProcess, FreePort, Option

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
ANY_PORT = "tcp:0:interface=127.0.0.1"


def twistd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """C{twistd -n zaichik ARGS} in the foreground, its stdout and stderr apart."""
    return subprocess.run(TWISTD + ["-n", "--pidfile=", "zaichik", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def credentials_file(test: TestCase) -> str:
    from zaichik.auth import hash_secret

    fd, path = tempfile.mkstemp(prefix="zaichik-credentials-")
    with os.fdopen(fd, "w") as f:
        f.write(f"reader {hash_secret('secret', n=2, r=1, p=1)} subscribe=#\n")
    test.addCleanup(os.unlink, path)
    return path


class OptionsTests(TestCase):
    """tap.Options in process."""

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_bare_port_is_local_without_auth(self):
        self.assertEqual(self.parse("--port", "8889")["port"], ["tcp:8889:interface=127.0.0.1"])
        self.assertEqual(self.parse()["port"], ["tcp:8889:interface=127.0.0.1"])

    def test_bare_port_is_every_interface_with_auth(self):
        path = credentials_file(self)
        # --auth after --port counts as well
        self.assertEqual(self.parse("--port", "8889", "--auth", path)["port"], ["tcp:8889"])
        self.assertEqual(self.parse("--auth", path)["port"], ["tcp:8889"])

    def test_descriptions_are_used_as_given(self):
        given = ["tcp:8889:interface=0.0.0.0", "unix:/tmp/zaichik-test.sock", "tcp:8890"]
        options = self.parse(*[arg for d in given for arg in ("--port", d)])
        self.assertEqual(options["port"], given)

    def test_metrics_port_follows_the_same_rule(self):
        self.assertEqual(self.parse("--metrics-port", "9102")["metrics-port"], "tcp:9102:interface=127.0.0.1")
        path = credentials_file(self)
        self.assertEqual(self.parse("--metrics-port", "9102", "--auth", path)["metrics-port"], "tcp:9102")
        self.assertEqual(self.parse("--metrics-port", "tcp:9102:interface=0.0.0.0")["metrics-port"],
                         "tcp:9102:interface=0.0.0.0")
        self.assertIsNone(self.parse()["metrics-port"])

    def test_websocket_ports_and_origins(self):
        self.assertEqual(self.parse()["websocket-port"], [])
        options = self.parse("--websocket-port", "8890", "--websocket-port", "unix:/tmp/zaichik-ws.sock",
                             "--websocket-origin", "https://app.example.com", "--websocket-origin", "*")
        self.assertEqual(options["websocket-port"], ["tcp:8890:interface=127.0.0.1", "unix:/tmp/zaichik-ws.sock"])
        self.assertEqual(options["websocket-origin"], ["https://app.example.com", "*"])
        path = credentials_file(self)
        self.assertEqual(self.parse("--websocket-port", "8890", "--auth", path)["websocket-port"], ["tcp:8890"])
        for bad in ("99999", "nonsense:1"):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse("--websocket-port", bad)
            self.assertIn("--websocket-port", str(caught.exception))

    def test_errors_name_the_option(self):
        for args, named in [
            (("--max-connections", "-5"), "--max-connections"),
            (("--max-connections", "many"), "--max-connections"),
            (("--max-frame-size", "10"), "--max-frame-size"),
            (("--cache-size", "-1"), "--cache-size"),
            (("--default-retention", "soon"), "--default-retention"),
            (("--port", "99999"), "--port"),
            (("--port", "nonsense:1"), "--port"),
            (("--metrics-port", "bogus"), "--metrics-port"),
            (("--metrics-max-topics", "-1"), "--metrics-max-topics"),
            (("--auth", "/nonexistent/credentials"), "--auth"),
        ]:
            with self.assertRaises(usage.UsageError, msg=args) as caught:
                self.parse(*args)
            self.assertIn(named, str(caught.exception), args)

    def test_metrics_max_topics(self):
        self.assertEqual(self.parse()["metrics-max-topics"], 1000)
        self.assertEqual(self.parse("--metrics-max-topics", "50")["metrics-max-topics"], 50)

    def test_under_twistd_a_usage_error_is_one_line(self):
        """Under twistd (a parent ServerOptions) a usage error exits with one line, not the usage text."""
        with self.assertRaises(SystemExit) as caught:
            ServerOptions().parseOptions(["zaichik", "--max-connections", "-5"])
        message = caught.exception.code
        self.assertIsInstance(message, str)
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertIn("--max-connections", message)

    def test_make_service(self):
        options = self.parse("--port", "tcp:0:interface=127.0.0.1", "--metrics-port", "0", "--max-topics", "7")
        top = tap.makeService(options)
        self.assertIsInstance(top, MultiService)
        broker = top.getServiceNamed("zaichik-broker")
        self.assertEqual(broker.limits.max_topics, 7)
        # one listener for clients, one for metrics, nothing bound yet
        self.assertEqual(len([s for s in top if isinstance(s, tap.Listener)]), 2)


class StartupErrorTests(TestCase):
    """
    Every start-up error of C{twistd -n zaichik} is one line on stderr, a
    non-zero exit status, and no traceback anywhere.
    """

    def assertOneLine(self, done: subprocess.CompletedProcess, *expected: str) -> str:
        output = done.stdout + done.stderr
        self.assertNotEqual(done.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        lines = done.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, f"stderr: {done.stderr!r}\nstdout: {done.stdout!r}")
        line = lines[0]
        self.assertTrue(line.startswith("twistd zaichik: "), line)
        for text in expected:
            self.assertIn(text, line)
        # Said once: not again in the log on stdout.
        self.assertEqual(output.count(line.split(": ", 1)[1]), 1, output)
        return line

    def busy_port(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.addCleanup(s.close)
        return s.getsockname()[1]

    def test_busy_port(self):
        port = self.busy_port()
        self.assertOneLine(twistd("--port", f"tcp:{port}:interface=127.0.0.1"), "--port", str(port),
                           "in use")

    def test_busy_bare_port(self):
        port = self.busy_port()  # on 127.0.0.1, where a bare port now listens
        self.assertOneLine(twistd("--port", str(port)), "--port", str(port), "in use")

    def test_port_out_of_range(self):
        self.assertOneLine(twistd("--port", "99999"), "--port", "99999")

    def test_description_port_out_of_range(self):
        self.assertOneLine(twistd("--port", "tcp:99999:interface=127.0.0.1"), "--port", "99999")

    def test_address_not_here(self):
        # 192.0.2.0/24 is TEST-NET-1: never this machine's; nothing is sent.
        self.assertOneLine(twistd("--port", "tcp:8889:interface=192.0.2.1"), "--port", "192.0.2.1")

    def test_missing_tls_key(self):
        self.assertOneLine(twistd("--port", "ssl:0:privateKey=/nonexistent/key.pem:certKey=/nonexistent/c.pem"),
                           "--port", "ssl:0")

    def test_bad_metrics_port(self):
        self.assertOneLine(twistd("--port", ANY_PORT, "--metrics-port", "bogus"), "--metrics-port", "bogus")

    def test_busy_metrics_port(self):
        port = self.busy_port()
        self.assertOneLine(twistd("--port", ANY_PORT, "--metrics-port", f"tcp:{port}:interface=127.0.0.1"),
                           "--metrics-port", str(port), "in use")

    def test_missing_auth_file(self):
        self.assertOneLine(twistd("--port", ANY_PORT, "--auth", "/nonexistent/credentials"),
                           "--auth", "/nonexistent/credentials")

    def test_bad_auth_file(self):
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        os.write(fd, b"just-a-name\n")
        os.close(fd)
        self.assertOneLine(twistd("--port", ANY_PORT, "--auth", path), "--auth", path)

    def test_max_connections_negative_names_the_option(self):
        self.assertOneLine(twistd("--max-connections", "-5"), "--max-connections", "-5")

    def test_max_connections_not_a_number(self):
        self.assertOneLine(twistd("--max-connections", "lots"), "--max-connections", "lots")

    def test_unknown_option(self):
        self.assertOneLine(twistd("--no-such-option"), "no-such-option")

    def data_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="zaichik-tap-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def test_data_dir_where_a_file_is(self):
        path = os.path.join(self.data_dir(), "file")
        with open(path, "w") as f:
            f.write("not a directory\n")
        self.assertOneLine(twistd("--port", ANY_PORT, "--data-dir", os.path.join(path, "data")),
                           "--data-dir", path)

    def test_data_dir_on_a_read_only_file_system(self):
        mountpoint = self.data_dir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", mountpoint],
                           check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            raise SkipTest("cannot mount a read-only tmpfs here (needs root)")
        self.addCleanup(subprocess.run, ["umount", mountpoint], capture_output=True, timeout=30)
        line = self.assertOneLine(twistd("--port", ANY_PORT, "--data-dir", os.path.join(mountpoint, "data")),
                                  "--data-dir", mountpoint)
        self.assertIn("Read-only file system", line)

    def test_data_dir_without_permission(self):
        if os.geteuid() == 0:
            raise SkipTest("root may write anywhere (the read-only file system test covers this as root)")
        parent = self.data_dir()
        os.chmod(parent, 0o500)
        self.addCleanup(os.chmod, parent, 0o700)
        self.assertOneLine(twistd("--port", ANY_PORT, "--data-dir", os.path.join(parent, "data")),
                           "--data-dir", "Permission denied")

    def test_data_dir_in_use(self):
        data = self.data_dir()
        holder = BrokerProcess("--data-dir", data).start()
        self.addCleanup(holder.cleanup)
        self.assertOneLine(twistd("--port", ANY_PORT, "--data-dir", data), "--data-dir", data, "in use")

    def test_data_dir_in_a_newer_format(self):
        data = self.data_dir()
        with open(os.path.join(data, "FORMAT"), "w") as f:
            f.write("99\n")
        self.assertOneLine(twistd("--port", ANY_PORT, "--data-dir", data), "--data-dir", "format 99")

    def test_help_still_prints_the_options(self):
        done = subprocess.run(TWISTD + ["zaichik", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("--metrics-max-topics", done.stdout)


class StartupLogTests(TestCase):
    """What the start-up log says, read from --log-format json."""

    def events(self, *options: Option) -> list:
        broker = BrokerProcess("--log-format", "json", *options).start()
        self.addCleanup(broker.cleanup)
        broker.stop()
        return [json.loads(line) for line in broker.log().splitlines() if line.strip()]

    def started(self, events: list) -> dict:
        found = [e for e in events if e.get("namespace") == "zaichik.tap" and "version" in e]
        self.assertEqual(len(found), 1, events)
        return found[0]

    def test_in_memory(self):
        events = self.events()
        started = self.started(events)
        self.assertEqual(started["version"], zaichik.__version__)
        self.assertIn(zaichik.__version__, started["message"])
        self.assertEqual(started["storage"], "memory")
        self.assertIn("memory", started["message"])
        listening = [e for e in events if e.get("namespace") == "zaichik.tap" and "listener" in e]
        self.assertEqual(len(listening), 1, events)
        self.assertEqual(listening[0]["option"], "--port")
        self.assertIn("127.0.0.1", listening[0]["message"])
        recovered = [e for e in events if e.get("namespace") == "zaichik.tap" and "topics" in e]
        self.assertEqual(len(recovered), 1, events)
        self.assertEqual((recovered[0]["topics"], recovered[0]["retained"]), (0, 0))

    def test_data_dir_recovery(self):
        from zaichik import codec
        from zaichik.testing import parse_frames

        data = tempfile.mkdtemp(prefix="zaichik-tap-")
        self.addCleanup(shutil.rmtree, data, True)
        broker = BrokerProcess("--data-dir", data, "--fsync", "always").start()
        self.addCleanup(broker.cleanup)
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
            requests = [codec.CreateTopic(1, "kept", 3_600_000, 0), codec.CreateTopic(2, "other", 0, 0)]
            requests += [codec.Publish(3 + i, "kept", b"v%d" % i) for i in range(5)]
            s.sendall(b"".join(codec.frame(r.encode()) for r in requests))
            answer = b""
            while len(parse_frames_or_none(answer, parse_frames)) < len(requests):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        broker.stop()

        events = self.events("--data-dir", data, "--fsync", "always")
        started = self.started(events)
        self.assertEqual(started["storage"], "data-dir")
        self.assertEqual(started["data_dir"], data)
        self.assertEqual(started["fsync"], "always")
        self.assertIn(data, started["message"])
        self.assertIn("always", started["message"])
        recovered = [e for e in events if e.get("namespace") == "zaichik.tap" and "topics" in e]
        self.assertEqual(len(recovered), 1, events)
        self.assertEqual((recovered[0]["topics"], recovered[0]["retained"]), (2, 5))
        self.assertIn("2 topics", recovered[0]["message"])

    def test_with_auth_every_interface(self):
        # The test broker listens on an explicit loopback description; the
        # metrics port is bare, so --auth makes it listen on every interface.
        events = self.events("--auth", credentials_file(self), "--metrics-port", FreePort())
        metrics = [e for e in events if e.get("namespace") == "zaichik.tap" and e.get("option") == "--metrics-port"]
        self.assertEqual(len(metrics), 1, events)
        self.assertNotIn("interface=", metrics[0]["listener"])

    def test_local_only_is_said(self):
        """A bare --port without --auth: the text log says it is local only, and how to change that."""
        import time

        broker = BrokerProcess(listen="{port}").start()  # --port PORT, bare (returns once it answers a PING)
        self.addCleanup(broker.cleanup)
        deadline = time.monotonic() + 15
        # Until its start-up is logged, all of it (not a fixed 0.2 s after the port opened).
        while time.monotonic() < deadline and broker.process is not None and broker.process.poll() is None:
            if "Ready:" in broker.log():
                break
            time.sleep(0.05)
        broker.stop()
        lines = broker.log().splitlines()
        said = [line for line in lines if "local" in line]
        self.assertEqual(len(said), 1, lines)
        self.assertIn(f"127.0.0.1:{broker.port}", said[0])
        self.assertIn("--auth", said[0])


def parse_frames_or_none(data: bytes, parse) -> list:
    try:
        return parse(data)
    except (ValueError, Exception):
        return []


class EditableInstallTests(TestCase):
    """C{pip install -e .} into a fresh virtualenv: twistd lists zaichik from anywhere."""

    def test_plugin_found_after_editable_install(self):
        venv = tempfile.mkdtemp(prefix="zaichik-venv-")
        self.addCleanup(shutil.rmtree, venv, True)
        try:
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError as e:
            raise SkipTest(f"cannot make a virtualenv: {e.stderr}")
        python = os.path.join(venv, "bin", "python")
        # Only zaichik itself (--no-deps): Twisted comes from this interpreter's
        # site-packages, put on PYTHONPATH (whose .pth files, unlike the new
        # virtualenv's, are not read).
        install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", ROOT],
                                 capture_output=True, text=True, timeout=300)
        self.assertEqual(install.returncode, 0, install.stderr)
        import twisted

        site = os.path.dirname(os.path.dirname(twisted.__file__))
        elsewhere = tempfile.mkdtemp(prefix="zaichik-cwd-")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        env = dict(os.environ, PYTHONPATH=site)
        done = subprocess.run([python, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        self.assertIn("zaichik", done.stdout, done.stderr)
        # The checkout's own plugin directory is searched (not only a copy
        # that a plain install of this interpreter may have put in site).
        where = subprocess.run([python, "-c", "import twisted.plugins; print(repr(list(twisted.plugins.__path__)))"],
                               cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        self.assertIn(repr(os.path.join(ROOT, "twisted", "plugins")), where.stdout, where.stderr)


LATE_FAILURE = r"""
import sys
from twisted.internet import reactor, task
from zaichik.storage import disk

def open_later(self):
    def fail():
        raise OSError(5, "Input/output error", self.directory)
    return task.deferLater(reactor, 0.2, fail)

disk.DiskStorage.open = open_later  # storage that fails once the reactor runs
sys.argv = ["twistd", "-n", "--pidfile=", "zaichik", "--port", "tcp:0:interface=127.0.0.1",
            "--data-dir", sys.argv[1]]
from twisted.scripts.twistd import run
run()
"""


class LateStartupErrorTests(TestCase):
    def test_storage_failing_once_the_reactor_runs(self):
        """A storage whose open() fails later still gives one line and exit status 1."""
        data = tempfile.mkdtemp(prefix="zaichik-tap-")
        self.addCleanup(shutil.rmtree, data, True)
        done = subprocess.run([sys.executable, "-c", LATE_FAILURE, data], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stdout + done.stderr)
        self.assertNotIn("Unhandled", done.stdout + done.stderr)
        self.assertEqual(done.stderr.strip().splitlines(),
                         [f"twistd zaichik: cannot use --data-dir {data}: Input/output error"])
        self.assertIn("Main loop terminated", done.stdout)  # an orderly stop


LOCK_RACE = r"""
import sys
from zaichik.storage import disk

disk.check_not_locked = lambda directory: None  # as if the other broker took the lock after the check
sys.argv = ["twistd", "-n", "--pidfile=", "zaichik", "--port", "tcp:0:interface=127.0.0.1",
            "--data-dir", sys.argv[1]]
from twisted.scripts.twistd import run
run()
"""


class LockRaceTests(TestCase):
    def test_data_dir_locked_after_the_early_check(self):
        """The lock taken when storage opens (not the early check) refuses with the same one line."""
        data = tempfile.mkdtemp(prefix="zaichik-tap-")
        self.addCleanup(shutil.rmtree, data, True)
        holder = BrokerProcess("--data-dir", data).start()
        self.addCleanup(holder.cleanup)
        done = subprocess.run([sys.executable, "-c", LOCK_RACE, data], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stdout + done.stderr)
        self.assertEqual(done.stderr.strip().splitlines(),
                         [f"twistd zaichik: cannot use --data-dir {data}: it is in use by another broker "
                          "(its lock is held)"])
