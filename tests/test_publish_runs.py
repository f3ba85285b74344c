"""
Runs of fire-and-forget PUBLISHes (rid 0) in one read are handed to the
session in one call (L{zaichik.session.Session.publish_run}, each topic's
messages together).  That must be invisible: the same offsets, timestamps,
deliveries, refusals and replies as when each frame is handled on its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from operator import attrgetter
from typing import Callable, Iterator, List, Sequence, Tuple
from unittest import mock

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from zaichik import codec
from zaichik.codec import CreateTopic, Error, ErrorCode, Hello, Ok, Ping, Publish, Published, Start, Subscribe
from zaichik.auth import ALLOW_ALL, IAuthenticator, Permissions
from zaichik.protocol import BrokerFactory
from zaichik.service import BrokerService, Limits
from zaichik.session import Session
from zaichik.topic import Topic

from tests.test_protocol import NOW, Connection

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

MAX_FRAME = 400
# "keyed": compaction, "kept": retention only; "auto" is made by its first
# message; "" and an over-long name are refused.
TOPICS = ["keyed", "kept", "auto", "", "n" * 300]


@implementer(IAuthenticator)
class Limited:
    """HELLO with the token "all" may do anything (ALLOW_ALL); any other, publish to "kept" only."""

    requires_hello = False

    def authenticate(self, client_id: str, token: str, peer: str = "") -> object:
        return ALLOW_ALL if token == "all" else Permissions(["kept"], ["#"], ["#"], ["*"])


def broker(**limits) -> Tuple[BrokerService, BrokerFactory]:
    clock = Clock()
    clock.advance(NOW)
    service = BrokerService(clock=clock, limits=Limits(max_frame_size=MAX_FRAME, max_key_size=8, **limits),
                            authenticator=Limited())
    return service, BrokerFactory(service, MAX_FRAME)


# The topics run() makes, and its subscriber's subscriptions to them.
SETUP = (CreateTopic(1, "keyed", 60_000, 10_000), CreateTopic(2, "kept", 60_000, 0),
         Subscribe(3, "keyed", Start.EARLIEST), Subscribe(4, "kept", Start.EARLIEST))


def run(requests: List, one_read: bool, runs: bool, token: str = "all", setup: Sequence = SETUP,
        counts: Callable[[Topic], object] = attrgetter("next_offset"), **limits) -> Tuple[list, list, dict]:
    """
    C{requests} from one publisher (after a HELLO with C{token}), in one
    read or a read each, with runs or without: what the publisher and a
    subscriber of every topic (made and subscribed to by C{setup}) read,
    and C{counts} of each topic (its next offset).
    """
    service, factory = broker(**limits)
    subscriber = Connection(factory)
    subscriber.request(Hello(0, token="all"), *setup)
    publisher = Connection(factory)
    publisher.request(Hello(0, token=token))
    with mock.patch.object(Session, "may_publish_runs", runs):
        if one_read:
            publisher.send(*requests)
        else:
            for request in requests:
                publisher.send(request)
    offsets = {name: counts(topic) for name, topic in service.topics.items()}
    return in_order(publisher.replies()), subscriber.replies(), offsets


def per_topic(result: Tuple[list, list, dict]) -> Tuple[list, dict, dict]:
    """
    C{run}'s result with the subscriber's messages by topic: the protocol
    orders messages per topic only, and how a read's deliveries to
    different topics interleave follows the order the topics were first
    stored to in it, which a run changes when a topic's first message in
    it is refused and a later one stored (found by the property below).
    """
    replies, messages, offsets = result
    topics: dict = {}
    for message in messages:
        topics.setdefault(message.topic, []).append(message)
    return replies, topics, offsets


@contextmanager
def counted(module, name: str) -> Iterator[list]:
    """C{module.name} replaced, while in the block, by a wrapper that records each call's arguments."""
    calls: list = []
    real = getattr(module, name)

    def counting(*args):
        calls.append(args)
        return real(*args)

    with mock.patch.object(module, name, counting):
        yield calls


