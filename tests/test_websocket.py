"""
The WebSocket framer (L{zaichik.edge.websocket}) over L{StringTransport}
with a L{task.Clock}, as the TCP framer's tests: the handshake and its
refusals (subprotocol, origin), binary messages in and out, text messages,
fragmented and bad frames, the frame size limit, holds, backpressure with a
peer that never reads, and the slow-consumer policy.
"""

from __future__ import annotations

import base64
from unittest import mock
from typing import List, Optional, Sequence

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.edge import tcp as tcp_edge
from zaichik.edge import websocket as websocket_edge
from zaichik.edge.connection import CLOSE_GRACE
from zaichik.edge.tcp import BrokerFactory
from zaichik.edge.websocket import (BINARY, CLOSE, CONTINUATION, HANDSHAKE_TIMEOUT, PING, PONG, SUBPROTOCOL, TEXT,
                                    WebSocketFactory, accept_key, encode_frame, parse_messages, unmask)
from zaichik.service import BrokerService, Limits
from zaichik.session import Session
from zaichik.testing import parse_frames

from tests.test_publish_runs import counted

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

KEY = base64.b64encode(b"0123456789abcdef").decode("ascii")
MASK = b"\x01\x02\x03\x04"


def handshake(origin: Optional[str] = None, protocol: Optional[str] = SUBPROTOCOL, host: str = "broker:8890",
              extra: Sequence[str] = ()) -> bytes:
    lines = ["GET / HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: keep-alive, Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13", *extra]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def message(request, opcode: int = BINARY) -> bytes:
    body = request if isinstance(request, bytes) else request.encode()
    return encode_frame(opcode, body, MASK)


class WSConnection:
    """One WebSocket connection on a L{StringTransport}, handshake done unless told."""

    def __init__(self, factory: WebSocketFactory, shake: Optional[bytes] = None) -> None:
        self.transport = StringTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(handshake() if shake is None else shake)
        value = self.transport.value()
        self.head, _, rest = value.partition(b"\r\n\r\n")
        self.transport.clear()
        self._rest = rest

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send(self, *requests) -> None:
        self.feed(b"".join(message(r) for r in requests))

    def messages(self) -> list:
        """C{(opcode, payload)} of each WebSocket message written since the last call."""
        data = self._rest + self.transport.value()
        self.transport.clear()
        out, used = parse_messages(data)
        self.assert_whole(data, used)
        self._rest = b""
        return out

    @staticmethod
    def assert_whole(data: bytes, used: int) -> None:
        assert used == len(data), f"a partial WebSocket frame written: {data[used:]!r}"

    def received(self) -> list:
        """The broker's frames since the last call, each from one binary message."""
        out = []
        for opcode, payload in self.messages():
            if opcode == CLOSE:
                self.closed_with = payload
                continue
            assert opcode == BINARY, f"expected binary messages only, got opcode {opcode}"
            out.append(codec.decode_reply(payload))
        return out

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.protocol.connectionLost(None)


class WebSocketTestCase(SynchronousTestCase):
    limits = Limits()
    origins: Sequence[str] = ()
    max_frame_size = codec.DEFAULT_MAX_FRAME_SIZE

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.service = BrokerService(clock=self.clock, limits=self.limits)
        self.factory = WebSocketFactory(self.service, self.max_frame_size, self.origins)

    def connect(self, shake: Optional[bytes] = None) -> WSConnection:
        return WSConnection(self.factory, shake)

    def assertOpen(self, conn: WSConnection) -> None:
        conn.send(codec.Ping(4242))
        self.assertEqual(conn.received(), [codec.Ok(4242)])
        self.assertFalse(conn.closing)


