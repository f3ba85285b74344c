"""
Wildcard subscriptions (protocol version 1.1): a pattern such as
C{sensors.*.temp} or C{sensors.>} in SUBSCRIBE follows every topic whose
name it matches, those that exist at SUBSCRIBE and those created later.

Two pieces:

  - L{PatternIndex}, the broker's index of every subscribed pattern: a trie
    over C{.}-separated segments, so that finding the patterns that match a
    topic name costs O(segments) (times the wildcard branches actually
    taken), not O(patterns).  It is asked only when a topic is created: a
    publish to an existing topic never looks at patterns, since a pattern
    subscription follows each of its topics with an ordinary
    L{Subscription} in that topic's subscriber list.

  - L{PatternSubscription}, one connection's subscription to one pattern:
    it owns one L{Subscription} per topic it follows (offsets, COMMIT,
    C{max_inflight} and durable positions are per topic, as for a plain
    subscription), and is told by the index when a matching topic comes
    into being.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

from zaichik.subscription import Subscription
from zaichik.topic import Topic

STAR = "*"  # matches any one segment
REST = ">"  # as the last segment: matches one or more segments


def matches(pattern: str, name: str) -> bool:
    """Does C{pattern} match topic C{name}? (The index's answer for one pattern: for tests.)"""
    want = pattern.split(".")
    got = name.split(".")
    if want[-1] == REST:
        if len(got) < len(want):
            return False
        want = want[:-1]
        got = got[: len(want)]
    elif len(got) != len(want):
        return False
    return all(w == STAR or w == g for w, g in zip(want, got))


class _Node:
    """A trie node: the patterns ending here, those ending in C{>} here, and the next segments."""

    __slots__ = ("children", "star", "here", "rest")

    def __init__(self) -> None:
        self.children: Dict[str, _Node] = {}
        self.star: Optional[_Node] = None
        self.here: List["PatternSubscription"] = []  # patterns whose last segment led here
        self.rest: List["PatternSubscription"] = []  # patterns with a final ">" after this node

    def empty(self) -> bool:
        return not (self.children or self.star or self.here or self.rest)


class PatternIndex:
    """
    Every subscribed pattern of a broker, in a trie over segments.

    A pattern's literal segments are dictionary lookups and a C{*} is a
    second branch, so matching a name of S segments visits at most S nodes
    per branch alive (one, for patterns without C{*} at that depth), and
    10,000 patterns that do not match cost a topic's creation a handful of
    dictionary lookups.
    """

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def counts(self) -> Dict[str, int]:
        """How many subscriptions each subscribed pattern has (for metrics)."""
        counts: Dict[str, int] = {}
        nodes = [self._root]
        while nodes:
            node = nodes.pop()
            for subscription in node.here + node.rest:
                counts[subscription.pattern] = counts.get(subscription.pattern, 0) + 1
            nodes.extend(node.children.values())
            if node.star is not None:
                nodes.append(node.star)
        return counts

    def add(self, subscription: "PatternSubscription") -> None:
        node = self._root
        segments = subscription.segments
        last = len(segments) - 1
        for i, segment in enumerate(segments):
            if i == last and segment == REST:
                node.rest.append(subscription)
                break
            if segment == STAR:
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(segment)
                if child is None:
                    child = node.children[segment] = _Node()
                node = child
        else:
            node.here.append(subscription)
        self._count += 1

    def remove(self, subscription: "PatternSubscription") -> None:
        path = [self._root]
        keys: List[Optional[str]] = []
        node = self._root
        segments = subscription.segments
        last = len(segments) - 1
        found: Optional[List[PatternSubscription]] = None
        for i, segment in enumerate(segments):
            if i == last and segment == REST:
                found = node.rest
                break
            nxt = node.star if segment == STAR else node.children.get(segment)
            if nxt is None:
                return
            keys.append(None if segment == STAR else segment)
            node = nxt
            path.append(node)
        else:
            found = node.here
        try:
            found.remove(subscription)
        except ValueError:
            return
        self._count -= 1
        # Prune the nodes left empty, from the leaf up.
        for depth in range(len(keys), 0, -1):
            child, parent, key = path[depth], path[depth - 1], keys[depth - 1]
            if not child.empty():
                break
            if key is None:
                parent.star = None
            else:
                del parent.children[key]

    def match(self, name: str) -> List["PatternSubscription"]:
        """The subscribed patterns that match topic C{name}."""
        found: List[PatternSubscription] = []
        if not self._count:
            return found
        segments = name.split(".")
        nodes = [self._root]
        for segment in segments:
            following = []
            for node in nodes:
                if node.rest:
                    found.extend(node.rest)  # ">" matches this segment and the rest
                child = node.children.get(segment)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            if not following:
                return found
            nodes = following
        for node in nodes:
            found.extend(node.here)
        return found

    def __iter__(self) -> Iterator["PatternSubscription"]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield from node.here
            yield from node.rest
            stack.extend(node.children.values())
            if node.star is not None:
                stack.append(node.star)


def literal_prefix(pattern: str) -> str:
    """
    The part of C{pattern} before its first wildcard segment, with its
    dot: every topic it matches starts with it (C{"a.b.*.c"} -> C{"a.b."}).
    """
    prefix = []
    for segment in pattern.split("."):
        if segment == STAR or segment == REST:
            break
        prefix.append(segment + ".")
    return "".join(prefix)


class PatternSubscription:
    """
    One connection's subscription to a pattern: one L{Subscription} per
    topic followed, in C{subscriptions} by topic name.

    @param follow: makes the L{Subscription} for a topic and a start offset
        (the session's, with its output, limits and callbacks), or returns
        None where the connection may not subscribe to that topic.
    """

    def __init__(self, pattern: str, follow: Callable[[Topic, Optional[int]], Optional[Subscription]]) -> None:
        self.pattern = pattern
        self.segments = pattern.split(".")
        self.subscriptions: Dict[str, Subscription] = {}
        self.active = True
        self._follow = follow

    def __repr__(self) -> str:
        return f"<PatternSubscription {self.pattern} topics={len(self.subscriptions)}>"

    def matches(self, name: str) -> bool:
        return matches(self.pattern, name)

    def follow(self, topic: Topic, start: Optional[int]) -> Optional[Subscription]:
        """Follow C{topic} from offset C{start} (None: its next message)."""
        if not self.active or topic.name in self.subscriptions:
            return None
        subscription = self._follow(topic, start)
        if subscription is None:
            return None
        self.subscriptions[topic.name] = subscription
        topic.subscribe(subscription)
        return subscription

    def topic_created(self, topic: Topic) -> None:
        """The index found that new C{topic} matches: follow it from its first message."""
        subscription = self.follow(topic, topic.next_offset)
        if subscription is not None:
            subscription.drain()

    def drain(self) -> None:
        for subscription in list(self.subscriptions.values()):
            subscription.drain()

    def drop(self, name: str) -> Optional[Subscription]:
        """Stop following topic C{name} (its subscription failed); returns its subscription."""
        subscription = self.subscriptions.pop(name, None)
        if subscription is not None:
            subscription.cancel()
        return subscription

    def cancel(self) -> None:
        """End the whole subscription: nothing more is written."""
        self.active = False
        for subscription in self.subscriptions.values():
            subscription.cancel()
