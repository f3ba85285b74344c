"""
Stateful fuzzing of the broker's protocol with hypothesis: random sequences
of valid and invalid frames, cut at random byte boundaries, from a publisher
connection, while a subscriber connection follows every topic.  After each
step the broker's invariants must hold:

  - every request with a rid is answered exactly once, in request order;
  - each topic's offsets run 0, 1, 2, ... without gaps, and the subscriber
    receives exactly those messages, in order;
  - nothing is logged as a failure and no INTERNAL error is sent;
  - the connections stay open (no frame here is oversized or a bad HELLO).
"""

from __future__ import annotations

import os
from typing import Dict, List

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.protocol import BrokerFactory
from zaichik.service import BrokerService
from zaichik.testing import parse_frames

TOPICS = ["t0", "t1", "t2"]
topics = st.sampled_from(TOPICS)
keys = st.one_of(st.none(), st.sampled_from([b"a", b"b", b"c"]))
values = st.binary(max_size=64)


def _valid_requests(rid: int):
    return st.one_of(
        st.builds(codec.Publish, st.just(rid), topics, values, keys),
        st.builds(codec.Publish, st.just(0), topics, values, keys),
        st.builds(codec.PublishBatch, st.sampled_from([0, rid]), topics,
                  st.lists(st.tuples(keys, values), min_size=1, max_size=5)),
        st.builds(codec.CreateTopic, st.just(rid), topics, st.sampled_from([0, 60_000]),
                  st.sampled_from([0, 1_000])),
        st.builds(codec.Ping, st.just(rid)),
        st.builds(codec.ListTopics, st.just(rid)),
        st.builds(codec.Commit, st.just(rid), topics, st.integers(0, 5)),
        st.builds(codec.Unsubscribe, st.just(rid), topics),
        st.builds(codec.Publish, st.just(rid), st.sampled_from(["", "bad topic", "x" * 250]), values),
    )


def _mark(body: bytes) -> bytes:
    """Garbage carries rids from 0xFF000000 up (valid requests use 0x10000000 + n)."""
    return body[:1] + b"\xff" + body[2:] if len(body) >= 2 else body


def _closes(body: bytes) -> bool:
    """Would the broker close the connection for this body (CLOSE, or HELLO with another version)?"""
    try:
        request = codec.decode_request(body)
    except codec.DecodeError:
        return False
    return type(request) is codec.Close or (type(request) is codec.Hello and request.version != 1)


def _garbage():
    """Bodies that are mostly not valid requests."""
    return st.one_of(
        st.binary(max_size=40),
        # A valid opcode with a random tail: truncated or trailing fields.
        st.tuples(st.integers(1, 10), st.binary(max_size=30)).map(lambda t: bytes([t[0]]) + t[1]),
        st.integers(0x0B, 0xFF).map(lambda op: bytes([op]) + b"\x00\x00\x00\x07"),
    ).map(_mark).filter(lambda body: not _closes(body))


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.service = BrokerService(clock=self.clock)
        factory = BrokerFactory(self.service)
        self.failures: List[dict] = []
        globalLogPublisher.addObserver(self._observe)

        self.pub_transport = StringTransport()
        self.pub = factory.buildProtocol(None)
        self.pub.makeConnection(self.pub_transport)
        self.sub_transport = StringTransport()
        sub = factory.buildProtocol(None)
        sub.makeConnection(self.sub_transport)
        sub.dataReceived(b"".join(codec.frame(codec.Subscribe(i + 1, t, Start.LATEST).encode())
                                  for i, t in enumerate(TOPICS)))
        assert parse_frames(self.sub_transport.value()) == [codec.Ok(1), codec.Ok(2), codec.Ok(3)]
        self.sub_transport.clear()

        self.unsent = b""  # bytes written by the client, not yet fed to the broker
        self.next_rid = 1
        self.expected_rids: List[int] = []  # in request order
        self.answered: List[object] = []
        self.received: Dict[str, List[int]] = {t: [] for t in TOPICS}

    def _observe(self, event: dict) -> None:
        if event.get("log_failure") is not None:
            self.failures.append(event)

    def teardown(self) -> None:
        globalLogPublisher.removeObserver(self._observe)

    # -- rules ---------------------------------------------------------------------

    @rule(data=st.data())
    def send_valid(self, data) -> None:
        rid = 0x10000000 + self.next_rid
        self.next_rid += 1
        request = data.draw(_valid_requests(rid))
        if request.rid:
            self.expected_rids.append(request.rid)
        self.unsent += codec.frame(request.encode())

    @rule(body=_garbage())
    def send_garbage(self, body: bytes) -> None:
        self.unsent += codec.frame(body)

    @rule(cut=st.integers(min_value=1, max_value=200))
    def feed(self, cut: int) -> None:
        chunk, self.unsent = self.unsent[:cut], self.unsent[cut:]
        self.pub.dataReceived(chunk)
        self._collect()

    @rule()
    def feed_all(self) -> None:
        chunk, self.unsent = self.unsent, b""
        self.pub.dataReceived(chunk)
        self._collect()

    @rule(ms=st.integers(0, 2_000))
    def time_passes(self, ms: int) -> None:
        self.clock.advance(ms / 1000)

    def _collect(self) -> None:
        for reply in parse_frames(self.pub_transport.value()):
            assert not (type(reply) is codec.Error and reply.code == ErrorCode.INTERNAL), reply
            if 0x10000000 <= getattr(reply, "rid", 0) < 0xFF000000:
                self.answered.append(reply)
        self.pub_transport.clear()
        for message in parse_frames(self.sub_transport.value()):
            self.received[message.topic].append(message.offset)
        self.sub_transport.clear()

    # -- invariants ------------------------------------------------------------

    @invariant()
    def replies_in_order_once_each(self) -> None:
        rids = [r.rid for r in self.answered]
        assert rids == self.expected_rids[: len(rids)], (rids, self.expected_rids)

    @invariant()
    def offsets_without_gaps(self) -> None:
        for name, topic in self.service.topics.items():
            # The subscriber follows every topic from the start and is never
            # slow, and each read's messages are delivered when it ends: it
            # has exactly offsets 0 .. next_offset - 1.
            received = self.received.get(name, [])
            assert received == list(range(topic.next_offset)), (name, received, topic.next_offset)

    @invariant()
    def no_failures_and_open(self) -> None:
        assert not self.failures, self.failures
        assert not self.pub_transport.disconnecting
        assert not self.sub_transport.disconnecting


class FuzzTests(SynchronousTestCase):
    def test_protocol_state_machine(self):
        machine = BrokerMachine.TestCase
        # ZAICHIK_FUZZ_EXAMPLES=5000 for a long soak; CI runs the default.
        examples = int(os.environ.get("ZAICHIK_FUZZ_EXAMPLES", "150"))
        machine.settings = settings(max_examples=examples, stateful_step_count=40, deadline=None,
                                    suppress_health_check=list(HealthCheck))
        machine("runTest").runTest()

    def test_everything_sent_is_answered(self):
        """After a final feed, every request with a rid has its one reply."""
        state = BrokerMachine()
        try:
            for i in range(30):
                state.unsent += codec.frame(codec.Publish(0x10000000 + i, TOPICS[i % 3], b"v").encode())
                state.expected_rids.append(0x10000000 + i)
            for cut in (1, 3, 7, 64, 10_000):
                state.feed(cut)
            self.assertEqual([r.rid for r in state.answered], state.expected_rids)
            self.assertEqual(state.received, {t: list(range(10)) for t in TOPICS})
        finally:
            state.teardown()
