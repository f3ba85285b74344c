"""
The zaichik clients.

``zaichik.client`` is the Twisted client (``from zaichik.client import
connect``), as it always was; ``zaichik.aio`` is the asyncio client and
``zaichik.sync`` the blocking one.  All three are thin adapters around
``zaichik.client.core``, the client's rules without I/O:

    core.py     request ids and replies, subscriptions, flow control,
                timeouts, keepalive, failover and reconnecting
    twisted.py  the Twisted adapter (``zaichik.client``)
    aio.py      the asyncio adapter (``zaichik.aio``)
    sync.py     the blocking client, on the asyncio one in a thread
                (``zaichik.sync``)

The Twisted names are loaded on first use, so that ``zaichik.aio`` and
``zaichik.sync`` (which import ``zaichik.client.core``) never import
Twisted.
"""

from __future__ import annotations

from typing import Any

_TWISTED_NAMES = frozenset({
    "Client",
    "ClientClosed",
    "ConnectionDone",
    "ConnectionLost",
    "Subscription",
    "client_endpoint",
    "connect",
})

_CORE_NAMES = frozenset({
    "ClientClosedError",
    "ConnectTimeout",
    "ConnectionLostError",
    "ErrorCode",
    "Message",
    "PublishResult",
    "RequestTimeout",
    "Start",
    "TopicInfo",
    "ZaichikError",
})

__all__ = sorted(_TWISTED_NAMES | _CORE_NAMES)


def __getattr__(name: str) -> Any:
    if name in _CORE_NAMES:
        from zaichik.client import core

        return getattr(core, name) if hasattr(core, name) else getattr(core.codec, name)
    if name in _TWISTED_NAMES:
        from zaichik.client import twisted

        return getattr(twisted, name)
    raise AttributeError(f"module 'zaichik.client' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
