"""
Slow, trickling and crowding clients at the network edge: a frame must be
complete within --frame-timeout of its first byte, incomplete frames count
against --max-pending-input, and one address may hold at most
--max-connections-per-address connections.  Deterministic: a Clock and
StringTransports.
"""

from __future__ import annotations

import struct

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from zaichik.codec import ErrorCode, Ok, Ping, Publish
from zaichik.service import Limits
from tests.test_protocol import BrokerTestCase, frames


def transport_from(host: str) -> StringTransport:
    return StringTransport(peerAddress=IPv4Address("TCP", host, 40000))


class FrameTimeoutTests(BrokerTestCase):
    def setUp(self) -> None:
        self.setUpBroker(limits=Limits(frame_timeout=10.0, idle_timeout=30.0))

    def test_a_client_trickling_one_byte_a_second_is_closed(self):
        """Before: every byte reset the idle timer, and the connection lived forever."""
        conn = self.connect()
        data = frames(Publish(1, "t", b"x" * 40))
        for byte in data[:11]:
            conn.feed(bytes([byte]))  # (each byte resets the idle timer)
            self.clock.advance(1)
        self.assertTrue(conn.transport.disconnecting)
        (error,) = conn.replies()
        self.assertEqual((error.rid, error.code), (0, ErrorCode.LIMIT))
        self.assertIn("not completed within 10 s", error.message)

    def test_frames_completed_in_time_keep_the_connection(self):
        conn = self.connect()
        for i in range(5):
            data = frames(Ping(i))
            conn.feed(data[:3])
            self.clock.advance(6)  # each frame takes 6 s of its 10
            conn.feed(data[3:])
        self.assertEqual(conn.replies(), [Ok(i) for i in range(5)])
        self.assertFalse(conn.transport.disconnecting)

    def test_the_timer_is_for_the_frame_not_the_connection(self):
        """A new frame that begins in the read that completes the last one gets its own 10 s."""
        conn = self.connect()
        first, second = frames(Ping(1)), frames(Ping(2))
        conn.feed(first[:2])
        self.clock.advance(9)
        conn.feed(first[2:] + second[:2])
        self.clock.advance(9)
        self.assertFalse(conn.transport.disconnecting)
        conn.feed(second[2:])
        self.assertEqual(conn.replies(), [Ok(1), Ok(2)])

    def test_a_large_frame_in_pieces_has_the_same_bound(self):
        self.setUpBroker(limits=Limits(frame_timeout=10.0, idle_timeout=0))
        conn = self.connect()
        body = Publish(1, "t", b"x" * 500_000).encode()
        data = struct.pack(">I", len(body)) + body
        conn.feed(data[:100_000])
        self.clock.advance(5)
        conn.feed(data[100_000:200_000])
        self.clock.advance(5)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(self.service.stats.pending_input, 200_000)
        conn.lose()
        self.assertEqual(self.service.stats.pending_input, 0)


class PendingInputTests(BrokerTestCase):
    def test_incomplete_frames_count_against_the_broker_budget(self):
        self.setUpBroker(limits=Limits(max_pending_input=300_000, idle_timeout=0))
        body = Publish(1, "t", b"x" * 200_000).encode()
        data = struct.pack(">I", len(body)) + body
        first, second = self.connect(), self.connect()
        first.feed(data[:150_000])
        self.assertFalse(first.transport.disconnecting)
        second.feed(data[:160_000])  # 310,000 held in all: the one that passed the budget goes
        self.assertTrue(second.transport.disconnecting)
        self.assertFalse(first.transport.disconnecting)
        second.lose()
        first.feed(data[150_000:])  # the first completes its frame
        self.assertEqual(first.replies()[0].rid, 1)
        self.assertEqual(self.service.stats.pending_input, 0)


class PerAddressTests(BrokerTestCase):
    def test_one_address_cannot_take_every_connection(self):
        self.setUpBroker(limits=Limits(max_connections_per_address=3))
        crowd = [self.connect(transport_from("10.0.0.1")) for _ in range(3)]
        extra = self.connect(transport_from("10.0.0.1"))
        self.assertTrue(extra.transport.disconnecting)
        (error,) = extra.replies()
        self.assertEqual(error.code, ErrorCode.LIMIT)
        self.assertIn("10.0.0.1", error.message)
        other = self.connect(transport_from("10.0.0.2"))
        self.assertOpen(other)
        for conn in crowd:
            self.assertOpen(conn)
        extra.lose()
        crowd[0].lose()
        self.assertOpen(self.connect(transport_from("10.0.0.1")))
        self.assertEqual(self.service.connections_by_peer, {"10.0.0.1": 3, "10.0.0.2": 1})
