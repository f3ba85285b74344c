"""
Authentication, permissions and TLS.

Unit tests drive sessions over StringTransport with a Clock (the scrypt
check runs inline instead of in a thread); end-to-end tests run a real
broker with an ssl: listener beside the tcp: one, with certificates made by
the test, and try every rule on both.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
from typing import List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from zaichik import codec
from zaichik.auth import (
    CredentialsFileError,
    Patterns,
    Permissions,
    PortalAuthenticator,
    hash_secret,
    new_token,
    parse_credentials,
    verify_secret,
)
from zaichik.client import connect
from zaichik.codec import ErrorCode, Start
from zaichik.errors import ZaichikError
from zaichik.protocol import BrokerFactory
from zaichik.service import BrokerService
from zaichik.testing import BrokerProcess, FreePort

# Cheap scrypt parameters for the tests' own hashes (the broker reads them
# from each hash, so any valid parameters work).
FAST = dict(n=2**4, r=1, p=1)


def credentials_text(tokens: dict) -> str:
    """A credentials file granting the test's three credentials."""
    lines = ["# test credentials", ""]
    grants = {
        "sensor": "publish=sensors/* client_id=sensor-1",
        "reader": "subscribe=sensors/#,alerts create=sensors/*,alerts client_id=reader-*",
        "admin": "publish=# subscribe=# create=# client_id=*  # everything",
    }
    for name, grant in grants.items():
        secret = tokens[name].split(":", 1)[1]
        lines.append(f"{name} {hash_secret(secret, **FAST)} {grant}")
    return "\n".join(lines) + "\n"


TOKENS = {name: f"{name}:s3cret-{name}" for name in ("sensor", "reader", "admin")}


class PatternTests(SynchronousTestCase):
    def test_patterns(self):
        p = Patterns(["sensors/*", "alerts/#", "exact.name"])
        for topic, expected in [("sensors/a", True), ("sensors/a/b", False), ("sensorsX", False),
                                ("alerts", True), ("alerts/x/y", True), ("alertsX", False),
                                ("exact.name", True), ("exactXname", False)]:
            self.assertEqual(p.match(topic), expected, topic)
        self.assertTrue(Patterns(["#"]).match("any/thing/at/all"))
        self.assertFalse(Patterns([]).match("x"))


class CredentialsFileTests(SynchronousTestCase):
    def test_parse(self):
        creds = parse_credentials(credentials_text(TOKENS))
        self.assertEqual(sorted(creds), ["admin", "reader", "sensor"])
        reader = creds["reader"][1]
        self.assertEqual(reader.subscribe.texts, ["sensors/#", "alerts"])
        self.assertTrue(reader.may_use_client_id("reader-7"))
        self.assertFalse(reader.may_use_client_id("sensor-1"))
        self.assertTrue(reader.may_use_client_id(""))
        self.assertEqual(creds["admin"][1].publish.texts, ["#"])

    def test_errors(self):
        for text in ("justaname\n", "a plaintext\n", "a scrypt$1$1$1$x$y frobnicate=x\n",
                     "a:b scrypt$1$1$1$x$y\n", "a scrypt$1$1$1$x$y\na scrypt$1$1$1$x$y\n"):
            self.assertRaises(CredentialsFileError, parse_credentials, text)

    def test_hash_and_verify(self):
        stored = hash_secret("pw", **FAST)
        self.assertTrue(verify_secret("pw", stored))
        self.assertFalse(verify_secret("pW", stored))
        self.assertFalse(verify_secret("pw", "scrypt$garbage"))
        token, stored = new_token("me")
        self.assertTrue(token.startswith("me:"))
        self.assertTrue(verify_secret(token.split(":", 1)[1], stored))


def inline(f, *args):
    return maybeDeferred(f, *args)