def in_order(replies: list) -> list:
    """
    The replies, each stretch of rid-0 ERRORs sorted: a run's refusals come
    topic by topic, where one by one they come in publish order (a
    fire-and-forget publish names no request, so nothing tells them apart
    but their text).
    """
    out: list = []
    stretch: list = []
    for reply in replies + [None]:
        if isinstance(reply, Error) and reply.rid == 0:
            stretch.append(reply)
            continue
        out.extend(sorted(stretch, key=repr))
        stretch = []
        if reply is not None:
            out.append(reply)
    return out


class PublishRunTests(SynchronousTestCase):
    def test_interleaved_topics(self) -> None:
        """Messages to two topics, alternating in one read: each topic's offsets in order, as one by one."""
        requests = [Publish(0, name, b"%s-%d" % (name.encode(), i)) for i in range(5) for name in ("kept", "auto")]
        replies, messages, offsets = run(requests, one_read=True, runs=True)
        self.assertEqual(replies, [])
        self.assertEqual([(m.topic, m.offset, m.value) for m in messages],
                         [("kept", i, b"kept-%d" % i) for i in range(5)])
        self.assertEqual(offsets["auto"], 5)
        self.assertEqual((replies, messages, offsets), run(requests, one_read=True, runs=False))

    def test_refusals_one_by_one(self) -> None:
        """
        One message too large among good ones: only it is refused (rid 0
        ERROR), the others are stored, as when each is handled alone.
        """
        requests = [Publish(0, "kept", b"a"), Publish(0, "kept", b"x" * 380), Publish(0, "kept", b"b"),
                    Publish(0, "keyed", b"v", b"k" * 9), Publish(0, "keyed", b"w", b"k")]
        replies, messages, offsets = run(requests, one_read=True, runs=True)
        self.assertEqual([(type(r), r.rid, r.code) for r in replies], [(Error, 0, ErrorCode.LIMIT)] * 2)
        self.assertEqual(sorted((m.topic, m.value) for m in messages),
                         [("kept", b"a"), ("kept", b"b"), ("keyed", b"w")])
        self.assertEqual((replies, messages, offsets), run(requests, one_read=True, runs=False))

    def test_a_reply_ends_the_run(self) -> None:
        """A PUBLISH with a rid is answered after the run before it is stored, with the offset after it."""
        requests = [Publish(0, "kept", b"a"), Publish(0, "kept", b"b"), Publish(7, "kept", b"c"), Ping(8),
                    Publish(0, "kept", b"d")]
        replies, messages, _ = run(requests, one_read=True, runs=True)
        self.assertEqual(replies, [Published(7, 2, False), Ok(8)])
        self.assertEqual([m.value for m in messages], [b"a", b"b", b"c", b"d"])

    def test_duplicates_in_a_run(self) -> None:
        """First wins inside a run as across runs."""
        requests = [Publish(0, "keyed", b"1", b"k"), Publish(0, "keyed", b"2", b"k"), Publish(0, "kept", b"x"),
                    Publish(0, "keyed", b"3", b"j"), Publish(0, "keyed", b"4", b"k")]
        replies, messages, offsets = run(requests, one_read=True, runs=True)
        self.assertEqual([m.value for m in messages if m.topic == "keyed"], [b"1", b"3"])
        self.assertEqual(offsets["keyed"], 2)
        self.assertEqual((replies, messages, offsets), run(requests, one_read=True, runs=False))

    def test_compaction_key_limit(self) -> None:
        """A topic out of compaction keys refuses each new key on its own, inside a run too."""
        requests = [Publish(0, "keyed", b"v", b"k%d" % i) for i in range(5)]
        replies, messages, offsets = run(requests, one_read=True, runs=True, max_compaction_keys=3)
        self.assertEqual([(r.rid, r.code) for r in replies], [(0, ErrorCode.LIMIT)] * 2)
        self.assertEqual(offsets["keyed"], 3)
        self.assertEqual((replies, messages, offsets),
                         run(requests, one_read=True, runs=False, max_compaction_keys=3))

    def test_permissions(self) -> None:
        """A connection that may publish to some topics only: each other one refused, as one by one."""
        requests = [Publish(0, name, b"%d" % i) for i in range(6) for name in ("kept", "keyed", "auto")]
        replies, messages, offsets = run(requests, one_read=True, runs=True, token="some")
        self.assertEqual([(r.rid, r.code) for r in replies], [(0, ErrorCode.NOT_AUTHORIZED)] * 12)
        self.assertEqual([m.value for m in messages], [b"%d" % i for i in range(6)])
        self.assertNotIn("auto", offsets)
        self.assertEqual((replies, messages, offsets), run(requests, one_read=True, runs=False, token="some"))

    def test_a_declined_run_is_not_read_again_frame_after_frame(self) -> None:
        """
        With an engine, a run naming a topic the broker does not know is
        declined and its frames handled one by one; the framer must not read
        the rest of the run again at each of them (a review found 16,000
        frames took 6 s: quadratic).  Counted: reads of a run, for 2,000
        frames to a known topic and one to a name never learnt.
        """
        service, factory = broker()
        publisher = Connection(factory)
        publisher.request(Hello(0, token="all"), CreateTopic(1, "kept", 60_000, 0))
        service.engine = object()  # (only publish_run's "is there an engine" is asked of it here)
        with counted(codec, "parse_publish_run") as calls:
            publisher.send(*[Publish(0, "kept", b"v")] * 2000, Publish(0, "", b"x"))
        self.assertLessEqual(len(calls), 3)
        self.assertEqual(service.topics["kept"].next_offset, 2000)
        self.assertEqual([(r.rid, r.code) for r in publisher.replies()], [(0, ErrorCode.BAD_TOPIC)])

    def test_parse_publish_run_stops(self) -> None:
        """A run ends at a frame that is not a whole, well-formed rid-0 PUBLISH within the limit."""
        good = codec.frame(Publish(0, "t", b"v").encode())
        for after in [codec.frame(Publish(1, "t", b"v").encode()), codec.frame(Ping(0).encode()),
                      codec.frame(Publish(0, "t", b"v" * 50).encode()), good[:-1], codec.frame(b"\x05\x00")]:
            data = good * 2 + after
            groups, count, at = codec.parse_publish_run(data, 0, len(data), 40)
            self.assertEqual(({t: list(e) for t, e in groups.items()}, count, at),
                             ({"t": [(None, b"v")] * 2}, 2, 2 * len(good)))