class HandshakeTests(WebSocketTestCase):
    def test_accepts_with_the_subprotocol(self):
        conn = self.connect()
        self.assertTrue(conn.head.startswith(b"HTTP/1.1 101 "), conn.head)
        self.assertIn(f"Sec-WebSocket-Accept: {accept_key(KEY)}".encode("ascii"), conn.head)
        self.assertIn(b"Sec-WebSocket-Protocol: zaichik.v1", conn.head)
        self.assertEqual(self.service.connections, 1)
        self.assertOpen(conn)

    def test_accept_key_of_rfc_6455(self):
        """The example of RFC 6455 section 1.3."""
        self.assertEqual(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_handshake_in_pieces_then_frames_in_the_same_read(self):
        transport = StringTransport()
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        data = handshake() + message(codec.Ping(7))
        for i in range(len(data)):
            protocol.dataReceived(data[i:i + 1])
        head, _, rest = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b" 101 ", head)
        out, _ = parse_messages(rest)
        self.assertEqual([codec.decode_reply(p) for _, p in out], [codec.Ok(7)])

    def refused(self, shake: bytes, status: bytes) -> WSConnection:
        before = self.service.connections
        conn = self.connect(shake)
        self.assertTrue(conn.head.startswith(b"HTTP/1.1 " + status), conn.head)
        self.assertTrue(conn.closing)
        self.assertEqual(self.service.connections, before)
        conn.lose()
        self.assertEqual(self.service.connections, before)
        return conn

    def test_refused_without_the_subprotocol(self):
        conn = self.refused(handshake(protocol=None), b"400")
        self.assertIn(b"zaichik.v1", conn._rest)
        self.refused(handshake(protocol="mqtt"), b"400")

    def test_subprotocol_among_others(self):
        conn = self.connect(handshake(protocol="mqtt, zaichik.v1"))
        self.assertIn(b"Sec-WebSocket-Protocol: zaichik.v1", conn.head.split(b"\r\n"))

    def test_refused_when_not_a_websocket(self):
        self.refused(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"426")
        self.refused(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"400")
        self.refused(handshake().replace(b"Version: 13", b"Version: 8"), b"426")
        self.refused(handshake().replace(KEY.encode(), b"short"), b"400")

    def test_handshake_too_large(self):
        transport = StringTransport()
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 20_000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431"))
        self.assertTrue(transport.disconnecting)

    def test_handshake_timeout(self):
        transport = StringTransport()
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(transport.disconnected)  # aborted: StringTransport.abortConnection
        protocol.connectionLost(None)
        self.assertEqual(self.service.connections, 0)

    def test_default_origin_is_the_listeners_host(self):
        """Same host name, any port (the console on --metrics-port); no Origin (not a browser): allowed."""
        self.assertOpen(self.connect(handshake(origin="http://broker:8890")))
        self.assertOpen(self.connect(handshake(origin="http://broker:9102")))
        self.assertOpen(self.connect(handshake(origin=None)))
        self.refused(handshake(origin="https://evil.example"), b"403")
        self.refused(handshake(origin="null"), b"403")


class OriginListTests(WebSocketTestCase):
    origins = ("https://app.example.com",)

    def test_only_the_listed_origins(self):
        self.assertOpen(self.connect(handshake(origin="https://app.example.com")))
        self.assertOpen(self.connect(handshake(origin="https://APP.example.com/")))
        conn = self.connect(handshake(origin="http://broker:8890"))
        self.assertIn(b"403", conn.head)
        self.assertIn(b"--websocket-origin", conn._rest)


class AnyOriginTests(WebSocketTestCase):
    origins = ("*",)

    def test_any(self):
        self.assertOpen(self.connect(handshake(origin="https://anywhere.example")))