class Harness(SynchronousTestCase):
    """A broker with --auth, and connections over StringTransport."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        directory = tempfile.mkdtemp(prefix="zaichik-auth-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "credentials")
        with open(path, "w") as f:
            f.write(credentials_text(TOKENS))
        self.auth = PortalAuthenticator.from_file(path, clock=self.clock, run=inline)
        self.service = BrokerService(clock=self.clock, authenticator=self.auth)
        self.factory = BrokerFactory(self.service)

    def connect(self):
        transport = StringTransport()
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        return protocol, transport

    def exchange(self, connection, *requests) -> List[object]:
        protocol, transport = connection
        protocol.dataReceived(b"".join(codec.frame(r.encode()) for r in requests))
        data, out = transport.value(), []
        transport.clear()
        while data:
            n = int.from_bytes(data[:4], "big")
            out.append(codec.decode_reply(data[4 : 4 + n]))
            data = data[4 + n :]
        return out

    def login(self, name: str, client_id: str = ""):
        connection = self.connect()
        self.assertEqual(self.exchange(connection, codec.Hello(1, client_id, TOKENS[name])), [codec.Ok(1)])
        return connection


EVERY_REQUEST = [
    codec.CreateTopic(2, "sensors/a"),
    codec.Subscribe(3, "sensors/a", Start.EARLIEST),
    codec.Unsubscribe(4, "sensors/a"),
    codec.Publish(5, "sensors/a", b"v"),
    codec.Publish(0, "sensors/a", b"v"),
    codec.PublishBatch(6, "sensors/a", [(None, b"v")]),
    codec.Commit(7, "sensors/a", 0),
    codec.Close(8),
    codec.Ping(9),
    codec.ListTopics(10),
]


class AuthenticationTests(Harness):
    def test_every_request_without_hello_is_refused_and_closed(self):
        for request in EVERY_REQUEST:
            connection = self.connect()
            replies = self.exchange(connection, request)
            self.assertEqual([(r.rid, r.code) for r in replies], [(request.rid, ErrorCode.NOT_AUTHORIZED)],
                             request)
            self.assertTrue(connection[1].disconnecting, request)
        self.assertEqual(self.service.topics, {})

    def test_wrong_token_closes(self):
        for token in ("sensor:wrong", "nobody:whatever", "no-colon", "", ":empty-name"):
            connection = self.connect()
            replies = self.exchange(connection, codec.Hello(1, "", token), codec.Ping(2))
            self.assertEqual([(r.rid, r.code) for r in replies], [(1, ErrorCode.NOT_AUTHORIZED)], token)
            self.assertTrue(connection[1].disconnecting)

    def test_rate_limited_per_peer(self):
        for _ in range(5):
            self.exchange(self.connect(), codec.Hello(1, "", "sensor:wrong"))
        # Now even the right token is refused unchecked, for a while.
        replies = self.exchange(self.connect(), codec.Hello(1, "", TOKENS["sensor"]))
        self.assertEqual(replies[0].code, ErrorCode.NOT_AUTHORIZED)
        self.assertIn("too many", replies[0].message)
        self.clock.advance(61)
        self.login("sensor")

    def test_client_id_bound_to_credential(self):
        connection = self.connect()
        replies = self.exchange(connection, codec.Hello(1, "admin-position", TOKENS["reader"]))
        self.assertEqual(replies[0].code, ErrorCode.NOT_AUTHORIZED)
        self.assertTrue(connection[1].disconnecting)
        self.login("reader", "reader-1")
        self.login("sensor", "sensor-1")

    def test_another_clients_position_cannot_be_taken_over(self):
        owner = self.login("reader", "reader-1")
        thief = self.connect()
        self.exchange(thief, codec.Hello(1, "reader-1", TOKENS["sensor"]))
        self.assertTrue(thief[1].disconnecting)
        self.assertFalse(owner[1].disconnecting)  # not taken over


class PermissionTests(Harness):
    def test_publish_patterns(self):
        admin = self.login("admin")
        self.exchange(admin, codec.CreateTopic(1, "sensors/t"), codec.CreateTopic(2, "other"))
        sensor = self.login("sensor")
        replies = self.exchange(sensor, codec.Publish(2, "sensors/t", b"ok"), codec.Publish(3, "other", b"no"),
                                codec.PublishBatch(4, "other", [(None, b"no")]), codec.Publish(0, "other", b"no"),
                                codec.Ping(5))
        self.assertEqual(replies[0], codec.Published(2, 0, False))
        self.assertEqual([(r.rid, r.code) for r in replies[1:4]],
                         [(3, ErrorCode.NOT_AUTHORIZED), (4, ErrorCode.NOT_AUTHORIZED), (0, ErrorCode.NOT_AUTHORIZED)])
        self.assertEqual(replies[4], codec.Ok(5))  # the connection stays open
        self.assertEqual(self.service.topics["other"].next_offset, 0)

    def test_auto_create_needs_create(self):
        sensor = self.login("sensor")
        replies = self.exchange(sensor, codec.Publish(1, "sensors/new", b"v"))
        self.assertEqual(replies[0].code, ErrorCode.NOT_AUTHORIZED)
        self.assertNotIn("sensors/new", self.service.topics)
        reader = self.login("reader")
        self.assertEqual(self.exchange(reader, codec.Subscribe(1, "sensors/new")), [codec.Ok(1)])
        self.assertEqual(self.exchange(sensor, codec.Publish(2, "sensors/new", b"v")),
                         [codec.Published(2, 0, False)])

    def test_subscribe_and_create_patterns(self):
        reader = self.login("reader")
        replies = self.exchange(reader, codec.Subscribe(1, "sensors/a"), codec.Subscribe(2, "private"),
                                codec.CreateTopic(3, "alerts"), codec.CreateTopic(4, "private"),
                                codec.Publish(5, "alerts", b"no"))
        self.assertEqual(replies[0], codec.Ok(1))
        self.assertEqual(replies[1].code, ErrorCode.NOT_AUTHORIZED)
        self.assertEqual(replies[2], codec.Ok(3))
        self.assertEqual([r.code for r in replies[3:]], [ErrorCode.NOT_AUTHORIZED] * 2)

    def test_list_topics_shows_only_permitted(self):
        admin = self.login("admin")
        self.exchange(admin, codec.CreateTopic(1, "sensors/x"), codec.CreateTopic(2, "secret"))
        sensor = self.login("sensor")
        (topics,) = self.exchange(sensor, codec.ListTopics(3))
        self.assertEqual([t.name for t in topics.topics], ["sensors/x"])


class TLSFiles:
    """A CA, and a certificate for localhost / 127.0.0.1 signed by it, in a temporary directory."""

    def __init__(self) -> None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir = tempfile.mkdtemp(prefix="zaichik-tls-")
        now = datetime.datetime.now(datetime.timezone.utc)

        def name(cn):
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("zaichik test CA")).issuer_name(name("zaichik test CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        self.ca = self._write("ca.pem", ca.public_bytes(pem))
        self.cert = self._write("cert.pem", cert.public_bytes(pem))
        self.key = self._write("key.pem", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))

    def _write(self, filename: str, data: bytes) -> str:
        path = os.path.join(self.dir, filename)
        with open(path, "wb") as f:
            f.write(data)
        return path


_broker = None


def tls_broker():
    """One broker for the module: plain TCP and TLS listeners, --auth."""
    global _broker
    if _broker is None:
        files = TLSFiles()
        auth = os.path.join(files.dir, "credentials")
        with open(auth, "w") as f:
            f.write(credentials_text(TOKENS))
        tls = FreePort(f"ssl:{{port}}:privateKey={files.key}:certKey={files.cert}:interface=127.0.0.1")
        broker = BrokerProcess("--auth", auth, "--port", tls)
        broker.start()
        tls_port = tls.port
        import atexit

        atexit.register(broker.cleanup)
        _broker = (broker, tls_port, files)
    return _broker


class EndToEndTests(TestCase):
    """Every rule over plain TCP and over TLS, with the client library and raw sockets."""

    def setUp(self) -> None:
        self.broker, self.tls_port, self.files = tls_broker()
        self.transports = {
            "tcp": dict(server=f"localhost:{self.broker.port}"),
            "tls": dict(server=f"localhost:{self.tls_port}", ca=self.files.ca),
        }

    def raw(self, transport: str) -> socket.socket:
        if transport == "tcp":
            return socket.create_connection(("127.0.0.1", self.broker.port), timeout=5)
        context = ssl.create_default_context(cafile=self.files.ca)
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.tls_port), timeout=5),
                                   server_hostname="localhost")

    def raw_exchange(self, sock: socket.socket, request) -> tuple:
        """Send one request; the reply, and whether the connection was closed after it."""
        sock.sendall(codec.frame(request.encode()))
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                closed = True
                break
            data += chunk
            if len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big"):
                sock.settimeout(2)
                try:
                    closed = sock.recv(1) == b""
                except (socket.timeout, ConnectionResetError, ssl.SSLError):
                    closed = False
                break
        return codec.decode_reply(data[4 : 4 + int.from_bytes(data[:4], "big")]), closed

    def test_every_request_without_credentials(self):
        for transport in ("tcp", "tls"):
            for request in EVERY_REQUEST:
                with self.raw(transport) as sock:
                    reply, closed = self.raw_exchange(sock, request)
                self.assertEqual((reply.rid, reply.code), (request.rid, ErrorCode.NOT_AUTHORIZED),
                                 (transport, request))
                self.assertTrue(closed, (transport, request))

    def test_oversized_hello(self):
        for transport in ("tcp", "tls"):
            with self.raw(transport) as sock:
                sock.sendall((2 * 1024 * 1024).to_bytes(4, "big") + b"\x01" * 1000)
                data = sock.recv(65536)
                self.assertEqual(codec.decode_reply(data[4:]).code, ErrorCode.FRAME_TOO_LARGE)

    def test_rules_over_both_transports(self):
        async def check(transport: str):
            where = self.transports[transport]
            # (Two failures a transport: the broker allows 5 per peer a minute.)
            for token in {"tcp": ["sensor:wrong"], "tls": ["nobody:x"]}[transport]:
                with self.assertRaises(ZaichikError) as caught:
                    await connect(reactor, token=token, keepalive=0, **where)
                self.assertEqual(caught.exception.code, ErrorCode.NOT_AUTHORIZED)
            # Someone else's client_id.
            with self.assertRaises(ZaichikError):
                await connect(reactor, client_id="reader-9", token=TOKENS["sensor"], keepalive=0, **where)

            topic = f"sensors/{transport}"
            reader = await connect(reactor, client_id=f"reader-{transport}", token=TOKENS["reader"],
                                   keepalive=0, **where)
            sensor = await connect(reactor, client_id="sensor-1", token=TOKENS["sensor"], keepalive=0, **where)
            try:
                subscription = await reader.subscribe(topic, start=Start.EARLIEST)
                self.assertEqual((await sensor.publish(topic, b"21.5")).offset, 0)
                self.assertEqual((await subscription.get()).value, b"21.5")
                for denied in (sensor.publish("alerts", b"x"), sensor.subscribe(topic),
                               reader.publish(topic, b"x"), reader.create_topic("private")):
                    with self.assertRaises(ZaichikError) as caught:
                        await denied
                    self.assertEqual(caught.exception.code, ErrorCode.NOT_AUTHORIZED)
                self.assertIsNone(await sensor.ping())  # denied requests leave it open
            finally:
                await reader.close()
                await sensor.close()

        async def both():
            await check("tcp")
            await check("tls")

        return ensureDeferred(both())


class ReviewFixTests(Harness):
    def test_denied_made_up_names_are_not_cached(self):
        sensor = self.login("sensor")
        self.exchange(sensor, *[codec.Publish(0, f"nope/{i}", b"x") for i in range(100)])
        self.assertEqual(sensor[0].session._allowed, {})

    def test_checks_in_flight_wait_and_are_not_failures(self):
        # (This test once said the opposite: checks in flight counted as
        # failures, and 7 of 12 valid HELLOs at once were refused.)
        pending = []

        def held(f, *args):
            d = Deferred()
            pending.append((f, args, d))
            return d

        (checker,) = set(self.auth.portal.checkers.values())
        checker._run = held
        connections = [self.connect() for _ in range(12)]  # one peer address (StringTransport's)
        replies = [self.exchange(c, codec.Hello(1, "", TOKENS["sensor"])) for c in connections]
        self.assertEqual(replies, [[]] * 12)  # none refused: they wait
        self.assertLessEqual(len(pending), self.auth.max_concurrent_checks)
        answered = 0
        while pending:
            f, args, d = pending.pop(0)
            d.callback(f(*args))
            answered += 1
        self.assertEqual(answered, 12)
        self.assertEqual([self.exchange(c) for c in connections], [[codec.Ok(1)]] * 12)


# -- the limiter: failures per peer, and the scrypt work bounded broker-wide ----------


class HeldChecks:
    """
    A L{PortalAuthenticator} over the real checker and realm, whose scrypt
    checks wait until the test answers them (oldest first), instead of
    running in a thread.
    """

    def make(self, **limits) -> PortalAuthenticator:
        from twisted.cred.portal import Portal

        from zaichik.auth import PermissionsRealm, TokenFileChecker

        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        credentials = parse_credentials(credentials_text(TOKENS))
        self.running: List[tuple] = []
        self.checked = 0
        portal = Portal(PermissionsRealm(credentials), [TokenFileChecker(credentials, run=self._held)])
        self.auth = PortalAuthenticator(portal, clock=self.clock, **limits)
        return self.auth

    def _held(self, f, *args):
        d = Deferred()
        self.running.append((f, args, d))
        return d

    def answer(self, n: int = 1) -> None:
        """Answer the C{n} oldest running checks."""
        for _ in range(n):
            f, args, d = self.running.pop(0)
            self.checked += 1
            d.callback(f(*args))

    def answer_all(self, limit: int = 10_000) -> None:
        while self.running and limit:
            self.answer()
            limit -= 1

    def hello(self, peer: str, token: str, client_id: str = "") -> list:
        """Authenticate; the list holds the outcome (Permissions or a Failure) once there is one."""
        outcome: list = []
        self.auth.authenticate(client_id, token, peer).addBoth(outcome.append)
        return outcome

    def ok(self, outcome: list) -> bool:
        return len(outcome) == 1 and not isinstance(outcome[0], Failure)

    def refused(self, outcome: list) -> str:
        """The refusal's message ('' if not refused, or not yet)."""
        if len(outcome) == 1 and isinstance(outcome[0], Failure):
            outcome[0].trap(ZaichikError)
            self.assertEqual(outcome[0].value.code, ErrorCode.NOT_AUTHORIZED)
            return outcome[0].value.message
        return ""


