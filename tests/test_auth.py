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
import tempfile
from typing import List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zaichik import codec
from zaichik.auth import (
    CredentialsFileError,
    Patterns,
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
from zaichik.testing import BrokerProcess, free_port

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
        tls_port = free_port()
        broker = BrokerProcess("--auth", auth, "--port",
                               f"ssl:{tls_port}:privateKey={files.key}:certKey={files.cert}:interface=127.0.0.1")
        broker.start()
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

    def test_checks_in_flight_count_against_the_limit(self):
        pending = []

        def never_answers(f, *args):
            pending.append(args)
            return Deferred()

        (checker,) = set(self.auth.portal.checkers.values())
        checker._run = never_answers
        for _ in range(5):
            self.exchange(self.connect(), codec.Hello(1, "", "sensor:guess"))
        self.assertEqual(len(pending), 5)
        replies = self.exchange(self.connect(), codec.Hello(1, "", "sensor:guess"))
        self.assertEqual(len(pending), 5)  # the sixth was refused unchecked
        self.assertEqual(replies[0].code, ErrorCode.NOT_AUTHORIZED)