class MessageTests(WebSocketTestCase):
    max_frame_size = 1024

    def test_one_frame_per_binary_message_either_way(self):
        conn = self.connect()
        conn.send(codec.CreateTopic(1, "t"), codec.Subscribe(2, "t"), codec.Publish(3, "t", b"v", b"k"))
        replies = conn.received()
        self.assertEqual(replies[:3], [codec.Ok(1), codec.Ok(2), codec.Published(3, 0, False)])
        self.assertEqual((replies[3].topic, replies[3].value, replies[3].key), ("t", b"v", b"k"))

    def test_many_messages_delivered_in_one_write_are_separate_messages(self):
        subscriber = self.connect()
        subscriber.send(codec.Subscribe(1, "t", Start.LATEST))
        subscriber.received()
        publisher = self.connect()
        publisher.send(*[codec.Publish(0, "t", b"x" * 200) for _ in range(50)])
        self.assertEqual([m.offset for m in subscriber.received()], list(range(50)))

    def test_runs_of_publishes_as_one_by_one(self):
        """
        Fire-and-forget PUBLISHes interleaved over two topics with a text
        message, a PUBLISH with a rid, a fragmented message and a refused
        one, in one read: read as runs (Session.publish_run) the replies
        and each topic's messages are those of a message at a time.
        """
        frames = [message(codec.Publish(0, "a" if i % 2 else "b", b"%d" % i)) for i in range(10)]
        frames[3] = encode_frame(TEXT, b"hello", MASK)
        frames[5] = message(codec.Publish(7, "a", b"seven"))
        fragmented = codec.Publish(0, "b", b"frag").encode()
        frames[6] = (bytes((BINARY, 0x80 | 5)) + MASK + unmask(fragmented[:5], MASK)
                     + encode_frame(CONTINUATION, fragmented[5:], MASK))
        frames[8] = message(codec.Publish(0, "", b"v"))  # (no such topic name: BAD_TOPIC)
        outcomes = []
        for runs in (True, False):
            self.setUp()
            subscriber = self.connect()
            subscriber.send(codec.Subscribe(1, "a", Start.LATEST), codec.Subscribe(2, "b", Start.LATEST))
            subscriber.received()
            publisher = self.connect()
            with mock.patch.object(Session, "may_publish_runs", runs):
                publisher.feed(b"".join(frames))
            got = subscriber.received()
            outcomes.append((publisher.received(), sorted((m.topic, m.offset, m.value) for m in got)))
        self.assertEqual(outcomes[0], outcomes[1])
        replies, messages = outcomes[0]
        self.assertEqual([(type(r), r.rid) for r in replies],
                         [(codec.Error, 0), (codec.Published, 7), (codec.Error, 0)])
        self.assertEqual(len(messages), 8)

    def test_a_declined_run_is_not_read_again_message_after_message(self):
        """As over TCP (tests/test_publish_runs.py): a run declined is read once, not once a message."""
        publisher = self.connect()
        publisher.send(codec.CreateTopic(1, "t", 60_000, 0))
        publisher.received()
        self.service.engine = object()  # (only publish_run's "is there an engine" is asked of it here)
        with counted(websocket_edge, "parse_ws_publish_run") as calls:
            publisher.send(*[codec.Publish(0, "t", b"v")] * 2000, codec.Publish(0, "", b"x"))
        self.assertLessEqual(len(calls), 3)
        self.assertEqual(self.service.topics["t"].next_offset, 2000)
        self.assertEqual([(r.rid, r.code) for r in publisher.received()], [(0, ErrorCode.BAD_TOPIC)])

    def test_text_message_is_bad_frame_and_the_connection_goes_on(self):
        conn = self.connect()
        conn.feed(encode_frame(TEXT, b"hello", MASK))
        [error] = conn.received()
        self.assertEqual(ErrorCode(error.code), ErrorCode.BAD_FRAME)
        self.assertIn("text message", error.message)
        self.assertOpen(conn)

    def test_fragmented_text_message_is_one_bad_frame(self):
        conn = self.connect()
        conn.feed(bytes((TEXT, 0x80 | 2)) + MASK + unmask(b"he", MASK)
                  + bytes((0x80 | CONTINUATION, 0x80 | 2)) + MASK + unmask(b"lo", MASK))
        self.assertEqual([ErrorCode(e.code) for e in conn.received()], [ErrorCode.BAD_FRAME])
        self.assertOpen(conn)

    def test_bad_frame_body_is_answered_as_over_tcp(self):
        conn = self.connect()
        conn.send(b"\xee\x00\x00\x00\x05")
        [error] = conn.received()
        self.assertEqual((error.rid, ErrorCode(error.code)), (5, ErrorCode.UNKNOWN_OPCODE))
        conn.send(b"")  # an empty message: an empty frame
        self.assertEqual([ErrorCode(e.code) for e in conn.received()], [ErrorCode.BAD_FRAME])
        self.assertOpen(conn)

    def test_fragmented_binary_message_is_one_frame(self):
        body = codec.Publish(9, "t", b"v" * 300).encode()
        conn = self.connect()
        first, second, third = body[:10], body[10:200], body[200:]
        conn.feed(bytes((BINARY, 0x80 | len(first))) + MASK + unmask(first, MASK)
                  + bytes((PING | 0x80, 0x80 | 2)) + MASK + unmask(b"hi", MASK)  # control frames may interleave
                  + bytes((CONTINUATION, 0x80 | 126)) + len(second).to_bytes(2, "big") + MASK + unmask(second, MASK)
                  + bytes((0x80 | CONTINUATION, 0x80 | 126)) + len(third).to_bytes(2, "big") + MASK
                  + unmask(third, MASK))
        self.assertEqual(conn.messages(), [(PONG, b"hi"), (BINARY, codec.Published(9, 0, False).encode())])

    def test_a_message_split_over_reads(self):
        conn = self.connect()
        data = message(codec.Publish(1, "t", b"v" * 500)) + message(codec.Ping(2))
        for i in range(0, len(data), 7):
            conn.feed(data[i:i + 7])
        self.assertEqual(conn.received(), [codec.Published(1, 0, False), codec.Ok(2)])
        self.assertEqual(self.service.stats.pending_input, 0)

    def test_frame_over_the_limit_is_frame_too_large_and_closes(self):
        conn = self.connect()
        conn.feed(message(codec.Publish(1, "t", b"v" * 2000))[:20])  # the header says enough
        [error] = conn.received()[:1]
        self.assertEqual(ErrorCode(error.code), ErrorCode.FRAME_TOO_LARGE)
        self.assertTrue(conn.closing)
        self.assertEqual(self.service.topics.get("t"), None)

    def test_too_large_closes_with_1009(self):
        conn = self.connect()
        conn.feed(message(b"\x05" * 2000)[:4])
        self.assertEqual(conn.messages()[-1], (CLOSE, (1009).to_bytes(2, "big")))

    def test_fragments_over_the_limit(self):
        conn = self.connect()
        piece = b"x" * 600
        conn.feed(bytes((BINARY, 0x80 | 126)) + len(piece).to_bytes(2, "big") + MASK + piece
                  + bytes((CONTINUATION, 0x80 | 126)) + len(piece).to_bytes(2, "big") + MASK)
        self.assertEqual(ErrorCode(conn.received()[0].code), ErrorCode.FRAME_TOO_LARGE)
        self.assertTrue(conn.closing)

    def test_unmasked_frame_is_a_protocol_error(self):
        conn = self.connect()
        conn.feed(encode_frame(BINARY, codec.Ping(1).encode()))  # no mask: a server's frame
        out = conn.messages()
        self.assertEqual(ErrorCode(codec.decode_reply(out[0][1]).code), ErrorCode.BAD_FRAME)
        self.assertEqual(out[1], (CLOSE, (1002).to_bytes(2, "big")))
        self.assertTrue(conn.closing)

    def test_reserved_bits_and_long_control_frames(self):
        for bad in (bytes((0x80 | 0x40 | BINARY, 0x80)) + MASK,
                    bytes((0x80 | PING, 0x80 | 126)) + (200).to_bytes(2, "big") + MASK + b"p" * 200,
                    bytes((0x80 | CONTINUATION, 0x80 | 1)) + MASK + b"x",
                    bytes((0x80 | 0x3, 0x80)) + MASK):
            conn = self.connect()
            conn.feed(bad)
            self.assertEqual(conn.messages()[-1], (CLOSE, (1002).to_bytes(2, "big")), bad)
            self.assertTrue(conn.closing)

    def test_ping_is_answered_with_pong(self):
        conn = self.connect()
        conn.feed(encode_frame(PING, b"are you there", MASK))
        self.assertEqual(conn.messages(), [(PONG, b"are you there")])

    def test_client_close_is_answered_and_closes(self):
        conn = self.connect()
        conn.send(codec.Subscribe(1, "t"))
        conn.received()
        conn.feed(encode_frame(CLOSE, (1001).to_bytes(2, "big") + b"bye", MASK))
        self.assertEqual(conn.messages(), [(CLOSE, (1001).to_bytes(2, "big"))])
        self.assertTrue(conn.closing)
        self.assertEqual(self.service.topics["t"].subscribers, [])

    def test_close_request_ends_with_a_close_frame(self):
        conn = self.connect()
        conn.send(codec.Close(3))
        self.assertEqual(conn.messages(), [(BINARY, codec.Ok(3).encode()), (CLOSE, (1000).to_bytes(2, "big"))])
        self.assertTrue(conn.closing)
        conn.lose()
        self.assertEqual(self.service.connections, 0)

    def test_tcp_publisher_websocket_subscriber(self):
        subscriber = self.connect()
        subscriber.send(codec.Subscribe(1, "mixed", Start.LATEST))
        subscriber.received()
        tcp = BrokerFactory(self.service).buildProtocol(None)
        transport = StringTransport()
        tcp.makeConnection(transport)
        tcp.dataReceived(codec.frame(codec.Publish(1, "mixed", b"from tcp").encode()))
        self.assertEqual(parse_frames(transport.value()), [codec.Published(1, 0, False)])
        [delivered] = subscriber.received()
        self.assertEqual(delivered.value, b"from tcp")