class CountOnlyFailuresTests(HeldChecks, SynchronousTestCase):
    def test_twelve_valid_hellos_at_once_from_one_address(self):
        self.make()
        outcomes = [self.hello("10.0.0.1", TOKENS["sensor"]) for _ in range(12)]
        self.assertEqual([self.refused(o) for o in outcomes], [""] * 12)
        self.answer_all()
        self.assertEqual([self.ok(o) for o in outcomes], [True] * 12)

    def test_checks_beyond_the_bound_wait_in_a_queue(self):
        self.make(max_concurrent_checks=2)
        outcomes = [self.hello("10.0.0.1", TOKENS["sensor"]) for _ in range(12)]
        self.assertEqual(len(self.running), 2)  # the rest wait, unchecked and not refused
        self.assertEqual(outcomes, [[]] * 12)
        self.answer()
        self.assertTrue(self.ok(outcomes[0]))
        self.assertEqual(len(self.running), 2)

    def test_failures_still_limit_a_peer(self):
        auth = self.make(max_failures=5, max_concurrent_checks=2)
        outcomes = [self.hello("10.0.0.1", "sensor:guess") for _ in range(20)]
        self.answer_all()
        # At most max_failures + max_concurrent_checks - 1 guesses are checked.
        self.assertLessEqual(self.checked, auth.max_failures + auth.max_concurrent_checks - 1)
        messages = [self.refused(o) for o in outcomes]
        self.assertEqual(messages[:5], ["bad token"] * 5)
        self.assertEqual(set(messages[self.checked:]), {"too many failed attempts; try later"})
        # The right token too, now, unchecked, for the window; another peer is not affected.
        self.assertIn("too many failed attempts", self.refused(self.hello("10.0.0.1", TOKENS["sensor"])))
        other = self.hello("10.0.0.2", TOKENS["sensor"])
        self.answer_all()
        self.assertTrue(self.ok(other))
        self.clock.advance(auth.window)
        again = self.hello("10.0.0.1", TOKENS["sensor"])
        self.answer_all()
        self.assertTrue(self.ok(again))

    def test_a_valid_token_waits_behind_failing_ones_of_its_peer(self):
        # Its peer's failures refuse it once they reach the limit, and not before.
        self.make(max_failures=5, max_concurrent_checks=1)
        bad = [self.hello("10.0.0.1", "sensor:guess") for _ in range(3)]
        good = self.hello("10.0.0.1", TOKENS["sensor"])
        self.answer_all()
        self.assertEqual([self.refused(o) for o in bad], ["bad token"] * 3)
        self.assertTrue(self.ok(good))

    def test_a_bad_client_id_is_a_failure(self):
        self.make(max_failures=2)
        for _ in range(2):
            outcome = self.hello("10.0.0.1", TOKENS["sensor"], client_id="reader-1")
            self.answer_all()
            self.assertIn("may not use client_id", self.refused(outcome))
        self.assertIn("too many failed", self.refused(self.hello("10.0.0.1", TOKENS["sensor"])))

    def test_a_peer_cannot_queue_without_bound(self):
        self.make(max_concurrent_checks=2, max_waiting_per_peer=10)
        outcomes = [self.hello("10.0.0.1", TOKENS["sensor"]) for _ in range(13)]
        self.assertEqual(len(self.running), 2)
        messages = [self.refused(o) for o in outcomes]
        self.assertEqual(messages[:12], [""] * 12)  # 2 running, 10 waiting
        self.assertIn("waiting", messages[12])
        self.assertNotIn("failed", messages[12])
        self.answer_all()
        self.assertEqual(sum(self.ok(o) for o in outcomes), 12)
        # Unchecked refusals for being busy are not failures.
        self.assertEqual(self.auth._peers, {})

    def test_an_oversized_token_is_refused_unchecked(self):
        self.make()
        outcome = self.hello("10.0.0.1", "sensor:" + "x" * 5000)
        self.assertEqual(self.running, [])
        self.assertEqual(self.refused(outcome), "a token is NAME:SECRET (at most 1024 characters)")

    def test_a_cancelled_check_that_waits_is_never_run(self):
        self.make(max_concurrent_checks=1)
        first = self.auth.authenticate("", TOKENS["sensor"], "10.0.0.1")
        second = self.auth.authenticate("", TOKENS["sensor"], "10.0.0.1")
        outcome: list = []
        second.addErrback(outcome.append)
        second.cancel()
        self.assertEqual(len(outcome), 1)
        self.answer_all()
        self.assertEqual(self.checked, 1)
        self.assertIsInstance(self.successResultOf(first), Permissions)
        # A cancelled running check just runs to its end.
        third = self.auth.authenticate("", TOKENS["sensor"], "10.0.0.1")
        third.addErrback(lambda f: None)
        third.cancel()
        self.answer_all()
        self.assertEqual(self.checked, 2)
        self.assertEqual(self.auth._peers, {})

    def test_state_for_peers_is_forgotten(self):
        auth = self.make(max_concurrent_checks=2)
        for i in range(3000):
            self.hello(f"10.1.{i // 256}.{i % 256}", "sensor:guess")
            self.answer_all()
        self.assertGreater(len(auth._peers), 1000)
        self.clock.advance(auth.window)
        for i in range(3000):  # new peers, answered at once: the old ones' failures have expired
            self.hello(f"10.2.{i // 256}.{i % 256}", TOKENS["sensor"])
            self.answer_all()
        self.assertLess(len(auth._peers), 1000)