if given is not None:

    requests_strategy = st.lists(
        st.one_of(
            st.builds(Publish, st.sampled_from([0, 0, 0, 0, 5]), st.sampled_from(TOPICS),
                      st.sampled_from([b"", b"v", b"x" * 100, b"z" * 380, b"y" * MAX_FRAME]),
                      st.sampled_from([None, b"k1", b"k2", b"k3", b"k" * 9])),
            st.just(Ping(9)),
        ),
        max_size=30,
    )

    class PublishRunPropertyTests(SynchronousTestCase):
        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
        @given(requests_strategy)
        def test_same_as_one_by_one(self, requests: list) -> None:
            """
            Whatever the mix, the same with runs as without, in one read
            and in a read per frame: replies, offsets, and each topic's
            messages (see L{per_topic}).
            """
            for one_read, token in ((True, "all"), (False, "all"), (True, "some")):
                self.assertEqual(per_topic(run(requests, one_read, True, token, max_compaction_keys=2)),
                                 per_topic(run(requests, one_read, False, token, max_compaction_keys=2)))

    class PublishRunExamplesTests(SynchronousTestCase):
        def test_refused_first_in_a_run(self) -> None:
            """
            Hypothesis' example: a topic's first message in the run refused
            ("kept", key too long), a later one stored.  Per topic the same;
            across topics the deliveries of the read interleave otherwise.
            """
            requests = [Publish(0, "keyed", b""), Ping(9), Publish(0, "kept", b"", b"k" * 9),
                        Publish(0, "keyed", b""), Publish(0, "keyed", b""), Publish(0, "kept", b"")]
            with_runs = run(requests, True, runs=True)
            self.assertEqual(per_topic(with_runs), per_topic(run(requests, True, runs=False)))
            self.assertEqual([(m.topic, m.offset) for m in with_runs[1]],
                             [("keyed", 0), ("kept", 0), ("keyed", 1), ("keyed", 2)])