class LargeMessageTests(WebSocketTestCase):
    max_frame_size = 1 << 20

    def test_a_large_message_in_many_reads(self):
        """Collected in pieces (not copied at every read), counted as pending input, then handled."""
        conn = self.connect()
        data = message(codec.Publish(1, "big", b"v" * 600_000)) + message(codec.Ping(2))
        for i in range(0, len(data) - 20_000, 10_000):
            conn.feed(data[i:i + 10_000])
            self.assertEqual(self.service.stats.pending_input, i + 10_000)
        self.assertEqual(conn.received(), [])
        self.assertEqual(conn.protocol._waiting_for, len(data) - len(message(codec.Ping(2))))
        conn.feed(data[i + 10_000:])
        self.assertEqual(conn.received(), [codec.Published(1, 0, False), codec.Ok(2)])
        self.assertEqual(self.service.stats.pending_input, 0)


class LimitTests(WebSocketTestCase):
    limits = Limits(max_connections=1, idle_timeout=30, frame_timeout=5)

    def test_connection_limit_counts_websockets(self):
        first = self.connect()
        second = self.connect()  # turned away before its handshake is read
        self.assertTrue(second.head.startswith(b"HTTP/1.1 503 "), second.head)
        self.assertTrue(second.closing)
        self.assertOpen(first)

    def test_connection_limit_after_handshakes_in_flight(self):
        """Two handshakes under way at the limit: the one finished second gets LIMIT, as over TCP."""
        transports, protocols = [], []
        for _ in range(2):
            transport, protocol = StringTransport(), self.factory.buildProtocol(None)
            protocol.makeConnection(transport)
            transports.append(transport)
            protocols.append(protocol)
        for protocol in protocols:
            protocol.dataReceived(handshake())
        _, _, rest = transports[1].value().partition(b"\r\n\r\n")
        out, _ = parse_messages(rest)
        self.assertEqual(ErrorCode(codec.decode_reply(out[0][1]).code), ErrorCode.LIMIT)
        self.assertTrue(transports[1].disconnecting)
        self.assertFalse(transports[0].disconnecting)

    def test_idle_timeout(self):
        conn = self.connect()
        self.clock.advance(29)
        conn.send(codec.Ping(1))
        self.clock.advance(29)
        self.assertFalse(conn.closing)
        self.clock.advance(1)
        self.assertTrue(conn.closing)

    def test_frame_timeout(self):
        conn = self.connect()
        conn.feed(message(codec.Ping(1))[:5])
        self.assertEqual(self.service.stats.pending_input, 5)
        self.clock.advance(5)
        self.assertEqual(ErrorCode(conn.received()[0].code), ErrorCode.LIMIT)
        self.assertTrue(conn.closing)
        conn.lose()
        self.assertEqual(self.service.stats.pending_input, 0)

    def test_close_grace_aborts_a_peer_that_never_reads(self):
        conn = self.connect()
        conn.send(codec.Close(1))
        self.assertFalse(conn.transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(conn.transport.disconnected)


class BackpressureTests(WebSocketTestCase):
    """A browser that never reads must not grow the broker's memory."""

    limits = Limits(max_output_buffer=5_000)

    def test_never_reading_subscriber_is_cut_off(self):
        slow = self.connect()
        slow.send(codec.Subscribe(1, "live", Start.LATEST))
        slow.received()
        slow.transport.producer.pauseProducing()  # its socket buffer is full
        publisher = self.connect()
        publisher.send(*[codec.Publish(0, "live", b"z" * 100) for _ in range(200)])
        written = len(slow.transport.value())
        self.assertTrue(slow.closing)
        self.assertEqual(self.service.stats.slow_consumer_disconnects, 1)
        self.assertLess(written, 5_000 + 2_000)
        publisher.send(*[codec.Publish(0, "live", b"z" * 100) for _ in range(200)])
        self.assertEqual(len(slow.transport.value()), written)  # nothing more for it

    def test_replies_are_flow_controlled(self):
        conn = self.connect()
        conn.transport.producer.pauseProducing()
        self.assertEqual(conn.transport.producerState, "paused")  # we stopped reading it
        conn.send(codec.Ping(1), codec.Ping(2))
        self.assertEqual(conn.received(), [])
        conn.transport.producer.resumeProducing()
        self.assertEqual(conn.received(), [codec.Ok(1), codec.Ok(2)])


class RetainedBackpressureTests(WebSocketTestCase):
    limits = Limits(max_output_buffer=1_000)

    def test_retained_topic_waits_on_the_log(self):
        slow = self.connect()
        slow.send(codec.CreateTopic(1, "kept", retention_ttl=60_000), codec.Subscribe(2, "kept"))
        slow.received()
        slow.transport.producer.pauseProducing()
        publisher = self.connect()
        publisher.send(*[codec.Publish(0, "kept", b"y" * 100) for _ in range(200)])
        self.assertLess(len(slow.transport.value()), 3_000)
        self.assertFalse(slow.closing)
        slow.transport.producer.resumeProducing()
        self.assertEqual([m.offset for m in slow.received()], list(range(200)))


class BlockPolicyTests(WebSocketTestCase):
    limits = Limits(max_output_buffer=2_000, slow_consumer="block")

    def test_websocket_publisher_held_until_the_subscriber_drains(self):
        slow = self.connect()
        slow.send(codec.Subscribe(1, "live", Start.LATEST))
        slow.received()
        slow.transport.producer.pauseProducing()
        publisher = self.connect()
        frames: List[codec.Publish] = [codec.Publish(0, "live", b"z" * 100) for _ in range(40)]
        for i in range(0, 40, 10):
            publisher.send(*frames[i:i + 10])
        self.assertEqual(publisher.transport.producerState, "paused")
        topic = self.service.topics["live"]
        self.assertLess(topic.next_offset, 40)
        slow.transport.producer.resumeProducing()
        self.assertEqual(topic.next_offset, 40)
        self.assertEqual([m.offset for m in slow.received()], list(range(40)))


def _conversation() -> bytes:
    """A conversation's bytes from a browser: whole, fragmented and control frames, a text message."""
    publish = codec.Publish(7, "chat", b"v" * 300, b"k").encode()
    return (handshake()
            + message(codec.CreateTopic(1, "chat", 60_000, 0)) + message(codec.Subscribe(2, "chat"))
            + bytes((BINARY, 0x80 | 100)) + MASK + unmask(publish[:100], MASK)
            + encode_frame(PING, b"p", MASK)
            + bytes((0x80 | CONTINUATION, 0x80 | 126)) + (len(publish) - 100).to_bytes(2, "big") + MASK
            + unmask(publish[100:], MASK)
            + encode_frame(TEXT, b"not a frame", MASK)
            + message(codec.Publish(0, "chat", b"fire and forget")) + message(codec.Commit(8, "chat", 1))
            + message(codec.ListTopics(9)) + message(codec.Ping(10)))


CONVERSATION = _conversation()


class ChunkingTests(WebSocketTestCase):
    """However a conversation is cut into reads, the broker answers the same, byte for byte."""

    def converse(self, chunks) -> tuple:
        """
        A fresh broker, one connection fed C{chunks}: (its replies and
        control frames, its MESSAGE frames), each as the messages' bytes
        (where a read ends decides when messages are delivered, not what).
        """
        self.setUp()
        transport = StringTransport()
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        head, _, rest = transport.value().partition(b"\r\n\r\n")
        out, used = parse_messages(rest)
        self.assertEqual(used, len(rest))
        self.assertIn(b" 101 ", head)
        is_message = [opcode == BINARY and payload[0] == codec.Opcode.MESSAGE.value for opcode, payload in out]
        return ([m for m, flag in zip(out, is_message) if not flag], [m for m, flag in zip(out, is_message) if flag])

    def test_the_conversation(self):
        answers, messages = self.converse([CONVERSATION])
        self.assertEqual([(opcode, codec.decode_reply(p) if opcode == BINARY else p) for opcode, p in answers], [
            (BINARY, codec.Ok(1)), (BINARY, codec.Ok(2)), (PONG, b"p"), (BINARY, codec.Published(7, 0, False)),
            (BINARY, codec.Error(0, int(ErrorCode.BAD_FRAME),
                                 "a text message: each frame travels in one binary message")),
            (BINARY, codec.Ok(8)), (BINARY, codec.Topics(9, [codec.TopicInfo("chat", 60_000, 0, 2, 2, 1)])),
            (BINARY, codec.Ok(10))])
        self.assertEqual([codec.decode_reply(p).offset for _, p in messages], [0, 1])

    def test_byte_at_a_time(self):
        whole = self.converse([CONVERSATION])
        self.assertEqual(self.converse([CONVERSATION[i:i + 1] for i in range(len(CONVERSATION))]), whole)

    if given is not None:

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(st.integers(min_value=0, max_value=len(CONVERSATION)), max_size=40))
        def test_random_chunks(self, cuts):
            whole = self.converse([CONVERSATION])
            points = [0] + sorted(cuts) + [len(CONVERSATION)]
            self.assertEqual(self.converse([CONVERSATION[a:b] for a, b in zip(points, points[1:])]), whole)