class ScryptWorkBoundTests(HeldChecks, SynchronousTestCase):
    SPRAY = [f"10.3.0.{x}" for x in range(2, 62)]  # 60 addresses

    def spray(self, each: int) -> list:
        return [self.hello(peer, f"sensor:guess-{i}") for i in range(each) for peer in self.SPRAY]

    def test_concurrent_checks_bounded_broker_wide(self):
        auth = self.make()
        outcomes = self.spray(4)
        self.assertLessEqual(len(self.running), 8)
        self.assertEqual(len(self.running), auth.max_concurrent_checks)
        self.answer_all()
        self.assertTrue(all(self.refused(o) for o in outcomes))

    def test_a_clean_peer_is_checked_before_suspect_ones(self):
        self.make(max_concurrent_checks=2, max_suspect_waiting=1000)
        self.spray(1)
        self.answer_all()  # every spraying address has failed once
        spray = self.spray(3)  # 180 checks from suspect addresses, 2 of them running
        self.assertEqual(len(self.running), 2)
        valid = self.hello("10.9.9.9", TOKENS["sensor"])
        self.answer(2)  # what was already running
        self.assertEqual(len(self.running), 2)
        self.answer(1)  # the valid one went first
        self.assertTrue(self.ok(valid))
        self.answer_all()
        self.assertEqual({self.refused(o) for o in spray}, {"bad token"})

    def test_a_fresh_spray_delays_a_valid_hello_by_one_check_an_address(self):
        # A spraying address that has not failed yet looks like any other:
        # each gets one check ahead of the valid HELLO, and no more.
        self.make()
        self.spray(4)
        valid = self.hello("10.9.9.9", TOKENS["sensor"])
        while not valid:
            self.answer()
        self.assertLessEqual(self.checked, len(self.SPRAY) + 8)
        self.answer_all()

    def test_clean_peers_take_turns(self):
        self.make(max_concurrent_checks=2)
        busy = [self.hello("10.0.0.1", TOKENS["sensor"]) for _ in range(10)]
        late = self.hello("10.0.0.2", TOKENS["reader"])
        while not late:
            self.answer()
        # The two running when it came, one turn of 10.0.0.1's, and its own.
        self.assertEqual(self.checked, 4)
        self.assertTrue(self.ok(late))
        self.answer_all()
        self.assertEqual(sum(self.ok(o) for o in busy), 10)

    def test_checks_from_suspect_peers_are_bounded(self):
        auth = self.make(max_concurrent_checks=2, max_suspect_waiting=20)
        self.spray(1)
        self.answer_all()
        spray = self.spray(1)  # 60 checks from suspect addresses
        messages = [self.refused(o) for o in spray]
        # 2 running, 20 waiting, the rest refused unchecked (and not as failures).
        self.assertEqual(messages[:22], [""] * 22)
        self.assertEqual(set(messages[22:]), {"authentication is busy; try later"})
        self.assertEqual(len(self.running), 2)
        self.answer_all()
        self.assertEqual(self.checked, 60 + 22)
        # A clean peer is not refused for it.
        self.spray(1)
        valid = self.hello("10.9.9.9", TOKENS["sensor"])
        self.answer_all()
        self.assertTrue(self.ok(valid))
        self.assertEqual(auth._suspect_waiting, 0)


