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


class PatternAndGroupTests(CoreTestCase):
    """Protocol 1.1 in the core: wildcard subscriptions and consumer groups."""

    def message(self, topic: str, offset: int) -> bytes:
        return reply(codec.Message(topic, offset, 1, b"%s:%d" % (topic.encode(), offset)))

    def subscribe(self, c, topic, start=Start.LATEST, handle=None, **kwargs) -> SubscriptionState:
        sub = SubscriptionState(topic, start, 0, kwargs.pop("max_inflight", 0), False, handle=handle or topic,
                                **kwargs)
        c.subscribe(Waiter(), sub, 0.0)
        (request,) = frames(c.data_to_send())
        c.receive_data(reply(codec.Ok(request.rid)), 0.0)
        c.events()
        self.last_request = request
        return sub

    def taken(self, c, sub) -> List:
        return [(m.topic, m.offset) for m in c.take_all(sub)]

    def test_pattern_matching(self):
        """The core matches as the broker's index does (zaichik.patterns.matches)."""
        from zaichik.patterns import matches

        cases = [("sensors.*.temp", "sensors.a.temp"), ("sensors.*.temp", "sensors.a.b.temp"),
                 ("sensors.>", "sensors.a"), ("sensors.>", "sensors.a.b"), ("sensors.>", "sensors"),
                 ("a.*", "a."), ("*.>", "x.y.z"), ("*", "x"), ("*", "x.y"), ("a.>", "b.c"), ("*.b", "a.c")]
        for pattern, name in cases:
            self.assertEqual(core.pattern_matches(pattern, name), matches(pattern, name), (pattern, name))

    def test_kinds(self):
        self.assertEqual(SubscriptionState("a.b", Start.LATEST, 0, 0, False).kind, core.TOPIC)
        self.assertEqual(SubscriptionState("a.>", Start.LATEST, 0, 0, False).kind, core.PATTERN)
        self.assertEqual(SubscriptionState("a.*.c", Start.LATEST, 0, 0, False).kind, core.PATTERN)
        self.assertEqual(SubscriptionState("a*", Start.LATEST, 0, 0, False).kind, core.TOPIC)  # BAD_TOPIC
        self.assertEqual(SubscriptionState("jobs", Start.LATEST, 0, 0, False, group="w").kind, core.GROUP)

    def test_pattern_gets_each_topic_in_turn(self):
        c = self.up()
        sub = self.subscribe(c, "s.>", start=Start.EARLIEST)
        self.assertEqual(self.last_request, codec.Subscribe(self.last_request.rid, "s.>", Start.EARLIEST, 0, 0))
        c.receive_data(self.message("s.a", 0) + self.message("s.b.c", 0) + self.message("s.a", 1)
                       + self.message("other", 0), 0.0)
        self.assertEqual(self.taken(c, sub), [("s.a", 0), ("s.b.c", 0), ("s.a", 1)])
        self.assertEqual(sub.last_by_topic, {"s.a": 1, "s.b.c": 0})

    def test_commit_names_the_topic(self):
        c = self.up()
        sub = self.subscribe(c, "s.>")
        w = Waiter()
        c.commit(w, "s.a", 4, 0.0)
        (commit,) = frames(c.data_to_send())
        self.assertEqual(commit, codec.Commit(commit.rid, "s.a", 4))
        c.receive_data(reply(codec.Ok(commit.rid)), 0.0)
        self.assertEqual((sub.committed_by_topic, sub.committed), ({"s.a": 4}, None))
        self.assertEqual(core.commit_topic(sub, "s.a"), "s.a")
        self.assertRaises(ValueError, core.commit_topic, sub, None)
        self.assertRaises(ValueError, core.commit_topic, sub, "t.a")
        plain = SubscriptionState("t", Start.LATEST, 0, 0, False)
        self.assertEqual(core.commit_topic(plain, None), "t")
        self.assertRaises(ValueError, core.commit_topic, plain, "u")
        self.assertRaises(ValueError, core.ack_topic, plain)
        self.assertRaises(ValueError, core.ack_topic, sub)

    def test_unsubscribe_names_the_pattern(self):
        c = self.up()
        sub = self.subscribe(c, "s.*")
        c.receive_data(self.message("s.a", 0), 0.0)
        w = Waiter()
        c.unsubscribe(w, "s.*", 0.0)
        (request,) = frames(c.data_to_send())
        self.assertEqual(request, codec.Unsubscribe(request.rid, "s.*"))
        c.receive_data(self.message("s.a", 1) + reply(codec.Ok(request.rid)) + self.message("s.a", 2), 0.0)
        self.assertEqual(sub.state, core.ENDED)
        self.assertEqual(self.taken(c, sub), [("s.a", 0), ("s.a", 1)])
        self.assertNotIn("s.*", c.subscriptions)

    def test_overlap_one_copy_each(self):
        """A topic and two patterns that follow it: the broker sends three copies
        of each message, in any interleaving; each subscription gets each once, in order."""
        c = self.up()
        plain = self.subscribe(c, "s.a", start=Start.EARLIEST)
        star = self.subscribe(c, "s.*", start=Start.EARLIEST)
        rest = self.subscribe(c, "s.>", start=Start.EARLIEST)
        order = [0, 0, 1, 0, 1, 2, 2, 1, 3, 2, 3, 3]   # three streams of 0..3, interleaved
        c.receive_data(b"".join(self.message("s.a", o) for o in order), 0.0)
        for sub in (plain, star, rest):
            self.assertEqual([o for _, o in self.taken(c, sub)], [0, 1, 2, 3], sub)

    def test_overlap_with_different_starts(self):
        """The pattern from the oldest message, the topic from the newest: the
        pattern's history is not taken for the topic's, nor the other way round."""
        c = self.up()
        rest = self.subscribe(c, "s.>", start=Start.EARLIEST)
        c.receive_data(self.message("s.a", 0) + self.message("s.a", 1), 0.0)
        plain = self.subscribe(c, "s.a", start=Start.LATEST)
        # The pattern's 2 and 3 (it was held back), then both copies of 4.
        c.receive_data(self.message("s.a", 2) + self.message("s.a", 4) + self.message("s.a", 3)
                       + self.message("s.a", 4), 0.0)
        self.assertEqual([o for _, o in self.taken(c, rest)], [0, 1, 2, 3, 4])
        self.assertEqual([o for _, o in self.taken(c, plain)], [4])

    def test_overlap_with_a_known_start(self):
        """A topic from offset 5, then a pattern from the oldest: the pattern's
        first copies are not taken for the topic's."""
        c = self.up()
        plain = self.subscribe(c, "s.a", start=Start.OFFSET, handle="plain")
        plain.offset = 5
        rest = self.subscribe(c, "s.>", start=Start.EARLIEST)
        c.receive_data(b"".join(self.message("s.a", o) for o in (0, 1, 5, 2, 3, 4, 6, 5, 6)), 0.0)
        self.assertEqual([o for _, o in self.taken(c, rest)], [0, 1, 2, 3, 4, 5, 6])
        self.assertEqual([o for _, o in self.taken(c, plain)], [5, 6])

    def test_pattern_renewed_after_reconnect(self):
        """Renewed with its own start; what each topic already handed out is not handed out again."""
        c = self.up(reconnect=True)
        sub = self.subscribe(c, "s.>", start=Start.EARLIEST, max_inflight=5)
        c.receive_data(self.message("s.a", 0) + self.message("s.a", 1) + self.message("s.b", 0), 0.0)
        c.connection_lost(ConnectionLostError("reset"), 1.0)
        c.events()
        c.connection_made(1.0)
        (renewed,) = frames(c.data_to_send())
        self.assertEqual(renewed, codec.Subscribe(renewed.rid, "s.>", Start.EARLIEST, 0, 5))
        c.receive_data(reply(codec.Ok(renewed.rid)) + b"".join(
            self.message(t, o) for t, o in [("s.a", 0), ("s.a", 1), ("s.a", 2), ("s.b", 0), ("s.c", 0)]), 1.0)
        self.assertEqual(self.taken(c, sub), [("s.a", 0), ("s.a", 1), ("s.b", 0), ("s.a", 2), ("s.c", 0)])

    def test_durable_pattern_renewed_from_its_commits(self):
        c = self.up(reconnect=True, client_id="w")
        sub = self.subscribe(c, "s.>", start=Start.EARLIEST)
        self.assertEqual(c._resume_position(sub), (Start.EARLIEST, 0))
        sub.committed_by_topic["s.a"] = 3
        self.assertEqual(c._resume_position(sub), (Start.DEFAULT, 0))

    def test_group_subscription(self):
        c = self.up()
        sub = self.subscribe(c, "jobs", start=Start.DEFAULT, group="workers", max_inflight=10, ack_timeout=60_000)
        self.assertEqual(self.last_request, codec.SubscribeGroup(self.last_request.rid, "jobs", "workers",
                                                                 Start.DEFAULT, 0, 10, 60_000))
        # A message not acknowledged in time comes again: it is handed out again.
        c.receive_data(self.message("jobs", 3) + self.message("jobs", 5) + self.message("jobs", 3), 0.0)
        self.assertEqual([o for _, o in self.taken(c, sub)], [3, 5, 3])
        w = Waiter()
        c.ack(w, "jobs", 5, 0.0)
        (ack,) = frames(c.data_to_send())
        self.assertEqual(ack, codec.Ack(ack.rid, "jobs", 5))
        c.receive_data(reply(codec.Ok(ack.rid)), 0.0)
        self.assertIn(core.Resolve(w, None), c.events())
        self.assertEqual(core.ack_topic(sub), "jobs")
        c.commit(Waiter(), "jobs", 3, 0.0)
        (commit,) = frames(c.data_to_send())
        c.receive_data(reply(codec.Ok(commit.rid)), 0.0)
        self.assertEqual(sub.committed, 3)
        # One subscription per topic, plain or group.
        with self.assertRaises(core.ZaichikError) as caught:
            c.subscribe(Waiter(), SubscriptionState("jobs", Start.LATEST, 0, 0, False), 0.0)
        self.assertIs(caught.exception.code, ErrorCode.ALREADY_SUBSCRIBED)

    def test_group_rejoins_and_drops_what_went_back(self):
        """After a loss the membership is renewed as it began; what was queued
        and unread is dropped (the broker gives it back to the group)."""
        c = self.up(reconnect=True, client_id="w", max_queued=4)
        sub = self.subscribe(c, "jobs", start=Start.EARLIEST, group="workers", max_inflight=2, ack_timeout=500)
        c.receive_data(b"".join(self.message("jobs", o) for o in range(6)), 0.0)
        self.assertTrue(c.paused)
        self.assertEqual(c.take(sub).offset, 0)
        c.connection_lost(ConnectionLostError("reset"), 1.0)
        self.assertEqual((sub.generation, len(sub.queue), c.queued, c.paused), (1, 0, 0, False))
        c.events()
        c.connection_made(1.0)
        hello, = frames(c.data_to_send())
        c.receive_data(reply(codec.Ok(hello.rid)), 1.0)
        (renewed,) = frames(c.data_to_send())
        self.assertEqual(renewed, codec.SubscribeGroup(renewed.rid, "jobs", "workers", Start.EARLIEST, 0, 2, 500))
        c.receive_data(reply(codec.Ok(renewed.rid)) + self.message("jobs", 1) + self.message("jobs", 0), 1.0)
        self.assertEqual([o for _, o in self.taken(c, sub)], [1, 0])

    def test_group_left_drops_what_is_queued(self):
        c = self.up()
        sub = self.subscribe(c, "jobs", group="workers")
        c.receive_data(self.message("jobs", 0) + self.message("jobs", 1), 0.0)
        c.unsubscribe(Waiter(), "jobs", 0.0)
        (request,) = frames(c.data_to_send())
        c.receive_data(reply(codec.Ok(request.rid)), 0.0)
        self.assertEqual((sub.state, list(sub.queue), c.queued), (core.ENDED, [], 0))
        self.assertIn(core.Wake("jobs"), c.events())

    def test_group_and_pattern_on_one_topic(self):
        """Their copies cannot be told apart; the pattern has each message once,
        and no copy is lost."""
        c = self.up()
        group = self.subscribe(c, "jobs.a", group="workers")
        rest = self.subscribe(c, "jobs.>", start=Start.EARLIEST, handle="rest")
        c.receive_data(b"".join(self.message("jobs.a", o) for o in (0, 0, 1, 1)), 0.0)
        self.assertEqual([o for _, o in self.taken(c, rest)], [0, 1])
        self.assertEqual([o for _, o in self.taken(c, group)], [0, 1])