class BlocksTests(WebSocketTestCase):
    def test_a_units_blocks_to_a_websocket_subscriber(self):
        """A topic's blocks of two reads in one unit reach a WebSocket subscriber, in order. (From a review.)"""
        sub = self.connect()
        sub.send(codec.Subscribe(1, "t", Start.LATEST))
        sub.received()
        pub = self.connect()
        with self.service.work:
            pub.send(*[codec.Publish(0, "t", b"a%d" % i) for i in range(3)])
            pub.send(*[codec.Publish(0, "t", b"b%d" % i * 500) for i in range(3)])
        self.assertEqual([m.value for m in sub.received()],
                         [b"a0", b"a1", b"a2", b"b0" * 500, b"b1" * 500, b"b2" * 500])


class ReadAndWriteMarksTests(WebSocketTestCase):
    """
    A WebSocket connection's reads grow and shrink, and its output mark is
    OUTPUT_HIGH, as a TCP connection's (zaichik/edge/tcp.py): in Twisted's
    64 KiB reads a publisher's unit of work came 16 times as often
    (websocket.py: 0.49-0.51x TCP's rate, 0.78-0.83x with this).  On a real
    L{tcp.Server} over loopback: the marks live in Twisted's transport.
    """

    def setUp(self) -> None:
        super().setUp()
        import socket

        from twisted.internet import tcp
        from twisted.internet.testing import MemoryReactorClock

        with socket.create_server(("127.0.0.1", 0)) as listening:
            client = socket.create_connection(listening.getsockname())
            server, _ = listening.accept()
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = tcp.Server(server, self.protocol, ("127.0.0.1", 1), None, 1, MemoryReactorClock())
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(handshake())

    def test_read_size_follows_the_reads(self) -> None:
        self.assertEqual(self.transport.bufferSize, tcp_edge.READ_MIN)
        full = message(codec.Publish(0, "t", b"v" * (tcp_edge.READ_MIN - 100)))
        sizes = []
        published = 0
        for _ in range(6):
            count = self.transport.bufferSize // len(full) + 1
            self.protocol.dataReceived(full * count)
            published += count
            sizes.append(self.transport.bufferSize)
        self.assertEqual(sizes, [tcp_edge.READ_MIN << i for i in range(1, 5)] + [tcp_edge.READ_MAX] * 2)
        for _ in range(6):
            self.protocol.dataReceived(message(codec.Ping(0)))
            sizes.append(self.transport.bufferSize)
        self.assertEqual(sizes[6:], [tcp_edge.READ_MAX >> i for i in range(1, 5)] + [tcp_edge.READ_MIN] * 2)
        self.assertEqual(self.service.topics["t"].next_offset, published)

    def test_output_mark(self) -> None:
        self.assertEqual(self.transport.SEND_LIMIT, tcp_edge.SEND_LIMIT)
        waiting = len(self.transport.dataBuffer) + self.transport._tempDataLen  # (the handshake's answer)
        self.transport.write(b"x" * (tcp_edge.OUTPUT_HIGH - 1 - waiting))
        self.assertFalse(self.protocol.session.output.paused)
        self.transport.write(b"x" * 2)
        self.assertTrue(self.protocol.session.output.paused)

    def test_no_cycle_left_behind(self) -> None:
        self.assertIn("_isSendBufferFull", self.transport.__dict__)
        self.protocol.connectionLost(None)
        self.assertNotIn("_isSendBufferFull", self.transport.__dict__)