# -- peers on unix sockets ----------------------------------------------------------


class FakeHandle:
    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.credentials = struct.pack("3i", pid, uid, gid)

    def getsockopt(self, level, option, size):
        assert (level, option, size) == (socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return self.credentials


class FakeTransport:
    def __init__(self, address, handle=None) -> None:
        self.address, self.handle = address, handle

    def getPeer(self):
        return self.address

    def getHandle(self):
        return self.handle


class PeerKeyTests(HeldChecks, SynchronousTestCase):
    def test_tcp_peers_by_address(self):
        from twisted.internet.address import IPv4Address, IPv6Address

        from zaichik.auth import peer_key

        self.assertEqual(peer_key(FakeTransport(IPv4Address("TCP", "10.0.0.1", 1234))), "10.0.0.1")
        self.assertEqual(peer_key(FakeTransport(IPv6Address("TCP", "::1", 1234))), "::1")
        self.assertEqual(peer_key(StringTransport()), "192.168.1.1")

    def test_unix_peers_by_uid(self):
        from twisted.internet.address import UNIXAddress

        from zaichik.auth import peer_key

        alice = FakeTransport(UNIXAddress(None), FakeHandle(100, 1000, 1000))
        alice2 = FakeTransport(UNIXAddress(None), FakeHandle(101, 1000, 50))
        bob = FakeTransport(UNIXAddress(None), FakeHandle(102, 1001, 1001))
        self.assertEqual(peer_key(alice), "unix:uid=1000")
        self.assertEqual(peer_key(alice2), "unix:uid=1000")
        self.assertEqual(peer_key(bob), "unix:uid=1001")
        # Without credentials (no SO_PEERCRED on this platform or transport): one key.
        self.assertEqual(peer_key(FakeTransport(UNIXAddress(None), object())), "unix")

    def test_one_user_locked_out_does_not_lock_out_another(self):
        from twisted.internet.address import UNIXAddress

        from zaichik.auth import peer_key

        self.make(max_failures=5)
        alice = peer_key(FakeTransport(UNIXAddress(None), FakeHandle(100, 1000, 1000)))
        bob = peer_key(FakeTransport(UNIXAddress(None), FakeHandle(102, 1001, 1001)))
        for _ in range(5):
            self.hello(alice, "sensor:guess")
            self.answer_all()
        self.assertIn("too many failed", self.refused(self.hello(alice, TOKENS["sensor"])))
        outcome = self.hello(bob, TOKENS["sensor"])
        self.answer_all()
        self.assertTrue(self.ok(outcome))

    def test_real_socket_pair(self):
        from twisted.internet.address import UNIXAddress

        from zaichik.auth import peer_key

        if not hasattr(socket, "SO_PEERCRED"):
            raise SkipTest("no SO_PEERCRED on this platform")
        a, b = socket.socketpair(socket.AF_UNIX)
        with a, b:
            self.assertEqual(peer_key(FakeTransport(UNIXAddress(None), a)), f"unix:uid={os.getuid()}")


class UnixListenerTests(TestCase):
    """A broker listening on a unix socket, in process; clients are this process and (as root) another user's."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="zaichik-unix-")
        self.addCleanup(shutil.rmtree, self.directory)
        os.chmod(self.directory, 0o755)
        self.path = os.path.join(self.directory, "broker.sock")
        credentials = os.path.join(self.directory, "credentials")
        with open(credentials, "w") as f:
            f.write(credentials_text(TOKENS))
        self.auth = PortalAuthenticator.from_file(credentials, run=inline)
        factory = BrokerFactory(BrokerService(authenticator=self.auth))
        self.sessions: list = []
        build = factory.buildProtocol

        def buildProtocol(addr):
            protocol = build(addr)
            self.sessions.append(protocol)
            return protocol

        factory.buildProtocol = buildProtocol
        port = reactor.listenUNIX(self.path, factory, mode=0o777)
        self.addCleanup(port.stopListening)

    def test_peer_is_the_uid(self):
        if not hasattr(socket, "SO_PEERCRED"):
            raise SkipTest("no SO_PEERCRED on this platform")

        async def two():
            clients = [await connect(reactor, server=f"unix:path={self.path}", token=TOKENS["sensor"],
                                     keepalive=0) for _ in range(2)]
            try:
                self.assertEqual([p.session.peer for p in self.sessions], [f"unix:uid={os.getuid()}"] * 2)
            finally:
                for client in clients:
                    await client.close()

        return ensureDeferred(two())

    def test_another_users_process_is_not_locked_out(self):
        if not hasattr(socket, "SO_PEERCRED"):
            raise SkipTest("no SO_PEERCRED on this platform")
        if os.getuid() != 0:
            raise SkipTest("needs root, to run a client as another user")
        from twisted.internet.threads import deferToThread

        # An interpreter the other user may run (the script needs only socket).
        for python in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
            try:
                if subprocess.run([python, "-I", "-S", "-c", "pass"], user=65534, cwd="/",
                                  capture_output=True, timeout=30).returncode == 0:
                    break
            except OSError:
                pass
        else:
            raise SkipTest("no Python interpreter that user 65534 may run")

        def hello_as(uid: int, token: str) -> str:
            """A HELLO from a process of C{uid}; the reply's message, or OK."""
            script = ("import socket, sys\n"
                      "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
                      "s.sendall(bytes.fromhex(sys.argv[2])); data = b''\n"
                      "while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], 'big'):\n"
                      "    chunk = s.recv(4096)\n"
                      "    if not chunk: break\n"
                      "    data += chunk\n"
                      "print(data.hex())\n")
            frame = codec.frame(codec.Hello(1, "", token).encode()).hex()
            done = subprocess.run([python, "-I", "-S", "-c", script, self.path, frame],
                                  user=uid, capture_output=True, text=True, timeout=30, cwd="/")
            data = bytes.fromhex(done.stdout.strip())
            reply = codec.decode_reply(data[4:])
            return "OK" if isinstance(reply, codec.Ok) else reply.message

        async def run():
            for _ in range(5):
                self.assertEqual(await deferToThread(hello_as, 0, "sensor:guess"), "bad token")
            self.assertIn("too many failed", await deferToThread(hello_as, 0, TOKENS["sensor"]))
            # Another user's process on the same socket is not locked out.
            self.assertEqual(await deferToThread(hello_as, 65534, TOKENS["sensor"]), "OK")
            self.assertEqual(sorted({p.session.peer for p in self.sessions}), ["unix:uid=0", "unix:uid=65534"])

        return ensureDeferred(run())
