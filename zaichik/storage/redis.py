"""
The Redis engine: several brokers share topics, messages, compaction
decisions and durable positions through Redis (one primary, or a Redis
Cluster).  C{twistd zaichik --engine redis://HOST:PORT[/DB]} or
C{--engine redis+cluster://HOST:PORT,HOST:PORT,...}.

What is decided where (docs/scale-out.rst says it for operators):
  - Redis decides offsets, timestamps (its TIME, never going back in a
    topic) and duplicates, in one Lua script per topic per unit of work
    (L{PUBLISH}): the topic's hash C{m} holds its settings, its next offset
    and an epoch; its stream C{s} holds one entry per stored batch (ID
    C{<last offset>-1}, fields C{f} first offset, C{t} timestamp, C{d} the
    records); a compaction key is C{SET k:<key> <offset> NX PX <window>}
    (first wins, and a duplicate does not extend the window).  All keys of a
    topic share a hash tag, so each script touches one cluster slot.
  - The same script publishes the batch on the topic's sharded channel
    (SPUBLISH), in offset order.  That is a wake-up that carries the batch:
    a broker delivers from it while it is contiguous, and catches up from
    the stream (XRANGE) when it sees a gap, after reconnecting, or when its
    sweep finds the topic ahead of what it was told.  A PING on every
    pub/sub connection each second makes sure a broker never silently stops
    hearing (centrifugo#1189); an unanswered one drops the connection.
  - Offsets are never given twice: a broker passes what it knows of the
    topic (epoch, next offset) with every script; a topic that Redis lost
    (restart without persistence, failover to a replica behind) is made
    again one million offsets past anything the broker saw, and that is
    logged and counted (C{zaichik_engine_offset_resets_total}).
  - Durable positions live in a hash per client (only ever raised, by a
    script); a HELLO with a client_id takes it over everywhere (a
    generation counter, announced on a channel).

Records in a stream entry are C{>II} (key length, value length), key, value:
not the wire format, which the broker makes when it delivers.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import deque
from operator import itemgetter
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from zaichik import codec, speedups
from zaichik.clock import wall_clock
from zaichik.storage import IEngineEvents, ISharedLog, ISharedStorage, StorageError, TopicState
from zaichik.storage.resp import NotConnected, RedisError, Router, when_done

_log = Logger()

# Offsets skipped when a topic is found lost: more than any broker can have
# been behind.
GAP = 1_000_000

_record_head = struct.Struct(">II")
_key_of = itemgetter(0)  # of a (key, value) entry

PUBLISH = r"""
-- KEYS: meta, stream.  ARGV: key prefix, channel, known epoch, known next,
-- default ttl, default window, new epoch, count, mode ('b': ARGV[10] is the
-- records, none keyed; 'k': key, value pairs from ARGV[10] on).
local meta, stream = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'next', 'ttl', 'window', 'ts')
local epoch, nxt, ttl, window, last = m[1], tonumber(m[2]), tonumber(m[3]), tonumber(m[4]), tonumber(m[5])
local known_next = tonumber(ARGV[4])
local lost, made = 0, 0
if not epoch then
  made = 1
  epoch, ttl, window, last, nxt = ARGV[7], tonumber(ARGV[5]), tonumber(ARGV[6]), 0, 0
  if known_next > 0 then nxt = known_next + 1000000; lost = 1 end
  redis.call('HSET', meta, 'epoch', epoch, 'next', string.format('%.0f', nxt), 'ttl', ttl,
             'window', window, 'ts', 0, 'count', 0, 'bytes', 0)
elseif nxt < known_next then
  -- Offsets only grow: Redis went back (an older snapshot, AOF everysec,
  -- a failover to a replica that was behind), with the same epoch or not.
  nxt = known_next + 1000000; lost = 1
  redis.call('HSET', meta, 'next', string.format('%.0f', nxt))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < last then now = last end
local first, count, blob = nxt, 0, ''
local results = {}
local n = tonumber(ARGV[8])
if ARGV[9] == 'b' then
  blob, count = ARGV[10], n
