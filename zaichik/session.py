"""
One client connection's state and the meaning of each request.

A L{Session} knows nothing of sockets or bytes on the wire: the protocol
hands it decoded requests and gives it three callables, to send a reply, to
write an already encoded frame, and to close the connection.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Literal, Optional, Tuple, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from zaichik import codec
from zaichik.codec import ErrorCode
from zaichik.auth import ALLOW_ALL, Permissions
from zaichik.errors import ZaichikError
from zaichik.groups import GroupMember
from zaichik.patterns import PatternSubscription, literal_prefix
from zaichik.service import BrokerService
from zaichik.storage import StorageError
from zaichik.subscription import Output, Subscription
from zaichik.topic import Topic
from zaichik.work import Late, Pending

_log = Logger()


_PUBLISHES = (codec.Publish, codec.PublishBatch)
# Replies not sent for a request with rid 0 (fire and forget).
_SILENT_AT_RID_0 = (codec.Published, codec.PublishedBatch)


def _storage_error(failure) -> ZaichikError:
    if failure.check(ZaichikError):
        return failure.value
    _log.failure("Storage failed", failure)
    return StorageError("storage failed")


def _check_topic(name: str) -> None:
    if not codec.is_valid_topic(name):
        if codec.is_pattern(name):
            raise ZaichikError(ErrorCode.BAD_TOPIC, "a pattern is allowed in SUBSCRIBE and UNSUBSCRIBE only")
        raise ZaichikError(ErrorCode.BAD_TOPIC,
                           "a topic name is 1 to 249 bytes of A-Z a-z 0-9 . _ - /")


def _pending(d: Optional[Deferred]) -> Optional[Pending]:
    """What a reply must wait for, given what storage returned for a write (None: nothing)."""
    if d is None or (d.called and d.result is None):
        return None  # (stored already)
    pending = Pending()
    d.addCallbacks(lambda _: pending.settle(), lambda f: pending.settle(_storage_error(f)))
    return None if pending.done and pending.error is None else pending


def _either(first: Optional[Pending], second: Optional[Pending]) -> Optional[Pending]:
    """One L{Pending} for two: settled once both are, with the first error."""
    if first is None or second is None:
        return first if second is None else second
    both = Pending()

    def settled() -> None:
        if first.done and second.done and not both.done:
            both.settle(first.error or second.error)

    first.when_done(settled)
    second.when_done(settled)
    return both


class Session:
    """
    @ivar client_id: the durable client id given by HELLO, or "".
    @ivar subscriptions: this connection's subscriptions by topic name.
    @ivar patterns: its wildcard subscriptions by pattern (protocol 1.1).
    @ivar groups: its consumer group memberships by topic name (protocol
        1.1); a topic has at most one subscription here or in
        C{subscriptions}.
    """

    def __init__(
        self,
        service: BrokerService,
        reply: Callable[[object], None],
        write: Callable[[Union[bytes, List[bytes]]], None],
        disconnect: Callable[[], None],
        peer: str = "",
        pieces: bool = False,
    ) -> None:
        self.service = service
        self.peer = peer
        self.client_id = ""
        # None until HELLO authenticates, where the broker requires it.
        self.permissions: Optional[Permissions] = (
            None if service.authenticator.requires_hello else ALLOW_ALL)
        self._allowed: Dict[Tuple[str, str], bool] = {}
        self.subscriptions: Dict[str, Subscription] = {}
        self.patterns: Dict[str, PatternSubscription] = {}
        self.groups: Dict[str, GroupMember] = {}
        self.ended = False
        # (pieces: C{write} takes a list of bytes too: see Output.)
        self.output = Output(self._write_ordered, pieces)
        self._send_reply = reply
        self._write = write
        # Once a reply must wait for storage (see L{zaichik.work}), what
        # follows it (replies and MESSAGE frames) waits behind it, in order:
        # (reply or frame bytes, the Pending it waits on or None).
        self._queue: Optional[Deque[tuple]] = None
        self._close_when_sent = False
        self._when_sent: list = []  # called once nothing waits in _queue
        self._disconnect = disconnect
        self._requests = 0
        self._hello_seen = False
        self.generation = 0  # of its client_id's takeover, with a shared engine
        self._commits: Dict[str, int] = {}
        self._last_sent: Dict[str, int] = {}
        self._handlers: Dict[type, Callable[[Any], Optional[Deferred]]] = {
            codec.Hello: self._hello,
            codec.CreateTopic: self._create_topic,
            codec.Subscribe: self._subscribe,
            codec.Unsubscribe: self._unsubscribe,
            codec.Commit: self._commit,
            codec.Close: self._close,
            codec.Ping: self._ping,
            codec.ListTopics: self._list_topics,
            codec.PublishBatch: self._publish_batch,
            codec.SubscribeGroup: self._subscribe_group,
            codec.Ack: self._ack,
        }

    # -- dispatch ----------------------------------------------------------------

    def handle(self, request, learnt: bool = False) -> Optional[Deferred]:
        """
        Carry out one request and send its reply.

        @return: None when the reply has been sent, or a Deferred that fires
            once it has: the caller must not hand over the next request
            before then, so that replies keep the order of requests.
        """
        if self.ended:
            return None
        if type(request) is codec.Publish:
            # (Only embedders and tests hand over request objects: the edges
            # pass the bytes, as here.)
            return self.publish_frame(request.encode()) or None
        if type(request) not in _PUBLISHES:
            # Any other request sees what was published before it on this
            # connection (in the same read too) as stored: the unit of work
            # is ended, and where storage answers later (--fsync always),
            # the request waits for the replies before it.
            self.service.work.flush()
            if self.ended:
                return None  # (ended by that flush: its own subscription overflowed)
            if self._queue:
                waited: Deferred = Deferred()
                self._when_sent.append(lambda: waited.callback(None))
                return waited.addCallback(lambda _: self.handle(request))
        service = self.service
        if service.engine is not None and not learnt:
            if type(request) is codec.SubscribeGroup and codec.is_valid_topic(request.topic):
                # Served by one broker at a time: take it here (or refuse).
                return service.hold_group(request.topic, request.group).addCallbacks(
                    lambda _: self.handle(request, True), self._asyncFailed, errbackArgs=(request.rid,))
            name = getattr(request, "topic", None)
            if name is not None and (type(request) is codec.Subscribe or name not in service.topics and
                                     codec.is_valid_topic(name)):
                # A topic another broker may have made: learn it first.
                return service.learn_topic(name).addCallbacks(lambda _: self.handle(request, True),
                                                              self._asyncFailed, errbackArgs=(request.rid,))
        self._requests += 1
        if self.permissions is None and type(request) is not codec.Hello:
            self._refuse(request.rid, "authenticate with HELLO first")
            return None
        try:
            with self.service.work:
                result = self._handlers[type(request)](request)
        except ZaichikError as e:
            self.fail(request.rid, e)
            return None
        except Exception:
            _log.failure("Internal error handling {request!r}", request=request)
            self.fail(request.rid, ZaichikError(ErrorCode.INTERNAL, "internal error"))
            return None
        if result is not None and isinstance(result, Deferred):
            return result.addErrback(self._asyncFailed, request.rid)
        return None

    def publish_frame(self, body: bytes, learnt: bool = False) -> Union[None, Literal[False], Deferred]:
        """
        PUBLISH, from its frame body: the one PUBLISH path.  Every edge hands
        PUBLISH bodies here (no request object is made: this is the
        broker's hot path), and so does L{handle} with a L{codec.Publish}.
        Returns False if the body is not a well-formed PUBLISH (the edge
        then decodes it, to say what is wrong), else as L{handle} does: a
        Deferred when a slow subscriber holds the topic's publishers back.
        """
        fields = codec.parse_publish(body)
        if fields is None:
            return False
        return self._publish(*fields)

    def _publish(self, rid: int, name: str, key: Optional[bytes], value: bytes,
                 learnt: bool = False) -> Optional[Deferred]:
        """One PUBLISH, from its fields (see L{publish_frame})."""
        if self.ended:
            return None
        service = self.service
        permissions = self.permissions
        topic = service.topics.get(name)
        if topic is None and service.engine is not None and not learnt and permissions is not None \
                and codec.is_valid_topic(name):
            # A topic another broker may have made: learn it first (as
            # L{handle} does), reading nothing more meanwhile.
            return service.learn_topic(name).addCallbacks(lambda _: self._publish(rid, name, key, value, True),
                                                          self._asyncFailed, errbackArgs=(rid,))
        self._requests += 1
        if permissions is None:
            self._refuse(rid, "authenticate with HELLO first")
            return None
        work = service.work
        if not work.depth:
            work.now = 0
        work.depth += 1  # (the unit of work, entered without the with statement's cost)
        try:
            if topic is None or permissions is not ALLOW_ALL:
                topic = self._topic(name)  # (created, or permissions asked)
            if rid or topic.answers_late:
                reply = topic.published(rid, key, value)
            else:
                # rid 0 on a local topic: no reply is made unless it is
                # needed below (a reply object per message cost the hot
                # path a tenth of its rate).
                reply = None
                offset, duplicate = topic.publish(key, value)
            pending = topic.pending
            if pending is not None and pending.done:
                pending = None  # (stored already: topic.waiting(), inline)
            if rid:
                self._reply(reply, pending)
            elif pending is not None and not pending.watched and topic.fails_later:
                # A fire-and-forget publish: only its failure is told, once
                # per append (the publishes of one read to one topic share
                # one), however the read's publishes alternate between
                # topics (one queued reply per publish cost half the time
                # of a publish with 100 topics in a read).
                pending.watched = True
                self._reply(reply or codec.Published(0, offset, duplicate), pending)
            if topic.blocked:
                # Backpressure: read nothing more from this publisher until
                # the topic's slow subscribers have drained.
                return topic.when_unblocked().addErrback(self._asyncFailed, rid)
        except ZaichikError as e:
            self.fail(rid, e)
        except Exception:
            _log.failure("Internal error publishing to {topic}", topic=name)
            self.fail(rid, ZaichikError(ErrorCode.INTERNAL, "internal error"))
        finally:
            work.depth -= 1
            if not work.depth:
                work.flush()
        return None

    def publish_run(self, groups: Dict[str, List[Tuple[Optional[bytes], bytes]]],
                    count: int) -> Union[None, Literal[False], Deferred]:
        """
        A run of C{count} fire-and-forget PUBLISHes (rid 0) from one read, as
        L{codec.parse_publish_run} groups them: each topic's in one call
        (L{Topic.publish_all}, whose frames the accelerator makes in C),
        rather than a call through this module per message, which was most
        of the broker's time per message (cProfile, 1 -> 1 and 100 topics).
        The same as publishing them one by one: offsets, timestamps and
        deliveries are per topic and per unit of work (the read's
        deliveries to different topics go in the order the topics were
        first stored to, which a run changes only when a topic's first
        message in it is refused and a later one stored: the protocol
        orders messages per topic), and a group that
        breaks a limit (refused whole, before anything is stored) is
        published one by one, each refused or not on its own (a topic the
        connection may not publish to, too: its permissions are asked once
        a group).  Only once HELLO is answered (L{may_publish_runs}); under the
        block policy a held topic holds the reading after the run, where one
        by one it would after its message.  With an engine, a run naming a
        topic this broker does not know yet is declined (False): the framer
        then hands its frames over one by one.
        """
        if self.ended:
            return None
        topics = self.service.topics
        if self.service.engine is not None and not all(name in topics for name in groups):
            return False  # (a topic another broker may have made: learnt one by one, see _publish)
        self._requests += count
        held = None
        for name, entries in groups.items():
            topic = topics.get(name)
            try:
                if topic is None or self.permissions is not ALLOW_ALL:
                    topic = self._topic(name)  # (created, or permissions asked: once a group)
                if topic.answers_late:
                    topic.publish_all(entries)  # (staged: the engine decides offsets and duplicates)
                elif topic.stage_run(entries):
                    pass  # (as one block of frames: the common case, in one call)
                elif len(entries) == 1:
                    topic.publish(*entries[0])  # (a batch of one costs more than one)
                elif topic.compaction_window:
                    # Keys to look up one by one anyway: so is each refused.
                    for key, value in entries:
                        try:
                            topic.publish(key, value)
                        except ZaichikError as e:
                            self.fail(0, e)
                else:
                    topic.publish_all(entries)
            except ZaichikError:
                for key, value in entries:
                    self._requests -= 1  # (counted again, one by one)
                    waiting = self._publish(0, name, key, value)
                    held = held or waiting
                continue
            except Exception:
                _log.failure("Internal error publishing to {topic}", topic=name)
                self.fail(0, ZaichikError(ErrorCode.INTERNAL, "internal error"))
                continue
            pending = topic.pending
            if pending is not None and not pending.done and not pending.watched and topic.fails_later:
                pending.watched = True  # (only a failure is told: see _publish)
                self._reply(codec.Published(0, topic.next_offset - 1, False), pending)
            if topic.blocked and held is None:
                held = topic.when_unblocked().addErrback(self._asyncFailed, 0)
        return held

    @property
    def may_publish_runs(self) -> bool:
        """May the framer hand this connection's fire-and-forget PUBLISHes over as runs (L{publish_run})?"""
        return self.permissions is not None and not self.ended  # (before HELLO, each is refused)

    _told = None

    def fail(self, rid: int, error: ZaichikError, close: bool = False) -> None:
        """
        Answer with an ERROR frame; then close the connection if C{close}, or
        where the protocol says so.
        """
        self.service.stats.error(int(error.code))
        self._reply(codec.Error(rid, int(error.code), error.message[:1000]))
        if close or error.code in (ErrorCode.UNSUPPORTED_VERSION, ErrorCode.FRAME_TOO_LARGE):
            self.close()

    # -- ordered output ----------------------------------------------------------

    def _reply(self, reply, pending=None) -> None:
        """
        Send C{reply}, after whatever waits before it; with C{pending} (a
        L{Pending}), once that append is stored (or as an ERROR if it failed).
        A reply with rid 0 is not sent, but its failure is.  A L{Late} reply
        (an engine that assigns offsets) is made once C{pending} settles.
        """
        if type(reply) is Late and (pending is None or pending.done):
            reply = reply.make()
        if pending is not None and (not pending.done or pending.error is not None):
            if self._queue is None:
                self._queue = deque()
            queue = self._queue
            if not pending.done:
                if not queue or queue[-1][1] is not pending:
                    pending.when_done(self._send_queued)
                queue.append((reply, pending))
            else:
                queue.append((reply, pending))
                self._send_queued()
        elif self._queue:
            self._queue.append((reply, None))
        elif reply.rid or type(reply) not in _SILENT_AT_RID_0:
            self._send_reply(reply)

    def _write_ordered(self, frames: Union[bytes, List[bytes]]) -> None:  # (see Output.pieces)
        """MESSAGE frames for a subscription (in one bytes, or pieces): behind any reply still waiting."""
        if self._queue:
            self._queue.append((frames, None))
        else:
            self._write(frames)

    def _send_queued(self) -> None:
        """Send, in order, what no longer waits."""
        queue = self._queue
        while queue:
            item, pending = queue[0]
            if pending is not None and not pending.done:
                return
            queue.popleft()
            if type(item) is bytes or type(item) is list:
                self._write(item)  # type: ignore[arg-type]
            elif pending is not None and pending.error is not None:
                if item.rid or pending.error is not self._told:
                    if not item.rid:
                        # A fire-and-forget publish's failure is told once (rid 0).
                        self._told = pending.error
                    self.service.stats.error(int(pending.error.code))
                    self._send_reply(codec.Error(item.rid, int(pending.error.code), pending.error.message[:1000]))
            else:
                if type(item) is Late:
                    item = item.make()
                if item.rid or type(item) not in _SILENT_AT_RID_0:
                    self._send_reply(item)
        if queue:
            return
        if self._close_when_sent and not self.ended:
            self.close()
        waiting, self._when_sent = self._when_sent, []
        for then in waiting:
            then()

    def _asyncFailed(self, failure, rid: int) -> None:
        if failure.check(ZaichikError):
            self.fail(rid, failure.value)
        else:
            _log.failure("Internal error in an asynchronous request", failure)
            self.fail(rid, ZaichikError(ErrorCode.INTERNAL, "internal error"))

    # -- connection lifecycle ----------------------------------------------------

    def end(self) -> None:
        """The connection is gone (or going): end its subscriptions."""
        if self.ended:
            return
        self.ended = True
        # Messages published earlier in the current read are owed to these
        # subscriptions (they were present): deliver them before ending.
        self.service.work.flush()
        for subscription in self.subscriptions.values():
            subscription.cancel()
        self.subscriptions.clear()
        for pattern in self.patterns.values():
            self.service.patterns.remove(pattern)
            pattern.cancel()
        self.service.patterns_held(len(self.patterns), 0)
        self.patterns.clear()
        members = list(self.groups.values())
        self.groups.clear()
        for member in members:
            member.leave()  # what was outstanding goes to the other members
        if self.client_id:
            self.service.detach(self.client_id, self)

    def close(self) -> None:
        """End the session and close its connection (once what is written is sent)."""
        self.end()
        self._disconnect()

    def taken_over(self) -> None:
        """Another connection has claimed this one's client_id."""
        self.close()

    # -- output flow control ---------------------------------------------------

    def pause_output(self) -> None:
        """The connection's output buffer is full: subscriptions hold back."""
        self.output.paused = True

    def resume_output(self) -> None:
        """The output buffer has drained: subscriptions send what waits."""
        self.output.paused = False
        for subscription in list(self.subscriptions.values()):
            subscription.drain()
            if self.output.paused:
                return
        for pattern in list(self.patterns.values()):
            pattern.drain()
            if self.output.paused:
                return
        for member in list(self.groups.values()):
            member.group.dispatch()
            if self.output.paused:
                return

    def _subscriptionStopped(self, subscription: Subscription, why: str) -> None:
        """A subscription ended on the broker's side: forget it, and tell the client (rid 0)."""
        name = subscription.topic.name
        if self.subscriptions.get(name) is not subscription:
            return
        del self.subscriptions[name]
        if subscription.last_sent is not None:
            self._last_sent[name] = subscription.last_sent
        subscription.cancel()
        if not self.ended:
            self.fail(0, ZaichikError(ErrorCode.INTERNAL, f"subscription to {name} ended: {why}"))

    def _patternStopped(self, pattern: PatternSubscription, subscription: Subscription, why: str) -> None:
        """One topic of a wildcard subscription ended on the broker's side: it is no longer followed."""
        name = subscription.topic.name
        if pattern.subscriptions.get(name) is not subscription:
            return
        pattern.drop(name)
        self._remember_sent(name, subscription.last_sent)
        if not self.ended:
            self.fail(0, ZaichikError(ErrorCode.INTERNAL, f"subscription to {name} (by {pattern.pattern}) "
                                                          f"ended: {why}"))

    def _memberStopped(self, member: GroupMember, why: str) -> None:
        """A group membership ended on the broker's side: forget it, and tell the client (rid 0)."""
        name = member.topic.name
        if self.groups.get(name) is not member:
            return
        del self.groups[name]
        member.leave()
        if not self.ended:
            self.fail(0, ZaichikError(ErrorCode.INTERNAL, f"group {member.group.name} on {name} ended: {why}"))

    def _overflowed(self, subscription: Subscription) -> None:
        """A subscription's queue passed the output limit: a slow consumer."""
        if self.service.limits.slow_consumer == "block":
            subscription.blocking = True
            subscription.topic.block(subscription)
            return
        _log.warn("Slow consumer on {topic}: {pending} bytes waiting; disconnecting",
                  topic=subscription.topic.name, pending=subscription.pending_bytes)
        self.service.stats.slow_consumer_disconnects += 1
        self.fail(0, ZaichikError(ErrorCode.LIMIT, "slow consumer"), close=True)

    # -- commits -------------------------------------------------------------

    def committed(self, topic: str) -> Optional[int]:
        if self.client_id:
            return self.service.committed(self.client_id, topic)
        return self._commits.get(topic)

    def _record_commit(self, topic: str, offset: int) -> Optional[Pending]:
        """Remember a commit; returns what its reply must wait for (storage), if anything."""
        if not self.client_id:
            self._commits[topic] = offset
            return None
        return _pending(self.service.record_commit(self.client_id, topic, offset))

    def _remember_sent(self, name: str, last_sent: Optional[int]) -> None:
        """The connection's highest offset sent on topic C{name}, kept past the subscription that sent it."""
        if last_sent is not None and last_sent > self._last_sent.get(name, -1):
            self._last_sent[name] = last_sent

    def _following(self, name: str) -> list:
        """This connection's plain and wildcard subscriptions to topic C{name}."""
        found = []
        plain = self.subscriptions.get(name)
        if plain is not None:
            found.append(plain)
        for pattern in self.patterns.values():
            subscription = pattern.subscriptions.get(name)
            if subscription is not None:
                found.append(subscription)
        return found

    def _count_subscriptions(self) -> None:
        """Refuse with LIMIT a subscription beyond --max-subscriptions (plain, pattern and group alike)."""
        limit = self.service.limits.max_subscriptions
        if len(self.subscriptions) + len(self.patterns) + len(self.groups) >= limit:
            raise ZaichikError(ErrorCode.LIMIT, f"subscription limit of {limit} per connection reached")

    # -- requests ------------------------------------------------------------

    def _hello(self, request: codec.Hello) -> Optional[Deferred]:
        if self._hello_seen:
            raise ZaichikError(ErrorCode.PROTOCOL, "a second HELLO")
        self._hello_seen = True
        if self._requests > 1:
            raise ZaichikError(ErrorCode.PROTOCOL, "HELLO must be the first request")
        limit = self.service.limits.max_client_id
        if len(request.client_id.encode()) > limit:
            self.fail(request.rid, ZaichikError(ErrorCode.LIMIT, f"a client_id is at most {limit} bytes"),
                      close=True)
            return None
        if request.version != codec.PROTOCOL_VERSION:
            raise ZaichikError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"version {request.version} is not supported; this broker speaks {codec.PROTOCOL_VERSION}",
            )
        d = maybeDeferred(self.service.authenticator.authenticate, request.client_id, request.token,
                          self.peer)
        return d.addCallbacks(self._authenticated, self._not_authenticated,
                              callbackArgs=(request,), errbackArgs=(request,))

    def _refuse(self, rid: int, why: str) -> None:
        """NOT_AUTHORIZED for a connection that has not authenticated: it is closed."""
        self.fail(rid, ZaichikError(ErrorCode.NOT_AUTHORIZED, why), close=True)

    def _not_authenticated(self, failure, request: codec.Hello) -> None:
        if self.ended:
            return
        if failure.check(ZaichikError) and failure.value.code == ErrorCode.NOT_AUTHORIZED:
            self._refuse(request.rid, failure.value.message)
            return
        return failure

    def _authenticated(self, permissions: Permissions, request: codec.Hello) -> None:
        if self.ended:
            return
        self.permissions = permissions
        waiting = None
        if request.client_id:
            self.client_id = request.client_id
            waiting = _pending(self.service.attach(request.client_id, self))
        self._reply(codec.Ok(request.rid), waiting)

    def _allow(self, action: str, name: str) -> None:
        """
        Refuse with NOT_AUTHORIZED unless the connection's permissions allow
        C{action} (publish, subscribe, create) on topic C{name}; using a topic
        that does not exist yet creates it, so that needs C{create} too.
        """
        permissions = self.permissions
        if permissions is ALLOW_ALL:
            return
        assert permissions is not None  # (handle refuses every request before HELLO where HELLO is required)
        allowed = self._allowed.get((action, name))
        if allowed is None:
            allowed = getattr(permissions, "may_" + action)(name)
            if name not in self.service.topics:
                # Using a new topic creates it; and only existing topics are
                # cached, so that made-up names cannot grow the cache.
                allowed = allowed and (action == "create" or permissions.may_create(name))
            else:
                self._allowed[(action, name)] = allowed
        if not allowed:
            raise ZaichikError(ErrorCode.NOT_AUTHORIZED, f"not allowed to {action} {name}")

    def _create_topic(self, request: codec.CreateTopic) -> None:
        _check_topic(request.topic)
        self._allow("create", request.topic)
        topic = self.service.create_topic(request.topic, request.retention_ttl, request.compaction_window)
        self._reply(codec.Ok(request.rid), topic.waiting())

    def _subscribe(self, request: codec.Subscribe) -> None:
        name = request.topic
        if not codec.is_valid_topic(name) and codec.is_pattern(name):
            return self._subscribe_pattern(request)
        _check_topic(name)
        if name in self.subscriptions or name in self.groups:
            raise ZaichikError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {name}")
        self._count_subscriptions()
        self._allow("subscribe", name)
        topic = self.service.topic(name)
        first = topic.start_offset(request.start, request.offset, self.committed(name))
        subscription = Subscription(topic, self.output, request.max_inflight, self._last_sent.get(name),
                                    first, self.service.limits.max_output_buffer, self._overflowed,
                                    self._subscriptionStopped)
        topic.subscribe(subscription)
        self.subscriptions[name] = subscription
        self._reply(codec.Ok(request.rid), topic.waiting())
        subscription.drain()

    def _subscribe_pattern(self, request: codec.Subscribe) -> None:
        """
        SUBSCRIBE with a pattern: follow every matching topic the connection
        may subscribe to, those that exist now (from C{start}, each with its
        own durable position) and those created later (from their first
        message).  A pattern creates no topic.
        """
        name = request.topic
        if name in self.patterns:
            raise ZaichikError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {name}")
        self._count_subscriptions()
        limits = self.service.limits
        pattern: PatternSubscription

        def follow(topic: Topic, start: Optional[int]) -> Optional[Subscription]:
            if not self._may("subscribe", topic.name):
                return None
            return Subscription(topic, self.output, request.max_inflight, self._last_sent.get(topic.name), start,
                                limits.max_output_buffer, self._overflowed,
                                lambda subscription, why: self._patternStopped(pattern, subscription, why))

        pattern = PatternSubscription(name, follow)
        for topic in list(self.service.topics_from(literal_prefix(name))):
            if pattern.matches(topic.name):  # (follow() asks the permissions)
                pattern.follow(topic, topic.start_offset(request.start, request.offset, self.committed(topic.name)))
        self.service.patterns.add(pattern)
        self.patterns[name] = pattern
        self.service.patterns_held(len(self.patterns) - 1, len(self.patterns))
        self._reply(codec.Ok(request.rid))
        pattern.drain()

    def _may(self, action: str, name: str) -> bool:
        """Do the connection's permissions allow C{action} on existing topic C{name}?"""
        if self.permissions is ALLOW_ALL:
            return True
        try:
            self._allow(action, name)
        except ZaichikError:
            return False
        return True

    def _subscribe_group(self, request: codec.SubscribeGroup) -> None:
        """
        SUBSCRIBE_GROUP: join group C{request.group} of a topic that retains
        messages (made, if new, at C{start}; DEFAULT means EARLIEST).  The OK
        comes before the messages the membership releases, and waits for the
        new group's position to be recorded.
        """
        name = request.topic
        _check_topic(name)  # (a pattern too: BAD_TOPIC)
        if not codec.is_valid_topic(request.group):
            raise ZaichikError(ErrorCode.BAD_TOPIC, "a group name is 1 to 249 bytes of A-Z a-z 0-9 . _ - /")
        if name in self.subscriptions or name in self.groups:
            raise ZaichikError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {name}")
        self._count_subscriptions()
        permissions = self.permissions
        if permissions is not ALLOW_ALL and permissions is not None and not permissions.may_subscribe(name):
            raise ZaichikError(ErrorCode.NOT_AUTHORIZED, f"not allowed to subscribe {name}")
        topic = self.service.topics.get(name)
        if topic is None:
            if not self.service.default_retention:
                raise ZaichikError(ErrorCode.BAD_TOPIC, f"{name} does not exist, and a new topic would retain "
                                                        f"nothing: a group needs retained messages")
            self._allow("subscribe", name)  # (using a new topic creates it: that needs create too)
            topic = self.service.topic(name)
        if not topic.retains:
            raise ZaichikError(ErrorCode.BAD_TOPIC, f"{name} retains nothing (retention_ttl 0): "
                                                    f"a group needs retained messages")
        start = codec.Start.EARLIEST if request.start == codec.Start.DEFAULT else request.start
        # (Where the group begins, if it is new: a known group ignores it.)
        group, recorded = self.service.group(topic, request.group, topic.start_offset(start, request.offset))
        member = GroupMember(group, self.output, request.max_inflight, request.ack_timeout, self._memberStopped)
        group.join(member)
        self.groups[name] = member
        self._reply(codec.Ok(request.rid), _pending(recorded))
        group.dispatch()  # after the reply: what it releases follows it

    def _ack(self, request: codec.Ack) -> None:
        name = request.topic
        _check_topic(name)
        member = self.groups.get(name)
        if member is None:
            raise ZaichikError(ErrorCode.NOT_SUBSCRIBED, f"not a member of a group on {name}")
        if not member.acknowledge(request.offset):
            raise ZaichikError(ErrorCode.BAD_OFFSET, f"offset {request.offset} is not outstanding for this "
                                                     f"member of {member.group.name} on {name}")
        self._reply(codec.Ok(request.rid), _pending(member.group.settle()))
        member.group.dispatch()  # after the reply: what it releases follows it

    def _unsubscribe(self, request: codec.Unsubscribe) -> None:
        name = request.topic
        if not codec.is_valid_topic(name) and codec.is_pattern(name):
            pattern = self.patterns.pop(name, None)
            if pattern is None:
                raise ZaichikError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {name}")
            self.service.work.flush()  # what was published before this request is delivered
            self.service.patterns_held(len(self.patterns) + 1, len(self.patterns))
            self.service.patterns.remove(pattern)
            pattern.cancel()
            for topic, followed in pattern.subscriptions.items():
                self._remember_sent(topic, followed.last_sent)
            self._reply(codec.Ok(request.rid))
            return
        _check_topic(name)
        member = self.groups.pop(name, None)
        if member is not None:
            self.service.work.flush()
            member.leave()  # what was outstanding goes back to the group
            self._reply(codec.Ok(request.rid))
            return
        subscription = self.subscriptions.pop(name, None)
        if subscription is None:
            raise ZaichikError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {name}")
        self.service.work.flush()  # what was published before this request is delivered
        subscription.cancel()
        self._remember_sent(name, subscription.last_sent)
        self._reply(codec.Ok(request.rid))

    def _topic(self, name: str):
        """The topic C{name}, created with the defaults if new (the hot path: a
        known topic's name needs no checking)."""
        topic = self.service.topics.get(name)
        if topic is None:
            _check_topic(name)
            self._allow("publish", name)
            topic = self.service.topic(name)
        elif self.permissions is not ALLOW_ALL:
            self._allow("publish", name)
        return topic

    def _publish_batch(self, request: codec.PublishBatch) -> Optional[Deferred]:
        topic = self._topic(request.topic)
        if request.rid or topic.answers_late:
            self._reply(topic.published_batch(request.rid, request.entries), topic.waiting())
        else:
            # Fire-and-forget (rid 0): no reply is sent, so none is made (a
            # list of results a batch was a third of the broker's time under
            # PUBLISH_BATCH x100, cProfile), and only a failure is told, once
            # per append, as for PUBLISH (see _publish).
            topic.publish_all(request.entries)
            pending = topic.waiting()
            if pending is not None and not pending.watched and topic.fails_later:
                pending.watched = True
                self._reply(codec.PublishedBatch(0, []), pending)
        return topic.when_unblocked() if topic.blocked else None

    def _commit(self, request: codec.Commit) -> None:
        name = request.topic
        _check_topic(name)
        if self.patterns or self.groups:
            return self._commit_shared(request)
        subscription = self.subscriptions.get(name)
        if subscription is None:
            raise ZaichikError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {name}")
        last = self.committed(name)
        if last is None or request.offset > last:
            if subscription.last_sent is None or request.offset > subscription.last_sent:
                raise self._not_sent(name, request.offset, subscription.last_sent)
            waiting = self._record_commit(name, request.offset)
        else:
            waiting = None
        # Even a commit that does not move the committed offset acknowledges
        # what this subscription sent up to it (messages sent again after a
        # resume sit at or below the committed offset): the window opens.
        self._reply(codec.Ok(request.rid), waiting)
        subscription.acknowledge(request.offset)  # after the reply: what it releases follows it

    def _commit_shared(self, request: codec.Commit) -> None:
        """
        COMMIT on a connection with patterns or group memberships: the
        topic may be followed by a plain subscription and patterns (each is
        acknowledged, the commit recorded once) or by a group membership
        (what is outstanding for the member up to the offset is
        acknowledged).  BAD_OFFSET past the highest offset sent to the
        connection on the topic, by any of them.
        """
        name = request.topic
        following = self._following(name)
        member = self.groups.get(name)
        if not following and member is None:
            raise ZaichikError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {name}")
        sent = [s.last_sent for s in following if s.last_sent is not None]
        if member is not None and member.last_sent is not None:
            sent.append(member.last_sent)
        highest = max(sent) if sent else None
        if member is not None and (highest is None or request.offset > highest):
            raise self._not_sent(name, request.offset, highest)
        waiting = None
        if following:
            last = self.committed(name)
            if last is None or request.offset > last:
                if highest is None or request.offset > highest:
                    raise self._not_sent(name, request.offset, highest)
                waiting = self._record_commit(name, request.offset)
        if member is not None:
            member.acknowledge_through(request.offset)
            waiting = _either(waiting, _pending(member.group.settle()))
        self._reply(codec.Ok(request.rid), waiting)
        # After the reply: what it releases follows it.
        for subscription in following:
            subscription.acknowledge(request.offset)
        if member is not None:
            member.group.dispatch()

    @staticmethod
    def _not_sent(name: str, offset: int, highest: Optional[int]) -> ZaichikError:
        return ZaichikError(ErrorCode.BAD_OFFSET,
                            f"offset {offset} has not been sent on {name} (highest sent: {highest})")

    def _close(self, request: codec.Close) -> None:
        self._reply(codec.Ok(request.rid))
        if self._queue:
            self._close_when_sent = True  # once the replies before it are out
        else:
            self.close()

    def _ping(self, request: codec.Ping) -> None:
        self._reply(codec.Ok(request.rid))

    # Topics looked at per turn of the reactor when answering LIST_TOPICS,
    # so that a broker with many topics does not stall other connections.
    LIST_CHUNK = 2_000

    def _list_topics(self, request: codec.ListTopics) -> Optional[Deferred]:
        """
        TOPICS lists the topics in name order, as many as fit in one frame
        of --max-frame-size (see docs/protocol.rst); a long list is built a
        chunk per turn of the reactor, and this connection reads nothing
        more until it is sent.
        """
        names = list(self.service.topic_names)
        engine = self.service.engine
        if engine is not None:
            # Shared topics: what other brokers did is read from the engine first.
            return engine.describe(names).addCallback(lambda _: self._list_topics_now(request, names))
        return self._list_topics_now(request, names)

    def _list_topics_now(self, request: codec.ListTopics, names: list) -> Optional[Deferred]:
        room = self.service.limits.max_frame_size - 9  # opcode, rid, count
        found: list = []
        if len(names) <= self.LIST_CHUNK:
            self._list_chunk(request.rid, names, 0, found, room, None)
            return None
        done: Deferred = Deferred()
        self._list_chunk(request.rid, names, 0, found, room, done)
        return done

    def _list_chunk(self, rid: int, names: list, start: int, found: list, room: int,
                    done: Optional[Deferred]) -> None:
        if self.ended:
            if done is not None:
                done.callback(None)
            return
        topics = self.service.topics
        permissions = self.permissions
        end = min(start + self.LIST_CHUNK, len(names))
        for name in names[start:end]:
            topic = topics.get(name)
            if topic is None:
                continue
            if permissions is not ALLOW_ALL and permissions is not None and not (
                    permissions.may_subscribe(name) or permissions.may_publish(name)):
                continue
            size = 2 + len(name) + 36  # (topic names are ASCII)
            if size > room:
                end = len(names)  # full: the rest is not listed
                break
            room -= size
            found.append(topic.info())
        if end < len(names):
            self.service.clock.callLater(0, self._list_chunk, rid, names, end, found, room, done)
            return
        self._reply(codec.Topics(rid, found))
        if done is not None:
            done.callback(None)
