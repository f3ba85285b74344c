"""
The broker service: owns the topics, the durable client positions, and the
retention sweep.  Connections (see L{zaichik.session}) call into it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from zaichik.auth import AllowAll, IAuthenticator
from zaichik.clock import wall_clock
from zaichik import codec
from zaichik.codec import ErrorCode, TopicInfo
from zaichik.errors import ZaichikError
from zaichik.groups import Group
from zaichik.patterns import PatternIndex
from zaichik.storage import IEngineEvents, ISharedStorage, IStorage
from zaichik.storage.memory import MemoryStorage
from zaichik.topic import KeyBudget, Topic
from zaichik.work import UnitOfWork

_log = Logger()


@dataclass
class Limits:
    """
    What one broker allows; each is a C{twistd zaichik} option.  Reaching a
    limit is answered with C{ERROR(LIMIT)}.

    @ivar max_connections: open connections; one more is told LIMIT and closed.
    @ivar max_topics: topics in all.
    @ivar max_subscriptions: subscriptions of one connection.
    @ivar max_retained_bytes: retained bytes (encoded frames) of one topic;
        0 for no bound.
    @ivar retained_bytes_policy: C{"expire"}: the oldest messages make
        room; C{"reject"}: a publish that does not fit is refused.
    @ivar max_output_buffer: bytes queued for one connection's subscription
        that it does not read (on a topic that retains nothing) before the
        C{slow_consumer} policy applies; 0 for no bound.
    @ivar slow_consumer: C{"disconnect"}: the connection gets
        C{ERROR(0, LIMIT, "slow consumer")} and is closed; C{"block"}: the
        topic's publishers are not read until the subscriber drains.
    @ivar idle_timeout: seconds a connection may send nothing before it is
        told LIMIT and closed (PING keeps it alive); 0 for none.
    @ivar frame_timeout: seconds within which a frame must be complete once
        its first byte has arrived (a client trickling bytes is told LIMIT
        and closed); 0 for none.
    @ivar max_pending_input: bytes of incomplete frames the broker holds for
        all connections; the connection that passes it is told LIMIT and
        closed.
    @ivar max_connections_per_address: open connections from one address
        (one user, for a unix socket); 0 for no bound.
    @ivar max_frame_size: bytes of a frame body, either way: a request
        longer is refused, and nothing the broker sends is longer (a
        PUBLISH whose MESSAGE would be is refused with LIMIT; TOPICS lists
        what fits).
    @ivar max_key_size: bytes of a message key; a longer one is refused (LIMIT).
    @ivar max_compaction_keys: compaction keys one topic remembers (each
        costs a few hundred bytes); a publish with a new key beyond it is
        refused with LIMIT until keys leave their window.
    @ivar max_compaction_keys_total: the same, for all topics together.
    @ivar max_client_id: bytes of a HELLO's client_id.
    @ivar durable_ttl: ms after which a durable client's positions are
        forgotten if it has neither been connected nor committed.
    @ivar max_groups: consumer groups in all (each is remembered for good);
        a SUBSCRIBE_GROUP that would make one more is refused with LIMIT.
    """

    max_connections: int = 10_000
    max_topics: int = 100_000
    max_subscriptions: int = 1_000
    max_retained_bytes: int = 0
    retained_bytes_policy: str = "expire"
    max_output_buffer: int = 16 * 1024 * 1024
    slow_consumer: str = "disconnect"
    idle_timeout: float = 300.0
    frame_timeout: float = 30.0
    max_pending_input: int = 256 * 1024 * 1024
    max_connections_per_address: int = 1024
    max_frame_size: int = 1024 * 1024
    max_key_size: int = 1024
    max_compaction_keys: int = 1_000_000
    max_compaction_keys_total: int = 4_000_000
    max_client_id: int = 256
    durable_ttl: int = 7 * 24 * 3600 * 1000
    max_groups: int = 100_000


@dataclass
class Stats:
    """Broker-wide counters, read by the metrics endpoint."""

    bytes_in: int = 0
    bytes_out: int = 0
    slow_consumer_disconnects: int = 0
    pending_input: int = 0  # bytes of incomplete frames held, all connections
    errors: Dict[int, int] = field(default_factory=dict)

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


@implementer(IEngineEvents)
class BrokerService(Service):
    """
    @ivar topics: the topics by name.
    @ivar sweep_interval: seconds between retention sweeps.  Reads expire
        lazily as well, so this only bounds how long expired messages hold
        memory, not what subscribers see.
    @ivar limits: the L{Limits} in force.
    @ivar stats: broker-wide L{Stats}; per-topic counters are on the topics.
    @ivar connections: open connections, on all listeners.
    @ivar work: the L{UnitOfWork} that requests run in (connections wrap
        each read in it), so that storage writes and fan-out happen once
        per read rather than once per message.
    @ivar ready: a Deferred that fires once storage is open and the topics
        are recovered (in L{startService}); connections read no request
        before.
    """

    name = "zaichik-broker"

    def __init__(
        self,
        storage: Optional[IStorage] = None,
        authenticator: Optional[IAuthenticator] = None,
        clock=None,
        default_retention: int = 0,
        default_compaction_window: int = 0,
        sweep_interval: float = 1.0,
        limits: Optional[Limits] = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock  # timers
        self.wall = wall_clock(clock)  # timestamps (see zaichik.clock)
        self.storage = IStorage(storage if storage is not None else MemoryStorage(self.wall))
        self.authenticator = IAuthenticator(authenticator if authenticator is not None else AllowAll())
        self.default_retention = default_retention
        self.default_compaction_window = default_compaction_window
        self.sweep_interval = sweep_interval
        self.limits = limits if limits is not None else Limits()
        self.stats = Stats()
        self.connections = 0
        self.connections_by_peer: Dict[str, int] = {}
        self.work = UnitOfWork(self.storage.sync)
        if hasattr(self.storage, "unit_of_work"):
            # Appends it finishes later, on its own (the disk's writer
            # thread), are booked inside a unit of work: their deliveries
            # go out together, as a read's do.
            self.storage.unit_of_work = self.work
        limits = self.limits
        self.keys = KeyBudget(limits.max_compaction_keys, limits.max_compaction_keys_total, limits.max_key_size)
        self.topics: Dict[str, Topic] = {}
        self.topic_names: List[str] = []  # sorted, for LIST_TOPICS
        # Wildcard subscriptions of every connection, told of new topics.
        self.patterns = PatternIndex()
        self._patterns_held: Counter = Counter()  # patterns a connection holds -> connections
        # Consumer groups, by (topic, group name): made at their first
        # SUBSCRIBE_GROUP (at their recorded position, after a restart).
        self.groups: Dict[Tuple[str, str], Group] = {}
        self._durable_sessions: Dict[str, Any] = {}  # client_id -> its Session
        self._last_seen: Dict[str, int] = {}  # client_id -> when it last left (ms)
        self._durable_queue: List[str] = []
        self._sweeper: Optional[LoopingCall] = None
        self.ready: Deferred = Deferred()
        # Several brokers share this storage (the Redis engine): its topics
        # take offsets from it, and it tells of other brokers' doings.
        self.engine: Optional[ISharedStorage] = (
            ISharedStorage(self.storage) if ISharedStorage.providedBy(self.storage) else None)
        self.shared = self.engine is not None
        if self.engine is not None:
            self.engine.watch(self)
        self._generations: Dict[str, int] = {}  # client_id -> newest takeover heard of

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        """
        Open storage and recover the topics (after twistd has daemonized:
        the data dir's lock records the right pid), then start the sweep.
        """
        super().startService()
        d = self.storage.open()
        d.addCallback(self._recovered)
        d.addErrback(self._notRecovered)

    def _recovered(self, states) -> None:
        for state in states:
            topic = self._open(state.name, state.retention_ttl, state.compaction_window, state.next_offset)
            topic.restore(state.last_timestamp, state.keys)
            topic.expire()  # what --max-retained-bytes had dropped stays dropped
        if not self.running:
            return
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(self.sweep_interval, now=False)
        self.ready.callback(None)

    def _notRecovered(self, failure) -> None:
        """
        Storage could not be opened (the data dir locked, unwritable, or in
        a newer format), or the topics not recovered: C{ready} fails with
        the reason and a running reactor is stopped.  Whoever waits on
        C{ready} says why (C{twistd zaichik}: one line on stderr, exit
        status 1); if nothing handled the failure, one line is logged here
        (with the traceback only for an unexpected error).
        """
        from twisted.internet import reactor

        from zaichik.storage import StorageError
        from zaichik.storage.disk import DataDirError, DataDirLocked

        def unreported(failure):
            if failure.check(OSError, StorageError, DataDirError, DataDirLocked):
                _log.critical("Could not open storage: {error}; stopping", error=failure.getErrorMessage())
            else:
                _log.failure("Could not open storage; stopping", failure)
            return failure

        self.ready.errback(failure)
        self.ready.addErrback(unreported)  # runs only if the failure is still unhandled
        if reactor.running and self.clock is reactor:
            from twisted.internet.error import ReactorNotRunning

            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping (twistd zaichik stopped it)

    def stopService(self) -> Deferred:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        super().stopService()
        self.work.flush()
        return self.storage.close()

    def sweep(self) -> int:
        """
        Expire retained messages on every topic.  Never raises: an error in
        one topic is logged and the others are still swept, and the
        LoopingCall that runs this keeps running.
        """
        expired = 0
        if self.engine is not None:
            self.engine.sweep()
            self.engine.renew_groups([key for key, group in self.groups.items() if group.members])
        for topic in list(self.topics.values()):
            try:
                expired += topic.expire()
            except Exception:
                _log.failure("Retention sweep failed on {topic}", topic=topic.name)
        try:
            self._expire_durable()
        except Exception:
            _log.failure("Expiring durable positions failed")
        return expired

    # At most this many durable clients are looked at per sweep (a large
    # number of them is gone through over several sweeps).
    DURABLE_SWEEP = 5_000

    def _expire_durable(self) -> None:
        """
        Forget the positions of durable clients neither connected nor
        committing for --durable-ttl: client_ids are the client's to make
        up, and each costs memory and a line in storage.
        """
        ttl = self.limits.durable_ttl
        if not ttl:
            return
        if not self._durable_queue:
            self._durable_queue = list(self.storage.commits())
        queue = self._durable_queue
        batch, self._durable_queue = queue[-self.DURABLE_SWEEP:], queue[: -self.DURABLE_SWEEP]
        now = round(self.wall.seconds() * 1000)
        commits = self.storage.last_commit_times()
        for client_id in batch:
            if client_id in self._durable_sessions:
                continue
            last = max(commits.get(client_id, 0), self._last_seen.get(client_id, 0))
            if last == 0:
                self._last_seen[client_id] = now  # not known when it was last used: from now on
            elif now - last >= ttl:
                self.storage.forget_client(client_id)
                self._last_seen.pop(client_id, None)
                self.durable_forgotten += 1
                _log.info("Forgot the positions of {client_id}, unused for {ttl} ms", client_id=client_id, ttl=ttl)

    durable_forgotten = 0

    # -- topics --------------------------------------------------------------

    def _open(self, name: str, retention: int, window: int, next_offset: int = 0) -> Topic:
        log = self.storage.open_log(name, retention, window)
        limits = self.limits
        kind = Topic
        if self.shared:
            from zaichik.shared import SharedTopic

            kind = SharedTopic
        topic = kind(name, log, self.wall, retention, window, limits.max_retained_bytes, next_offset,
                      self.work, reject_over_bytes=limits.retained_bytes_policy == "reject", keys=self.keys,
                      max_frame_size=limits.max_frame_size)
        self.topics[name] = topic
        insort(self.topic_names, name)
        if self.patterns:
            for pattern in self.patterns.match(name):
                pattern.topic_created(topic)
        return topic

    # The most wildcard subscriptions one connection holds: a message
    # reaches a connection once by its topic's name (or group) and once by
    # each of its patterns that matches (zaichik.edge.tcp.unit_output).
    most_patterns = 0

    def patterns_held(self, before: int, after: int) -> None:
        """A connection held C{before} wildcard subscriptions and now holds C{after}."""
        held = self._patterns_held
        if before:
            held[before] -= 1
            if not held[before]:
                del held[before]
        if after:
            held[after] += 1
        self.most_patterns = max(held, default=0)

    def topics_from(self, prefix: str) -> Iterator[Topic]:
        """The topics whose names start with C{prefix}, in name order."""
        names = self.topic_names
        i = bisect_left(names, prefix)
        topics = self.topics
        while i < len(names) and names[i].startswith(prefix):
            topic = topics.get(names[i])
            i += 1
            if topic is not None:
                yield topic

    def create_topic(self, name: str, retention_ttl: int, compaction_window: int) -> Topic:
        """
        Create a topic, or return the existing one if its settings match.

        @raise ZaichikError: C{TOPIC_EXISTS} if it exists with other settings.
        """
        topic = self.topics.get(name)
        if topic is None:
            if len(self.topics) >= self.limits.max_topics:
                raise ZaichikError(ErrorCode.LIMIT, f"topic limit of {self.limits.max_topics} reached")
            _log.info("Created topic {topic} (retention {retention} ms, compaction window {window} ms)",
                      topic=name, retention=retention_ttl, window=compaction_window)
            topic = self._open(name, retention_ttl, compaction_window)
            if self.shared:
                self._record_topic(topic, retention_ttl, compaction_window)
            return topic
        if (topic.retention_ttl, topic.compaction_window) != (retention_ttl, compaction_window):
            raise ZaichikError(
                ErrorCode.TOPIC_EXISTS,
                f"topic {name} exists with retention_ttl={topic.retention_ttl} "
                f"compaction_window={topic.compaction_window}",
            )
        return topic

    def _record_topic(self, topic: Topic, retention_ttl: int, compaction_window: int) -> None:
        """
        Make a new topic in the shared engine; until it answers, replies
        about the topic wait (C{topic.pending}).  Another broker may have
        made it first, with other settings: then those hold here too, and
        the request that made it here is answered TOPIC_EXISTS.
        """
        from zaichik.work import Pending

        pending = topic.pending = Pending()

        def made(recorded) -> None:
            ttl, window, _ = recorded
            if (ttl, window) != (topic.retention_ttl, topic.compaction_window):
                topic.retention_ttl, topic.compaction_window = ttl, window
                if (ttl, window) != (retention_ttl, compaction_window):
                    pending.settle(ZaichikError(
                        ErrorCode.TOPIC_EXISTS,
                        f"topic {topic.name} exists with retention_ttl={ttl} compaction_window={window}"))
                    return
            pending.settle()

        def failed(failure) -> None:
            error = failure.value if failure.check(ZaichikError) else ZaichikError(ErrorCode.INTERNAL,
                                                                                   "engine failed")
            pending.settle(error)

        assert self.engine is not None
        self.engine.create_topic(topic.name, retention_ttl, compaction_window).addCallbacks(made, failed)

    # -- what other brokers do (the shared engine's IEngineEvents) ---------------

    def topic_appeared(self, state) -> None:
        if state.name not in self.topics and self.running:
            # (Wildcard subscriptions follow a young topic from offset 0.)
            topic = self._open(state.name, state.retention_ttl, state.compaction_window,
                               0 if state.young else state.next_offset)
            topic.next_offset = max(topic.next_offset, state.next_offset)

    def learn_topic(self, name: str) -> Deferred:
        """
        Before a request names a topic this broker does not know: look for it
        in the shared engine (another broker may have made it), so that it
        is used with its settings and offsets rather than made again.
        Before a SUBSCRIBE to a known one: read its next offset, so that
        LATEST is after everything published anywhere before it.
        """
        assert self.engine is not None
        if codec.is_pattern(name):
            return self._learn_matching(name)
        if name in self.topics:
            # Known: only its next offset, which other brokers move.
            return self.engine.refresh(name).addCallback(lambda _: self._heard([name]))

        def found(state) -> None:
            if state is not None:
                self.topic_appeared(state)

        return self.engine.lookup(name).addCallback(found)

    @defer.inlineCallbacks
    def _learn_matching(self, pattern: str):
        """
        A wildcard SUBSCRIBE: every topic it matches (those made on other
        brokers that this one has not heard of yet too), with its next offset.
        """
        from zaichik.patterns import matches

        engine = self.engine
        assert engine is not None
        yield self._learn_new_topics(pattern)
        names = [n for n in self.topic_names if matches(pattern, n)]
        yield engine.describe(names)
        self._heard(names)

    def hold_group(self, topic: str, group: str) -> Deferred:
        """
        Before a SUBSCRIBE_GROUP with a shared engine: a consumer group is
        served by one broker at a time, so this broker takes the group's
        lease (or the request is refused with LIMIT: its members are on
        another broker).  A group served here before, without members now,
        starts again from its recorded position.
        """
        engine = self.engine
        assert engine is not None

        def held(ours: bool) -> None:
            if not ours:
                raise ZaichikError(ErrorCode.LIMIT, f"group {group} of {topic} is served by another broker: "
                                                    f"with --engine, a group's members connect to one broker")
            known = self.groups.get((topic, group))
            if known is not None and not known.members:
                del self.groups[(topic, group)]

        d = self.learn_topic(topic) if topic not in self.topics else defer.succeed(None)
        return d.addCallback(lambda _: engine.lease_group(topic, group)).addCallback(held)

    def resynced(self) -> None:
        """
        The engine's notifications were lost for a while: takeovers of our
        durable clients and topics made elsewhere may have gone unheard.
        """
        engine = self.engine
        assert engine is not None
        for client_id in list(self._durable_sessions):
            engine.generation(client_id).addCallback(self._claimed_elsewhere, client_id).addErrback(
                lambda f: _log.warn("Reading a takeover generation failed: {why}", why=f.getErrorMessage()))
        self._learn_new_topics().addErrback(
            lambda f: _log.warn("Reading the engine's topics failed: {why}", why=f.getErrorMessage()))

    def _claimed_elsewhere(self, generation: int, client_id: str) -> None:
        self.client_claimed(client_id, generation)

    @defer.inlineCallbacks
    def _learn_new_topics(self, pattern: Optional[str] = None):
        """Open the topics other brokers made that this one has not heard of (matching C{pattern})."""
        from zaichik.patterns import matches

        engine = self.engine
        assert engine is not None
        for name in (yield engine.names()):
            if name not in self.topics and (pattern is None or matches(pattern, name)):
                state = yield engine.lookup(name)
                if state is not None:
                    self.topic_appeared(state)

    def _heard(self, names: List[str]) -> None:
        for name in names:
            topic = self.topics.get(name)
            if topic is not None:
                topic.heard()

    def client_claimed(self, client_id: str, generation: int) -> None:
        """A broker (this one too) took C{client_id} over: a session here that held it before closes."""
        session = self._durable_sessions.get(client_id)
        if session is None:
            return  # (not here: nothing to remember, whatever the number of clients elsewhere)
        if generation > self._generations.get(client_id, 0):
            self._generations[client_id] = generation
        if 0 < session.generation < generation:
            _log.info("Client {client_id} taken over on another broker", client_id=client_id)
            self._durable_sessions.pop(client_id, None)
            self._generations.pop(client_id, None)
            session.taken_over()

    def topic(self, name: str) -> Topic:
        """The topic C{name}, created with the broker's defaults if it is new."""
        topic = self.topics.get(name)
        if topic is None:
            topic = self.create_topic(name, self.default_retention, self.default_compaction_window)
        return topic

    # -- consumer groups -----------------------------------------------------------

    def group(self, topic: Topic, name: str, start: int = 0) -> Tuple[Group, Optional[Deferred]]:
        """
        Group C{name} of C{topic}, made if new: at its recorded position if
        storage has one (after a restart), else at C{start}.  With it, what
        recording a new group's position returns (None for a known group).
        """
        key = (topic.name, name)
        group = self.groups.get(key)
        if group is not None:
            return group, None
        recorded = self.storage.group_positions().get(topic.name, {}).get(name)
        if recorded is None and len(self.groups) >= self.limits.max_groups:
            raise ZaichikError(ErrorCode.LIMIT, f"group limit of {self.limits.max_groups} reached")
        position = start if recorded is None else min(max(recorded, 0), topic.next_offset)
        group = Group(topic, name, position, self.clock, self.work,
                      lambda offset: self.storage.record_group_position(topic.name, name, offset))
        self.groups[key] = group
        if recorded is None:
            group.recorded = position
            return group, self.storage.record_group_position(topic.name, name, position)
        return group, None

    def list_topics(self) -> List[TopicInfo]:
        return [self.topics[name].info() for name in self.topic_names]

    # -- durable clients ---------------------------------------------------------

    def attach(self, client_id: str, session) -> Optional[Deferred]:
        """
        Bind durable C{client_id} to C{session}; a session that held it
        before is taken over (closed).  With a shared engine, a Deferred
        that fires once the engine has it (and the client's positions).
        """
        previous = self._durable_sessions.get(client_id)
        self._durable_sessions[client_id] = session
        if previous is not None and previous is not session:
            _log.info("Client {client_id} taken over by a new connection", client_id=client_id)
            previous.taken_over()
        if self.engine is None:
            return None
        # Everywhere else too, and its committed offsets loaded from the engine.
        session.generation = 0

        def claimed(generation: int) -> None:
            session.generation = generation
            if self._generations.get(client_id, 0) > generation and self._durable_sessions.get(client_id) is session:
                self.client_claimed(client_id, self._generations[client_id])

        return self.engine.claim_client(client_id).addCallback(claimed)

    def detach(self, client_id: str, session) -> None:
        if self._durable_sessions.get(client_id) is session:
            del self._durable_sessions[client_id]
            self._generations.pop(client_id, None)
            self._last_seen[client_id] = round(self.wall.seconds() * 1000)

    def durable_positions(self) -> Dict[str, Dict[str, int]]:
        """Committed offsets of durable clients: C{{client_id: {topic: offset}}}."""
        return self.storage.commits()

    def committed(self, client_id: str, topic: str) -> Optional[int]:
        return self.storage.commits().get(client_id, {}).get(topic)

    def record_commit(self, client_id: str, topic: str, offset: int) -> Deferred:
        """Fires once the commit is as durable as the storage promises."""
        return self.storage.record_commit(client_id, topic, offset)