else
  local parts = {}
  for i = 0, n - 1 do
    local k, v = ARGV[10 + 2 * i], ARGV[11 + 2 * i]
    local dup = false
    if k ~= '' and window > 0 then
      dup = redis.call('SET', ARGV[1] .. k, string.format('%.0f', nxt), 'NX', 'PX', window, 'GET')
    end
    if dup then
      results[#results + 1] = -1 - tonumber(dup)
    else
      parts[#parts + 1] = struct.pack('>I4I4', #k, #v) .. k .. v
      results[#results + 1] = nxt
      nxt = nxt + 1
      count = count + 1
    end
  end
  blob = table.concat(parts)
end
if count > 0 then
  local f = string.format('%.0f', first)
  redis.call('XADD', stream, string.format('%.0f', first + count - 1) .. '-1', 'f', f, 't', now, 'd', blob)
  redis.call('HSET', meta, 'next', string.format('%.0f', first + count), 'ts', now)
  if ttl > 0 then
    redis.call('HINCRBY', meta, 'count', count)
    redis.call('HINCRBY', meta, 'bytes', #blob)
  else
    redis.call('XTRIM', stream, 'MAXLEN', '~', 1000)
  end
  redis.call('SPUBLISH', ARGV[2], f .. ' ' .. now .. ' ' .. count .. '\n' .. blob)
end
return {epoch, first, now, lost, ttl, window, count, made, results}
"""

CREATE = r"""
-- KEYS: meta.  ARGV: ttl, window, new epoch, known next.
local m = redis.call('HMGET', KEYS[1], 'epoch', 'next', 'ttl', 'window')
if m[1] then
  if tonumber(m[2]) < tonumber(ARGV[4]) then
    local nxt = tonumber(ARGV[4]) + 1000000
    redis.call('HSET', KEYS[1], 'next', string.format('%.0f', nxt))
    return {m[1], nxt, tonumber(m[3]), tonumber(m[4]), 0, 1}
  end
  return {m[1], tonumber(m[2]), tonumber(m[3]), tonumber(m[4]), 0, 0}
end
local nxt, lost = 0, 0
if tonumber(ARGV[4]) > 0 then nxt = tonumber(ARGV[4]) + 1000000; lost = 1 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'next', string.format('%.0f', nxt), 'ttl', ARGV[1],
           'window', ARGV[2], 'ts', 0, 'count', 0, 'bytes', 0)
return {ARGV[3], nxt, tonumber(ARGV[1]), tonumber(ARGV[2]), 1, lost}
"""

RAISE = r"""
-- KEYS: a hash.  ARGV: field, value, ms to keep the hash (0: for good).
-- A position only moves forward.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (not cur) or tonumber(ARGV[2]) > tonumber(cur) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

CLAIM = r"""
-- KEYS: a client's hash.  ARGV: ms to keep it.  The client's new generation.
local g = redis.call('HINCRBY', KEYS[1], '', 1)
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return g
"""

LEASE = r"""
-- KEYS: a group's lease, the topic's group positions.  ARGV: node, ms, group.
-- The broker that serves a consumer group (all its members are there):
-- taken if free or ours (and renewed), else who holds it.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {holder, false} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {ARGV[1], redis.call('HGET', KEYS[2], ARGV[3])}
"""

TRIM = r"""
-- KEYS: meta, stream.  ARGV: entries looked at, at most.  Drops the batches
-- retention no longer keeps; returns next, count, bytes, oldest offset, dropped.
local m = redis.call('HMGET', KEYS[1], 'ttl', 'next', 'count', 'bytes')
if not m[2] then return {-1, 0, 0, -1, 0, 0} end
local ttl = tonumber(m[1])
local dropped, freed, removed = 0, 0, 0
local oldest = -1
if ttl > 0 then
  local t = redis.call('TIME')
  local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl
  local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[1])
  for _, e in ipairs(entries) do
    local f = e[2]
    local ts = tonumber(f[4])
    if ts <= cutoff then
      removed = removed + 1
      local last = tonumber(string.sub(e[1], 1, string.find(e[1], '-') - 1))
      dropped = dropped + last - tonumber(f[2]) + 1
      freed = freed + #f[6]
      redis.call('XDEL', KEYS[2], e[1])
    else
      oldest = tonumber(f[2])
      break
    end
  end
  if dropped > 0 then
    redis.call('HINCRBY', KEYS[1], 'count', -dropped)
    redis.call('HINCRBY', KEYS[1], 'bytes', -freed)
  end
end
m = redis.call('HMGET', KEYS[1], 'next', 'count', 'bytes')
return {tonumber(m[1]), tonumber(m[2]), tonumber(m[3]), oldest, dropped, removed}
"""


class _Script:
    """A Lua script run by EVALSHA, loaded with EVAL where the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()

    def __call__(self, router: Router, keys: List[bytes], args: List) -> Deferred:
        d = router.execute(keys[0], b"EVALSHA", self.sha, len(keys), *keys, *args)

        def missing(failure):
            failure.trap(RedisError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return router.execute(keys[0], b"EVAL", self.source, len(keys), *keys, *args)

        return d.addErrback(missing)


_publish = _Script(PUBLISH)
_create = _Script(CREATE)
_raise = _Script(RAISE)
_claim = _Script(CLAIM)
_trim = _Script(TRIM)
_lease = _Script(LEASE)
_SCRIPTS = (_publish, _create, _raise, _claim, _trim, _lease)

TOPICS = b"zaichik:topics"  # the set of every topic's name
NEW_TOPICS = b"zaichik:new-topics"  # channel: a topic was made
TAKEOVER = b"zaichik:takeover"  # channel: "<generation> <client_id>"


def _tag(kind: bytes, name: str) -> bytes:
    """C{zaichik:{<kind>:<name>}:}: every key of one topic (or client) in one slot."""
    raw = name.encode()
    if b"{" in raw or b"}" in raw:
        kind, raw = kind + b"x", raw.hex().encode()
    return b"zaichik:{" + kind + b":" + raw + b"}:"


def topic_keys(name: str) -> Dict[str, bytes]:
    tag = _tag(b"t", name)
    return {"meta": tag + b"m", "stream": tag + b"s", "keys": tag + b"k:", "channel": tag + b"n",
            "groups": tag + b"g", "subscribers": tag + b"subs"}


def client_key(client_id: str) -> bytes:
    return _tag(b"c", client_id) + b"pos"


def encode_records_py(entries: List[Tuple[Optional[bytes], bytes]]) -> bytes:
    """
    The records of unkeyed C{entries} (keyed ones go to the script one by
    one).  The specification of L{encode_records} (compiled where built:
    a Python loop per message was the cross-node path's cost, as
    L{decode_records}').
    """
    pack = _record_head.pack
    parts = []
    for _, value in entries:
        parts.append(pack(0, len(value)))
        parts.append(value)
    return b"".join(parts)


def decode_records_py(prefix: bytes, first: int, timestamp: int, blob: bytes) -> List[bytes]:
    """
    The MESSAGE frames (length prefix included) of a stream entry's
    records.  The specification of L{decode_records} (compiled where built).
    """
    entries = []
    unpack = _record_head.unpack_from
    at, end = 0, len(blob)
    while at < end:
        klen, vlen = unpack(blob, at)
        at += 8
        key = blob[at:at + klen] if klen else None
        at += klen
        entries.append((key, blob[at:at + vlen]))
        at += vlen
    return codec.message_frames_py(prefix, first, timestamp, entries)


encode_records: Callable[[List[Tuple[Optional[bytes], bytes]]], bytes] = encode_records_py
decode_records: Callable[[bytes, int, int, bytes], List[bytes]] = decode_records_py
if speedups.compiled is not None:
    encode_records = speedups.compiled.encode_records
    decode_records = speedups.compiled.decode_records


@implementer(ISharedLog)
class RedisLog:
    """
    One topic as this broker sees it: what it was told of the topic's
    messages (delivered in offset order to C{follower}), a small cache of
    the newest of them, and the way to publish.
    """

    CACHE = 4096  # newest messages kept here for subscribers just behind

    def __init__(self, storage: "RedisStorage", name: str, retention_ttl: int, compaction_window: int) -> None:
        self.storage = storage
        self.name = name
        self.retention_ttl = retention_ttl
        self.compaction_window = compaction_window
        self.keys = topic_keys(name)
        self.prefix = codec.topic_prefix(name)
        self.epoch = b""
        self.end = 0  # one past the newest message this broker was told of
        self.stored = 0  # one past the newest message Redis had, as last read
        self.suspect = 0  # ... as of the last sweep: not heard of by the next one, it is caught up
        self.assigned = 0  # one past the newest offset Redis gave this broker's publishes
        self.count = 0
        self.nbytes = 0
        self.oldest: Optional[int] = None
        self.follower: Optional[Callable[[int, List[bytes]], None]] = None
        self.wanted = False  # a follower needs the messages (not only their offsets)
        self._cache: Deque[Tuple[int, int, List[bytes], int]] = deque()  # (first, ts, frames, bytes)
        self._cached = 0
        self.subscribers = 0  # here
        self.elsewhere = 0  # on other brokers, as of the last describe()
        self._catching_up: Optional[Deferred] = None
        self._early: List[Tuple[int, int, int, bytes]] = []  # told while catching up

    def __repr__(self) -> str:
        return f"<RedisLog {self.name} end={self.end}>"

    # -- IMessageLog ----------------------------------------------------------------

    def __len__(self) -> int:
        return self.count

    def first_offset(self) -> Optional[int]:
        if not self.retention_ttl:
            return None
        # As of the last sweep; where not known, 0: a read from there
        # starts at the oldest message Redis still has.
        return self.oldest if self.oldest is not None else 0

    def append(self, first: int, frames: Sequence[bytes]) -> Deferred:
        raise NotImplementedError("a shared log assigns offsets itself: use publish()")

    def _remember(self, first: int, ts: int, frames: List[bytes]) -> None:
        """
        Cache the newest messages for subscribers here that are just behind:
        at most CACHE messages a topic, and the storage's cache budget (the
        oldest of this topic go first).
        """
        cache = self._cache
        size = sum(map(len, frames))
        cache.append((first, ts, frames, size))
        self._cached += len(frames)
        self.storage.cache_bytes += size
        while len(cache) > 1 and (self._cached > self.CACHE or self.storage.cache_bytes > self.storage.cache_size):
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, _, frames, size = self._cache.popleft()
        self._cached -= len(frames)
        self.storage.cache_bytes -= size

    def forget_cache(self) -> None:
        """No subscriber here any more: the cache is of no use."""
        while self._cache:
            self._forget_oldest()

    def expire(self, cutoff: int) -> int:
        cache = self._cache
        while cache and cache[0][1] <= cutoff:
            self._forget_oldest()
        return 0  # Redis drops them (the sweep's TRIM script), and counts

    def trim(self, max_bytes: int) -> int:
        return 0  # not offered with the Redis engine (refused at start)

    def read(self, offset: int, limit: int) -> Deferred:
        cutoff = self._cutoff()
        frames: List[bytes] = []
        first = None
        cache = self._cache
        if cache and offset >= cache[0][0]:
            for batch_first, ts, batch, _ in cache:
                if ts <= cutoff or batch_first + len(batch) <= offset:
                    continue
                skip = max(0, offset - batch_first)
                if first is None:
                    first = batch_first + skip
                elif first + len(frames) != batch_first:
                    break
                frames.extend(batch[skip:skip + limit - len(frames)])
                if len(frames) >= limit:
                    break
            if first is not None:
                return defer.succeed((first, frames))
            return defer.succeed((offset, []))
        return self.fetch(offset, limit).addCallback(self._read, cutoff).addCallback(self._limit, limit)

    @staticmethod
    def _read(batches, cutoff: int):
        frames: List[bytes] = []
        first = None
        for batch_first, ts, batch in batches:
            if ts <= cutoff:
                continue
            if first is None:
                first = batch_first
            elif first + len(frames) != batch_first:
                break
            frames.extend(batch)
        return (first or 0, frames)

    def _limit(self, read, limit: int):
        first, frames = read
        return first, frames[:limit]

    def _cutoff(self) -> int:
        if not self.retention_ttl:
            return -1
        return round(self.storage.wall.seconds() * 1000) - self.retention_ttl

    # Stream entries (batches) one read asks for at most: a batch may hold
    # many messages, and decoding them all runs on the reactor.
    FETCH = 100

    @defer.inlineCallbacks
    def fetch(self, offset: int, limit: int):
        """
        Batches from the stream from C{offset} on (about C{limit} messages),
        trimmed to start at C{offset}: a list of C{(first, ts, frames)}.
        """
        entries = yield self.storage.router.execute(
            self.keys["stream"], b"XRANGE", self.keys["stream"], b"%d-0" % offset, b"+",
            b"COUNT", max(1, min(limit, self.FETCH)))
        batches = []
        for _, fields in entries:
            values = dict(zip(fields[::2], fields[1::2]))
            first, ts = int(values[b"f"]), int(values[b"t"])
            frames = decode_records(self.prefix, first, ts, values[b"d"])
            if first < offset:
                frames = frames[offset - first:]
                first = offset
            if frames:
                batches.append((first, ts, frames))
        return batches

    # -- publishing --------------------------------------------------------------

    def publish(self, entries: List[Tuple[Optional[bytes], bytes]]) -> Deferred:
        """
        Store C{entries} in order; fires with C{(first, timestamp, results,
        count)}: C{results} a C{(offset, duplicate)} per entry, C{count}
        how many were stored (from C{first} on, consecutive).
        """
        keys = self.keys
        known = max(self.end, self.stored, self.assigned)  # (Redis never legitimately has less)
        head = [keys["keys"], keys["channel"], self.epoch, known, self.retention_ttl,
                self.compaction_window, self.storage.new_epoch(), len(entries)]
        if any(map(_key_of, entries)):
            args = head + [b"k"]
            for key, value in entries:
                args.append(key or b"")
                args.append(value)
        else:
            args = head + [b"b", encode_records(entries)]
        d = _publish(self.storage.router, [keys["meta"], keys["stream"]], args)
        return d.addCallbacks(self._published, self._failed, (len(entries),))

    def _published(self, reply, n: int):
        epoch, first, now, lost, ttl, window, count, made, results = reply
        self._learn(epoch, lost, ttl, window)
        if first + count > self.assigned:
            self.assigned = first + count
        if made:
            self.storage.announce(self.name)
        if results:
            answered: Sequence[Tuple[int, bool]] = [(r, False) if r >= 0 else (-1 - r, True) for r in results]
        else:
            answered = codec.OffsetRun(first, n)
        return first, now, answered, count

    @staticmethod
    def _failed(failure):
        failure.trap(RedisError)
        if isinstance(failure.value, NotConnected):
            raise StorageError(f"the Redis engine is unavailable: {failure.value}")
        raise StorageError(f"the Redis engine refused: {failure.value}", full="OOM" in str(failure.value))

    def _learn(self, epoch: bytes, lost: int, ttl: int, window: int) -> None:
        if lost:
            self.storage.offset_resets += 1
            _log.error("Redis had lost topic {topic} (or it went back): it continues {gap} offsets past "
                       "anything this broker saw, so that no offset is given twice", topic=self.name, gap=GAP)
        if self.epoch and epoch != self.epoch and not lost:
            _log.warn("Topic {topic} was made again in Redis by another broker", topic=self.name)
        self.epoch = epoch
        self.retention_ttl, self.compaction_window = int(ttl), int(window)

    # -- what other brokers (and this one) stored ------------------------------------

    def told(self, first: int, ts: int, count: int, blob: bytes) -> None:
        """A batch was stored (heard on the topic's channel)."""
        if self._catching_up is not None:
            self._early.append((first, ts, count, blob))
            return
        end = self.end
        if first > end:
            self._early.append((first, ts, count, blob))  # (before: catching up may end at once)
            self.catch_up()
            return
        if first + count <= end:
            return  # heard already (after catching up)
        if not self.wanted:
            # Nobody here reads the topic: only its offsets are followed.
            self.end = first + count
            if self.retention_ttl:
                self.count += count  # (and the sweep reads the true count)
            return
        frames = decode_records(self.prefix, first, ts, blob)
        if first < end:
            frames = frames[end - first:]
            first = end
        self._arrived(first, ts, frames)

    def _arrived(self, first: int, ts: int, frames: List[bytes]) -> None:
        self.end = first + len(frames)
        if self.retention_ttl:
            self.count += len(frames)  # (and the sweep reads the true count)
            if self.wanted:
                self._remember(first, ts, frames)
        if self.follower is not None:
            self.follower(first, frames)

    def catch_up(self) -> Deferred:
        """Read what was stored after C{end} (missed on the channel) and deliver it."""
        if self._catching_up is None:
            running = self._catching_up = self._catch_up()
            running.addBoth(self._caught_up)  # (at once if the reads were answered at once)
        if self._catching_up is None:
            return defer.succeed(None)
        return when_done(self._catching_up)

    @defer.inlineCallbacks
    def _catch_up(self):
        while True:
            batches = yield self.fetch(self.end, 1000)
            if not batches:
                return
            cutoff = self._cutoff()
            for first, ts, frames in batches:
                if first + len(frames) <= self.end:
                    continue
                if ts <= cutoff:
                    # Expired before we heard of it: followed past, never delivered.
                    self.end = first + len(frames)
                    continue
                if first < self.end:
                    frames = frames[self.end - first:]
                    first = self.end
                if first > self.end:
                    _log.warn("Topic {topic}: offsets {start}-{stop} are not in Redis (expired or lost); "
                              "going on from {first}", topic=self.name, start=self.end, stop=first - 1,
                              first=first)
                self._arrived(first, ts, frames)

    RETRY = 1.0  # seconds before catching up again, after a failed read

    def _caught_up(self, result):
        self._catching_up = None
        if isinstance(result, defer.Failure):
            # Redis cannot be read (the connection is down): what was heard
            # after the gap waits, and the catch-up is tried again later.
            _log.warn("Catching up on {topic} failed: {why}; again in {retry} s", topic=self.name,
                      why=result.getErrorMessage(), retry=self.RETRY)
            if not self._retrying:
                self._retrying = True
                self.storage.clock.callLater(self.RETRY, self._retry)
            return None
        early, self._early = self._early, []
        early.sort()
        if early and early[0][0] > self.end and result is None:
            # Read all the stream had, and still short of what was heard:
            # those offsets are gone (expired, or lost by Redis).
            _log.warn("Topic {topic}: offsets {start}-{stop} are not in Redis (expired or lost); going on",
                      topic=self.name, start=self.end, stop=early[0][0] - 1)
            self.end = early[0][0]
        for told in early:
            self.told(*told)
        return None

    def count_subscribers(self, count: int) -> Deferred:
        """This broker now has C{count} subscribers to the topic: tell the others."""
        self.subscribers = count
        return self.storage.tell_subscribers(self)

    _retrying = False

    def _retry(self) -> None:
        self._retrying = False
        self.catch_up()

    def learn_state(self, state: Dict[bytes, bytes]) -> None:
        """The topic's hash as read from Redis (at start)."""
        self.epoch = state.get(b"epoch", b"")
        self.end = int(state.get(b"next", 0))
        self.count = int(state.get(b"count", 0))
        self.nbytes = int(state.get(b"bytes", 0))


@implementer(ISharedStorage)
class RedisStorage:
    """L{ISharedStorage} on Redis (one primary, or a cluster)."""

    damaged = 0
    torn = 0

    def __init__(self, url: str, clock=None, durable_ttl: int = 7 * 24 * 3600 * 1000,
                 ping_interval: float = 1.0, cache_size: int = 32 * 1024 * 1024) -> None:
        self.cache_size = cache_size  # bytes of newest messages kept for subscribers here (--cache-size)
        self.cache_bytes = 0
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock  # timers
        self.wall = wall_clock(clock)  # timestamps, compared with those Redis gives messages
        self.url = url
        self.durable_ttl = durable_ttl
        self.router = Router(clock, url, on_connect=self._load_scripts)
        self.pubsub = Router(clock, url, on_connect=self._pubsub_up, on_push=self._pushed,
                             on_down=self._pubsub_down, slots_from=self.router)
        self._listening: Dict[object, Set[bytes]] = {}  # pub/sub connection -> channels it listens to
        self.logs: Dict[str, RedisLog] = {}
        self._by_channel: Dict[bytes, RedisLog] = {}
        self._commits: Dict[str, Dict[str, int]] = {}
        self._groups: Dict[str, Dict[str, int]] = {}
        self._events: Optional[IEngineEvents] = None
        self._pinger: Optional[LoopingCall] = None
        self._ping_interval = ping_interval
        self._unanswered: Dict[object, int] = {}
        self._heard_from: Dict[object, int] = {}  # connection -> its byte count at the last PING round
        self.offset_resets = 0
        self.resyncs = 0
        self.opened = False
        self.node = os.urandom(6).hex().encode()  # this broker, while it runs

    @staticmethod
    def _load_scripts(connection) -> Deferred:
        """
        On every (re)connect, before anything else: so that EVALSHA never
        meets NOSCRIPT and has to be sent again, out of order with what was
        sent after it.
        """
        return defer.gatherResults([connection.execute(b"SCRIPT", b"LOAD", script.source) for script in _SCRIPTS])

    def new_epoch(self) -> bytes:
        return os.urandom(8).hex().encode()

    def watch(self, events: IEngineEvents) -> None:
        self._events = events

    # -- life ------------------------------------------------------------------

    # Seconds to reach Redis at start before giving up (one line, exit 1).
    OPEN_TIMEOUT = 10.0

    @defer.inlineCallbacks
    def open(self):
        try:
            yield self.router.start().addTimeout(self.OPEN_TIMEOUT, self.clock)
            yield self.pubsub.start().addTimeout(self.OPEN_TIMEOUT, self.clock)
            names = yield self.router.execute(TOPICS, b"SMEMBERS", TOPICS)
        except defer.TimeoutError:
            yield self.close()
            raise StorageError(f"Redis does not answer (waited {self.OPEN_TIMEOUT:g} s)") from None
        except RedisError as e:
            yield self.close()
            raise StorageError(f"Redis refused: {e}") from None
        states = []
        names = sorted(n.decode() for n in names)
        for start in range(0, len(names), 1000):
            chunk = names[start:start + 1000]
            replies = yield defer.gatherResults(
                [self.router.execute(topic_keys(n)["meta"], b"HGETALL", topic_keys(n)["meta"]) for n in chunk])
            for name, flat in zip(chunk, replies):
                if not flat:
                    continue  # named in the set, not made (a broker stopped in between)
                meta = dict(zip(flat[::2], flat[1::2]))
                state = self._state(name, meta)
                self.open_log(name, state.retention_ttl, state.compaction_window).learn_state(meta)
                states.append(state)
        self.opened = True
        yield defer.gatherResults([self._listen(log) for log in self.logs.values()])
        yield self._check_settings()
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.clock
        self._pinger.start(self._ping_interval, now=False)
        return states

    @staticmethod
    def _state(name: str, meta: Dict[bytes, bytes]) -> TopicState:
        return TopicState(name, int(meta.get(b"ttl", 0)), int(meta.get(b"window", 0)), int(meta.get(b"next", 0)))

    @defer.inlineCallbacks
    def _check_settings(self):
        """Warn about Redis settings that cost messages or availability (docs/scale-out.rst)."""
        for connection in self.router.primaries():
            try:
                limits = yield connection.execute(b"CONFIG", b"GET", b"client-output-buffer-limit")
                policy = yield connection.execute(b"CONFIG", b"GET", b"maxmemory-policy")
            except RedisError:
                return  # (CONFIG renamed or refused: nothing to say)
            words = limits[1].split() if len(limits) > 1 else []
            if b"pubsub" in words:
                at = words.index(b"pubsub")
                hard = int(words[at + 1])
                if 0 < hard < 256 * 1024 * 1024:
                    _log.warn("Redis at {host}:{port} drops a pub/sub client over {hard} bytes behind: a broker "
                              "that falls behind reconnects and catches up, but a topic with retention_ttl 0 "
                              "keeps only its last ~1,000 batches (client-output-buffer-limit pubsub "
                              "256mb 64mb 60 or more)", host=connection.host, port=connection.port, hard=hard)
            if len(policy) > 1 and policy[1] != b"noeviction":
                _log.warn("Redis at {host}:{port} has maxmemory-policy {policy}: evicting keys loses messages "
                          "and compaction keys silently (set noeviction)", host=connection.host,
                          port=connection.port, policy=policy[1].decode())

    def close(self) -> Deferred:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        # Our subscriber counts go with us (a broker that dies leaves them
        # to lapse: SUBSCRIBERS_TTL).
        told = [self.router.execute(log.keys["subscribers"], b"HDEL", log.keys["subscribers"], self.node)
                for log in self.logs.values() if log.subscribers and self.router.for_key(
                    log.keys["subscribers"]).up]
        d = defer.DeferredList(told, consumeErrors=True)
        return d.addCallback(lambda _: defer.DeferredList([self.router.close(), self.pubsub.close()],
                                                          consumeErrors=True))

    def sync(self) -> None:
        pass  # every script is answered once Redis has it (as durable as its appendfsync)

    # -- topics --------------------------------------------------------------

    def open_log(self, name: str, retention_ttl: int, compaction_window: int) -> RedisLog:
        log = self.logs.get(name)
        if log is None:
            log = RedisLog(self, name, retention_ttl, compaction_window)
            self.logs[name] = log
            self._by_channel[log.keys["channel"]] = log
            if self.opened:
                self._listen(log)
        return log

    def _listen(self, log: RedisLog) -> Deferred:
        """Listen to C{log}'s channel on the node that owns it, then catch up on what came before."""
        channel = log.keys["channel"]
        connection = self.pubsub.for_key(channel)
        if not connection.up:
            return defer.succeed(None)  # (it listens, and catches up, once connected: _pubsub_up)
        self._listening.setdefault(connection, set()).add(channel)
        d = connection.execute(b"SSUBSCRIBE", channel)
        d.addErrback(lambda f: _log.warn("Could not listen to {topic}: {why}", topic=log.name,
                                         why=f.getErrorMessage()))
        # What was stored before we listened: the sweep compares too.
        return d.addCallback(lambda _: log.catch_up())

    def _pubsub_down(self, connection) -> None:
        self._listening.pop(connection, None)

    def _remap(self) -> Deferred:
        """
        In a cluster: read the slot map again (a failover or a resharding
        moves channels between primaries) and listen to every topic's
        channel where it now lives.
        """
        def listen(_) -> None:
            for channel, log in self._by_channel.items():
                connection = self.pubsub.for_key(channel)
                if connection.up and channel not in self._listening.get(connection, ()):
                    _log.info("Listening to {topic} on {host}:{port} (its slot moved)", topic=log.name,
                              host=connection.host, port=connection.port)
                    self._listen(log)

        return self.pubsub.refresh().addCallback(listen).addErrback(
            lambda f: _log.warn("Reading the cluster's slots failed: {why}", why=f.getErrorMessage()))

    def create_topic(self, name: str, retention_ttl: int, compaction_window: int) -> Deferred:
        log = self.open_log(name, retention_ttl, compaction_window)
        keys = log.keys
        # Listed first (a name in the set whose hash is missing is skipped),
        # and sent at once: a PUBLISH script sent after it on the same
        # connection finds the topic made with these settings.
        listed = self.router.execute(TOPICS, b"SADD", TOPICS, name)
        d = _create(self.router, [keys["meta"]], [retention_ttl, compaction_window, self.new_epoch(),
                                                  max(log.end, log.stored, log.assigned)])

        def made(reply):
            epoch, next_offset, ttl, window, made, lost = reply
            log._learn(epoch, lost, ttl, window)
            if made:
                self.announce(name)
            return int(ttl), int(window), bool(made)

        return defer.gatherResults([listed, d.addCallback(made)]).addCallbacks(
            lambda results: results[1], lambda f: RedisLog._failed(f.value.subFailure))

    def announce(self, name: str) -> None:
        """Topic C{name} was made: list it and tell the other brokers."""
        self.router.execute(TOPICS, b"SADD", TOPICS, name).addErrback(lambda f: None)
        self.router.execute(NEW_TOPICS, b"PUBLISH", NEW_TOPICS, name).addErrback(lambda f: None)

    # -- pub/sub ---------------------------------------------------------------

    def _pubsub_up(self, connection) -> Deferred:
        """A pub/sub connection is (again) up: listen, then catch up on what was missed."""
        # (In a cluster every node hears every PUBLISH: each connection
        # listens to these, and what is heard twice is idempotent.)
        commands = [(b"SUBSCRIBE", NEW_TOPICS), (b"SUBSCRIBE", TAKEOVER)]
        mine = []
        for channel, log in self._by_channel.items():
            if self.pubsub.for_key(channel) is connection:
                commands.append((b"SSUBSCRIBE", channel))
                mine.append(log)
        self._listening[connection] = {log.keys["channel"] for log in mine}
        self._unanswered.pop(connection, None)
        if not commands:
            return defer.succeed(None)
        ds = connection.pipeline(commands)
        if self.opened:
            self.resyncs += 1
            self.clock.callLater(0, self._resync, mine)
        return defer.gatherResults(ds)

    def _resync(self, logs: List[RedisLog]) -> None:
        """After a pub/sub reconnect: catch up what was missed, and tell the service (takeovers, new topics)."""
        for log in logs:
            log.catch_up()
        if self._events is not None:
            self._events.resynced()

    def generation(self, client_id: str) -> Deferred:
        """The newest takeover generation of C{client_id} (0 if none)."""
        key = client_key(client_id)
        d = self.router.execute(key, b"HGET", key, b"").addErrback(RedisLog._failed)
        return d.addCallback(lambda g: int(g or 0))

    def _pushed(self, connection, message: list) -> None:
        kind = message[0]
        if kind == b"sunsubscribe":
            # The channel's slot moved to another primary: listen there.
            self._listening.get(connection, set()).discard(message[1])
            self._remap()
            return
        if kind == b"smessage":
            log = self._by_channel.get(message[1])
            if log is None:
                return
            payload = message[2]
            head, _, blob = payload.partition(b"\n")
            first, ts, count = head.split(b" ")
            log.told(int(first), int(ts), int(count), blob)
        elif kind == b"message":
            channel, payload = message[1], message[2]
            if channel == NEW_TOPICS:
                self._appeared(payload.decode())
            elif channel == TAKEOVER:
                generation, _, client_id = payload.partition(b" ")
                if self._events is not None:
                    self._events.client_claimed(client_id.decode(), int(generation))

    @defer.inlineCallbacks
    def _appeared(self, name: str):
        state = yield self.lookup(name)
        if state is not None and self._events is not None:
            self._events.topic_appeared(state)

    @defer.inlineCallbacks
    def lookup(self, name: str):
        if name in self.logs:
            return None
        meta_key = topic_keys(name)["meta"]
        flat = yield self.router.execute(meta_key, b"HGETALL", meta_key).addErrback(RedisLog._failed)
        if not flat or name in self.logs:
            return None
        meta = dict(zip(flat[::2], flat[1::2]))
        state = self._state(name, meta)
        log = self.open_log(name, state.retention_ttl, state.compaction_window)
        log.learn_state(meta)
        log.stored = max(log.stored, log.end)  # (what Redis had: never less, even once followed from 0)
        if log.end <= self.LEARN_FROM_START:
            # A young topic (made just now on another broker): followed from
            # its first message, so that a wildcard subscription here gets
            # it even if it was published before this broker heard.
            log.end = 0
            state.young = True
        return state

    LEARN_FROM_START = 10_000

    def names(self) -> Deferred:
        """The names of every topic any broker made."""
        d = self.router.execute(TOPICS, b"SMEMBERS", TOPICS).addErrback(RedisLog._failed)
        return d.addCallback(lambda names: sorted(n.decode() for n in names))

    def refresh(self, name: str) -> Deferred:
        """Read topic C{name}'s next offset from Redis into its log's C{stored}."""
        log = self.logs[name]
        meta = log.keys["meta"]

        def read(next_offset) -> None:
            if next_offset is not None:
                log.stored = max(log.stored, int(next_offset))

        return self.router.execute(meta, b"HGET", meta, b"next").addCallbacks(read, RedisLog._failed)

    def _ping(self) -> None:
        """
        Every connection, pub/sub and commands alike, must answer a PING
        within three intervals, or it is dropped (and made again): a
        half-open connection (a host that died, a partition) would
        otherwise hold every command sent on it until the kernel gives up.
        """
        for connection in list(self.pubsub.nodes.values()) + list(self.router.nodes.values()):
            if not connection.up:
                continue
            missed = self._unanswered.get(connection, 0)
            received = connection.received
            if received != self._heard_from.get(connection, 0):
                # Bytes arrived since the last look: alive, if behind (a
                # backlog of notifications ahead of the PONG is no reason to drop).
                self._heard_from[connection] = received
                missed = 0
            if missed >= 3:
                _log.warn("Redis at {host}:{port} stopped answering; reconnecting",
                          host=connection.host, port=connection.port)
                self._unanswered.pop(connection, None)
                connection.drop()
                continue
            self._unanswered[connection] = missed + 1
            connection.execute(b"PING").addCallbacks(
                lambda _, c=connection: self._unanswered.pop(c, None), lambda f: None)

    def sweep(self) -> Deferred:
        """
        Retention (TRIM script) and a check that nothing was missed: a topic
        whose next offset in Redis is past what this broker was told
        catches up.  One script per topic, pipelined.
        """
        logs = list(self.logs.values())
        ds = []
        if self.router.cluster:
            ds.append(self._remap())
        for log in logs:
            if log.subscribers:
                self.tell_subscribers(log).addErrback(lambda f: None)
            ds.append(self._trim(log))
        return defer.DeferredList(ds)

    # Stream entries (batches) one TRIM script looks at: it runs again at
    # once while it finds that many expired, so retention keeps up with any
    # rate, in steps that keep Redis responsive.
    TRIM_STEP = 1000

    def _trim(self, log: RedisLog) -> Deferred:
        keys = log.keys
        d = _trim(self.router, [keys["meta"], keys["stream"]], [self.TRIM_STEP])

        def trimmed(reply):
            self._trimmed(reply, log)
            if len(reply) > 5 and reply[5] >= self.TRIM_STEP:
                return self._trim(log)
            return None

        return d.addCallback(trimmed).addErrback(lambda f: None)

    # Subscriber counts: each broker's, in a hash per topic with a time after
    # which a broker that stopped telling (it died) no longer counts.
    SUBSCRIBERS_TTL = 10_000

    def tell_subscribers(self, log: RedisLog) -> Deferred:
        key = log.keys["subscribers"]
        if log.subscribers:
            until = round(self.wall.seconds() * 1000) + self.SUBSCRIBERS_TTL
            d = self.router.execute(key, b"HSET", key, self.node, b"%d %d" % (log.subscribers, until))
        else:
            d = self.router.execute(key, b"HDEL", key, self.node)
        return d.addErrback(RedisLog._failed)

    @defer.inlineCallbacks
    def describe(self, names: List[str]):
        """
        Read what TOPICS tells of C{names} from Redis (next offset, retained,
        subscribers on every broker), after dropping what has expired.
        """
        logs = [self.logs[n] for n in names if n in self.logs]
        ds = []
        for log in logs:
            keys = log.keys
            ds.append(_trim(self.router, [keys["meta"], keys["stream"]], [1000]).addCallback(self._trimmed, log))
            ds.append(self.router.execute(keys["subscribers"], b"HGETALL", keys["subscribers"]))
        replies = yield defer.gatherResults(ds)
        now = round(self.wall.seconds() * 1000)
        for i, log in enumerate(logs):
            flat = replies[2 * i + 1]
            elsewhere = 0
            stale = []
            for node, value in zip(flat[::2], flat[1::2]):
                count, until = value.split(b" ")
                if node != self.node and int(until) > now:
                    elsewhere += int(count)
                elif int(until) <= now:
                    stale.append(node)  # (a broker that died: its entry lapsed)
            log.elsewhere = elsewhere
            if stale:
                key = log.keys["subscribers"]
                self.router.execute(key, b"HDEL", key, *stale).addErrback(lambda f: None)

    def _trimmed(self, reply, log: RedisLog) -> None:
        next_offset, count, nbytes, oldest, dropped = reply[:5]
        known = max(log.end, log.assigned)
        if 0 <= next_offset < known:
            # Redis went back under this topic (see PUBLISH): move it past what we saw now.
            self.create_topic(log.name, log.retention_ttl, log.compaction_window).addErrback(lambda f: None)
            return
        if next_offset < 0:
            if log.end > 0:
                # The topic is gone from Redis: make it again past what we saw.
                self.create_topic(log.name, log.retention_ttl, log.compaction_window).addErrback(lambda f: None)
            return
        log.count, log.nbytes = count, nbytes
        log.oldest = oldest if oldest >= 0 else None
        log.stored = max(log.stored, next_offset)
        # Stored a sweep ago and still not heard of: a notification was
        # missed (a newer lag is what is in flight, and is left alone).
        if log.end < log.suspect and log._catching_up is None:
            log.catch_up()
        log.suspect = next_offset

    # -- durable clients --------------------------------------------------------

    def commits(self) -> Dict[str, Dict[str, int]]:
        return self._commits

    def last_commit_times(self) -> Dict[str, int]:
        return {}  # Redis forgets a client's hash by itself (PEXPIRE --durable-ttl)

    def forget_client(self, client_id: str) -> None:
        self._commits.pop(client_id, None)

    @defer.inlineCallbacks
    def claim_client(self, client_id: str):
        key = client_key(client_id)
        generation = yield _claim(self.router, [key], [self.durable_ttl]).addErrback(RedisLog._failed)
        flat = yield self.router.execute(key, b"HGETALL", key).addErrback(RedisLog._failed)
        self._commits[client_id] = {k.decode(): int(v) for k, v in zip(flat[::2], flat[1::2]) if k}
        self.router.execute(TAKEOVER, b"PUBLISH", TAKEOVER, b"%d %s" % (generation, client_id.encode())
                            ).addErrback(lambda f: None)
        return generation

    def record_commit(self, client_id: str, topic: str, offset: int) -> Deferred:
        positions = self._commits.setdefault(client_id, {})
        if offset > positions.get(topic, -1):
            positions[topic] = offset
        key = client_key(client_id)
        d = _raise(self.router, [key], [topic, offset, self.durable_ttl])
        return d.addErrback(RedisLog._failed)

    def group_positions(self) -> Dict[str, Dict[str, int]]:
        return self._groups

    # A consumer group is served by one broker at a time (all its members
    # connect there); its lease lapses this long after that broker stops
    # renewing it (it died, or the group has no members left there).
    GROUP_LEASE = 10_000

    @defer.inlineCallbacks
    def lease_group(self, topic: str, group: str):
        """
        Serve C{group} of C{topic} here: fires with True (its recorded
        position loaded into L{group_positions}) or False if another broker
        serves it.
        """
        keys = topic_keys(topic)
        lease = keys["groups"] + b":lease:" + group.encode()
        holder, position = yield _lease(self.router, [lease, keys["groups"]],
                                        [self.node, self.GROUP_LEASE, group]).addErrback(RedisLog._failed)
        if holder != self.node:
            return False
        if position:
            self._groups.setdefault(topic, {})[group] = int(position)
        return True

    def renew_groups(self, groups: List[Tuple[str, str]]) -> None:
        """Renew the leases of the groups served here (each sweep)."""
        for topic, group in groups:
            self.lease_group(topic, group).addCallback(self._renewed, topic, group).addErrback(lambda f: None)

    @staticmethod
    def _renewed(held: bool, topic: str, group: str) -> None:
        if not held:
            _log.error("Group {group} of {topic} is now served by another broker (this one stopped renewing "
                       "its lease in time): members here and there may both receive messages",
                       group=group, topic=topic)

    def record_group_position(self, topic: str, group: str, offset: int) -> Deferred:
        self._groups.setdefault(topic, {})[group] = offset
        key = topic_keys(topic)["groups"]
        return _raise(self.router, [key], [group, offset, 0]).addErrback(RedisLog._failed)
