"""
L{zaichik.client.core.ClientCore} alone: no sockets, no clock, no reactor.
Bytes and times go in, frames and events come out, as the adapters see
them.  (The behaviour over real connections is tests/test_clients_shared.py.)
"""

from __future__ import annotations

import unittest
from typing import List

from zaichik import codec
from zaichik.client import core
from zaichik.client.core import (
    Backoff,
    ClientCore,
    ConnectionLostError,
    ConnectTimeout,
    PublishResult,
    RequestTimeout,
    Start,
    SubscriptionState,
    parse_address,
    parse_servers,
)
from zaichik.codec import ErrorCode


def frames(data: bytes) -> List:
    """Requests in bytes the core sent."""
    out, at = [], 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "big")
        out.append(codec.decode_request(data[at + 4:at + 4 + n]))
        at += 4 + n
    return out


def reply(*replies) -> bytes:
    return b"".join(codec.frame(r.encode()) for r in replies)


class Waiter:
    """What an adapter's Deferred or Future would be."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Waiter {self.name}>"


class CoreTestCase(unittest.TestCase):
    def make(self, servers="a:1", **kwargs) -> ClientCore:
        kwargs.setdefault("keepalive", 0)
        self.core = ClientCore(servers, backoff=Backoff(rand=lambda: 1.0), **kwargs)
        self.connected = self.core
        return self.core

    def up(self, **kwargs) -> ClientCore:
        """A core connected (and READY) to its first server."""
        c = self.make(**kwargs)
        c.start(Waiter("connect"))
        events = c.events()
        self.assertEqual(events, [core.Dial(c.servers[0], 0.0)])
        c.connection_made(0.0)
        if c.client_id or c.token:
            sent = frames(c.data_to_send())
            c.receive_data(reply(codec.Ok(sent[0].rid)), 0.0)
        c.events()
        c.data_to_send()
        return c

    def resolved(self, events) -> dict:
        return {e.waiter: e.value for e in events if isinstance(e, core.Resolve)}

    def rejected(self, events) -> dict:
        return {e.waiter: e.error for e in events if isinstance(e, core.Reject)}


class AddressTests(unittest.TestCase):
    def test_servers(self):
        self.assertEqual(parse_servers("a:1,b:2"), ["a:1", "b:2"])
        self.assertEqual(parse_servers(["a:1", "unix:path=/s"]), ["a:1", "unix:path=/s"])
        self.assertEqual(parse_servers("tcp:host=a:port=1"), ["tcp:host=a:port=1"])
        self.assertRaises(ValueError, parse_servers, [])

    def test_addresses(self):
        self.assertEqual(parse_address("8889"), core.Address("tcp", "localhost", 8889))
        self.assertEqual(parse_address("h:1"), core.Address("tcp", "h", 1))
        self.assertEqual(parse_address("[::1]:5"), core.Address("tcp", "::1", 5))
        self.assertEqual(parse_address("tcp:host=h:port=2"), core.Address("tcp", "h", 2))
        self.assertEqual(parse_address("tcp:h:3"), core.Address("tcp", "h", 3))
        self.assertEqual(parse_address("unix:path=/s"), core.Address("unix", path="/s"))
        self.assertEqual(parse_address("unix:/s"), core.Address("unix", path="/s"))
        for bad in ("h", "::1:5", "tcp:host=h", "unix:", "ssl:h:1"):
            self.assertRaises(ValueError, parse_address, bad)


class RequestTests(CoreTestCase):
    def test_replies_match_requests(self):
        c = self.up()
        w1, w2, w3 = Waiter("1"), Waiter("2"), Waiter("3")
        c.request(w1, lambda rid: codec.Publish(rid, "t", b"x"), 0.0, core._published)
        c.request(w2, lambda rid: codec.ListTopics(rid), 0.0, core._topics)
        c.request(w3, lambda rid: codec.Ping(rid), 0.0)
        sent = frames(c.data_to_send())
        self.assertEqual([type(r) for r in sent], [codec.Publish, codec.ListTopics, codec.Ping])
        c.receive_data(reply(codec.Published(sent[0].rid, 7, False), codec.Topics(sent[1].rid, []),
                             codec.Error(sent[2].rid, ErrorCode.INTERNAL, "no")), 0.0)
        events = c.events()
        self.assertEqual(self.resolved(events), {w1: PublishResult(7, False), w2: []})
        self.assertEqual(self.rejected(events)[w3].code, ErrorCode.INTERNAL)

    def test_rids_wrap_and_skip_waiting(self):
        c = self.up()
        c._next_rid = core.MAX_RID - 1
        c.request(Waiter(), lambda rid: codec.Ping(rid), 0.0)
        c.request(Waiter(), lambda rid: codec.Ping(rid), 0.0)
        c.request(Waiter(), lambda rid: codec.Ping(rid), 0.0)
        self.assertEqual([r.rid for r in frames(c.data_to_send())], [core.MAX_RID, 1, 2])
        c._next_rid = core.MAX_RID   # 1 and 2 still wait: the next is 3
        c.request(Waiter(), lambda rid: codec.Ping(rid), 0.0)
        self.assertEqual([r.rid for r in frames(c.data_to_send())], [3])

    def test_unencodable_request_keeps_nothing(self):
        c = self.up()
        self.assertRaises(ValueError, c.request, Waiter(), lambda rid: codec.Publish(rid, "t", b"x", b"k" * 70_000),
                          0.0, core._published)
        sub = SubscriptionState("t", Start.OFFSET, -1, 0, False)
        self.assertRaises(ValueError, c.subscribe, Waiter(), sub, 0.0)
        self.assertRaises(ValueError, core.encode_publish, "\udcff", b"x")
        self.assertEqual((c._waiting, c.subscriptions, c.data_to_send(), c.events()), ({}, {}, b"", []))

    def test_timeout_then_late_reply(self):
        """A request unanswered within request_timeout fails; its late reply is dropped."""
        c = self.up(request_timeout=5.0)
        w1, w2 = Waiter("1"), Waiter("2")
        c.request(w1, lambda rid: codec.Ping(rid), 0.0)
        c.request(w2, lambda rid: codec.Ping(rid), 3.0)
        first, second = frames(c.data_to_send())
        self.assertEqual(c.next_deadline(), 5.0)
        c.handle_timer(5.0)
        self.assertIsInstance(self.rejected(c.events())[w1], RequestTimeout)
        self.assertEqual(c.next_deadline(), 8.0)
        c.receive_data(reply(codec.Ok(first.rid), codec.Ok(second.rid)), 6.0)
        self.assertEqual(c.events(), [core.Resolve(w2, None)])
        self.assertEqual(c._waiting, {})


class SubscriptionTests(CoreTestCase):
    def subscribed(self, c, topic="t", **kwargs) -> SubscriptionState:
        sub = SubscriptionState(topic, kwargs.get("start", Start.LATEST), kwargs.get("offset", 0), 0, False,
                                handle="H")
        c.subscribe(Waiter(), sub, 0.0)
        (request,) = frames(c.data_to_send())
        c.receive_data(reply(codec.Ok(request.rid)), 0.0)
        c.events()
        return sub

    def message(self, offset: int, topic="t") -> bytes:
        return reply(codec.Message(topic, offset, 1, b"v%d" % offset))

    def test_messages_before_the_ok_are_strays(self):
        c = self.up()
        sub = SubscriptionState("t", Start.LATEST, 0, 0, False, handle="H")
        w = Waiter()
        c.subscribe(w, sub, 0.0)
        (request,) = frames(c.data_to_send())
        c.receive_data(self.message(0) + reply(codec.Ok(request.rid)) + self.message(1), 0.0)
        self.assertEqual(c.events(), [core.Resolve(w, "H"), core.Wake("H")])
        self.assertEqual([m.offset for m in c.take_all(sub)], [1])

    def test_flow_pauses_only_without_awaited_replies(self):
        c = self.up(max_queued=4)
        sub = self.subscribed(c)
        c.request(Waiter(), lambda rid: codec.Ping(rid), 0.0)
        (ping,) = frames(c.data_to_send())
        c.receive_data(b"".join(self.message(i) for i in range(6)), 0.0)
        self.assertNotIn(core.PauseReading(), c.events())   # a reply is awaited: keep reading
        c.receive_data(reply(codec.Ok(ping.rid)) + self.message(6), 0.0)
        self.assertIn(core.PauseReading(), c.events())
        self.assertTrue(c.paused)
        for _ in range(4):
            c.take(sub)
        self.assertEqual(c.events(), [])           # 3 queued: above half of 4
        c.take(sub)
        self.assertEqual(c.events(), [core.ResumeReading()])
        self.assertFalse(c.paused)

    def test_callback_subscriptions_are_not_queued(self):
        c = self.up()
        sub = SubscriptionState("t", Start.LATEST, 0, 0, True, handle="H")
        c.subscribe(Waiter(), sub, 0.0)
        (request,) = frames(c.data_to_send())
        c.receive_data(reply(codec.Ok(request.rid)) + self.message(0), 0.0)
        events = c.events()
        self.assertEqual(events[-1], core.Deliver("H", codec.Message("t", 0, 1, b"v0")))
        self.assertEqual(c.queued, 0)

    def test_resume_positions(self):
        c = self.make(client_id="w")
        sub = SubscriptionState("t", Start.LATEST, 0, 0, False)
        self.assertEqual(c._resume_position(sub), (Start.LATEST, 0))
        sub.first_received = 5
        self.assertEqual(c._resume_position(sub), (Start.OFFSET, 5))
        sub.committed = 6
        self.assertEqual(c._resume_position(sub), (Start.DEFAULT, 0))
        anonymous = self.make()
        self.assertEqual(anonymous._resume_position(sub), (Start.OFFSET, 7))
        fresh = SubscriptionState("t", Start.DEFAULT, 0, 0, False)
        self.assertEqual(c._resume_position(fresh), (Start.DEFAULT, 0))
        self.assertEqual(anonymous._resume_position(fresh), (Start.DEFAULT, 0))


class EndingTests(CoreTestCase):
    def test_broker_error_before_close_is_the_reason(self):
        c = self.up()
        w = Waiter()
        c.request(w, lambda rid: codec.Publish(rid, "t", b"x"), 0.0, core._published)
        c.data_to_send()
        c.receive_data(reply(codec.Error(0, ErrorCode.FRAME_TOO_LARGE, "too big")), 0.0)
        c.connection_lost(ConnectionLostError("eof"), 0.0, clean=True)
        events = c.events()
        self.assertEqual([type(e) for e in events], [core.AsyncError, core.Reject, core.Closed])
        self.assertEqual(self.rejected(events)[w].code, ErrorCode.FRAME_TOO_LARGE)
        self.assertEqual(c.close_reason.code, ErrorCode.FRAME_TOO_LARGE)

    def test_a_fire_and_forget_error_long_before_is_not_the_reason(self):
        c = self.up()
        c.receive_data(reply(codec.Error(0, ErrorCode.BAD_TOPIC, "bad")) + reply(codec.Ok(99)), 0.0)
        c.connection_lost(ConnectionLostError("eof"), 0.0, clean=True)
        self.assertIsInstance(c.close_reason, ConnectionLostError)

    def test_reconnect_renews_subscriptions_and_sends_the_backlog(self):
        c = self.up(servers=["a:1", "b:2"], reconnect=True, client_id="w")
        sub = SubscriptionState("t", Start.LATEST, 0, 0, False, handle="H")
        c.subscribe(Waiter(), sub, 0.0)
        (request,) = frames(c.data_to_send())
        c.receive_data(reply(codec.Ok(request.rid)) + reply(codec.Message("t", 3, 1, b"x")), 0.0)
        c.events()
        c.connection_lost(ConnectionLostError("reset"), 1.0)
        self.assertEqual(c.events(), [core.Dial("b:2", 0.0)])   # it was working: at once
        meanwhile = Waiter("meanwhile")
        c.request(meanwhile, lambda rid: codec.Ping(rid), 1.0)
        self.assertEqual(c.data_to_send(), b"")
        c.connection_made(1.5)
        hello, = frames(c.data_to_send())
        self.assertEqual((type(hello), hello.client_id), (codec.Hello, "w"))
        c.receive_data(reply(codec.Ok(hello.rid)), 1.5)
        renewed, ping = frames(c.data_to_send())
        self.assertEqual((type(renewed), renewed.start, renewed.offset), (codec.Subscribe, Start.OFFSET, 3))
        self.assertIsInstance(ping, codec.Ping)
        c.receive_data(reply(codec.Ok(renewed.rid), codec.Ok(ping.rid)) + reply(codec.Message("t", 3, 1, b"x"),
                                                                               codec.Message("t", 4, 1, b"y")), 1.5)
        self.assertIn(core.Resolve(meanwhile, None), c.events())
        # 3 was received before the loss (and still waits to be read); sent
        # again, it is not handed out twice.
        self.assertEqual([m.offset for m in c.take_all(sub)], [3, 4])

    def test_refused_dials_back_off(self):
        c = self.up(servers=["a:1", "b:2"], reconnect=True)
        c.receive_data(reply(codec.Ok(12345)), 0.0)   # healthy
        c.connection_lost(ConnectionLostError("x"), 0.0)
        self.assertEqual(c.events(), [core.Dial("b:2", 0.0)])
        c.connection_failed(ConnectionRefusedError(), 0.0)
        self.assertEqual(c.events(), [core.Dial("a:1", 0.0)])
        c.connection_failed(ConnectionRefusedError(), 0.0)
        self.assertEqual(c.events(), [core.Dial("b:2", 0.1)])      # a round failed: backoff
        c.connection_failed(ConnectionRefusedError(), 0.0)
        c.connection_failed(ConnectionRefusedError(), 0.0)
        self.assertEqual(c.events(), [core.Dial("a:1", 0.0), core.Dial("b:2", 0.2)])

    def test_accepted_then_dropped_backs_off(self):
        """A broker that accepts and drops at once (LIMIT) is not hammered."""
        c = self.up(reconnect=True)
        for delay in (0.1, 0.2, 0.4):
            c.receive_data(reply(codec.Error(0, ErrorCode.LIMIT, "too many connections")), 0.0)
            c.connection_lost(ConnectionLostError("eof"), 0.0, clean=True)
            self.assertEqual([e for e in c.events() if isinstance(e, core.Dial)], [core.Dial("a:1", delay)])
            c.connection_made(0.0)

    def test_refused_hello_is_the_end(self):
        c = self.up(reconnect=True, client_id="w")
        c.connection_lost(ConnectionLostError("x"), 0.0)
        c.events()
        c.connection_made(0.0)
        hello, = frames(c.data_to_send())
        c.receive_data(reply(codec.Error(hello.rid, ErrorCode.NOT_AUTHORIZED, "no")), 0.0)
        c.connection_lost(ConnectionLostError("eof"), 0.0, clean=True)
        self.assertIsInstance(c.events()[-1], core.Closed)
        self.assertEqual(c.close_reason.code, ErrorCode.NOT_AUTHORIZED)

    def test_first_connect_tries_each_server_once(self):
        c = self.make(servers=["a:1", "b:2"], client_id="w", connect_timeout=2.0)
        w = Waiter()
        c.start(w)
        self.assertEqual(c.events(), [core.Dial("a:1", 0.0)])
        c.connection_failed(ConnectionRefusedError(), 0.0)
        self.assertEqual(c.events(), [core.Dial("b:2", 0.0)])
        c.connection_made(0.0)
        c.data_to_send()
        self.assertEqual(c.next_deadline(), 2.0)
        c.handle_timer(2.0)
        self.assertEqual(c.events(), [core.CloseTransport(abort=True)])
        c.connection_lost(ConnectionLostError("aborted"), 2.0)
        events = c.events()
        self.assertIsInstance(self.rejected(events)[w], ConnectTimeout)
        self.assertIsInstance(events[-1], core.Closed)

    def test_keepalive(self):
        c = self.up(keepalive=10.0, request_timeout=3.0)
        self.assertEqual(c.next_deadline(), 10.0)
        c.handle_timer(10.0)
        (ping,) = frames(c.data_to_send())
        self.assertIsInstance(ping, codec.Ping)
        self.assertEqual(c.next_deadline(), 13.0)
        c.receive_data(reply(codec.Ok(ping.rid)), 11.0)
        self.assertEqual(c.next_deadline(), 20.0)
        c.handle_timer(20.0)
        c.data_to_send()
        c.handle_timer(23.0)
        self.assertEqual(c.events(), [core.CloseTransport(abort=True)])
        c.connection_lost(ConnectionLostError("aborted"), 23.0)
        self.assertIn("keepalive", str(c.close_reason))

    def test_close(self):
        c = self.up()
        w = Waiter()
        c.close(w, 0.0)
        (close,) = frames(c.data_to_send())
        self.assertIsInstance(close, codec.Close)
        c.receive_data(reply(codec.Ok(close.rid)), 0.0)
        c.connection_lost(ConnectionLostError("eof"), 0.0, clean=True)
        self.assertEqual(c.events(), [core.Resolve(w, None), core.Closed(None)])
        later = Waiter()
        c.request(later, lambda rid: codec.Ping(rid), 0.0)
        self.assertIsInstance(self.rejected(c.events())[later], core.ClientClosedError)
        self.assertRaises(ConnectionLostError, c.send, core.encode_publish("t", b"x"), 0.0)
