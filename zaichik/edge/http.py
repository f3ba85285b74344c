"""
The broker's HTTP side (C{--metrics-port}): C{/metrics} and C{/healthz}
(L{zaichik.metrics}), and, from the package's C{zaichik/web/} directory,
the JavaScript client (C{/zaichik.js}, C{/zaichik.d.ts}) and the web
console (C{/console/}), no CDN.

The console reads C{/console/state.json} once a second (topics, durable
clients and groups with their lag: what C{/metrics} already tells anyone
who can reach this port, as JSON) and talks to the broker itself over the
WebSocket listener named in C{/console/config.json}, with the operator's
token where the broker asks for one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

from twisted.web.resource import Resource
from twisted.web.server import Site

from zaichik.metrics import DEFAULT_MAX_TOPICS, metrics_site
from zaichik.service import BrokerService

WEB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")
# Topics listed in state.json at most (the first by name), as /metrics caps its series.
MAX_TOPICS_SHOWN = 1000


class _Json(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.value()).encode("utf-8")

    def value(self) -> Any:
        raise NotImplementedError


class ConsoleConfig(_Json):
    """Where the console finds the broker's WebSocket listeners, and whether it must ask for a token."""

    def __init__(self, service: BrokerService, websockets: Sequence[Any]) -> None:
        super().__init__()
        self.service = service
        self.websockets = websockets

    def value(self) -> Dict[str, Any]:
        listeners: List[Dict[str, Any]] = []
        for listener in self.websockets:
            port = getattr(listener, "port", None)
            host = port.getHost() if port is not None else None
            if host is not None and hasattr(host, "port"):
                listeners.append({"port": host.port, "tls": listener.description.startswith("ssl:")})
        return {"websockets": listeners, "auth": self.service.authenticator.requires_hello}


class ConsoleState(_Json):
    """What the console shows, read from the service when asked."""

    def __init__(self, service: BrokerService, max_topics: int = MAX_TOPICS_SHOWN) -> None:
        super().__init__()
        self.service = service
        self.max_topics = max_topics

    def value(self) -> Dict[str, Any]:
        service = self.service
        topics = service.topics
        shown: List[Dict[str, Any]] = []
        for name in service.topic_names:  # kept sorted by the service
            if len(shown) == self.max_topics:
                break
            topic = topics[name]
            shown.append({
                "name": name, "retention_ttl": topic.retention_ttl, "compaction_window": topic.compaction_window,
                "next_offset": topic.next_offset, "retained": topic.retained, "retained_bytes": topic.retained_bytes,
                "subscribers": len(topic.subscribers), "messages_out": topic.messages_out,
            })
        clients = []
        for client_id, positions in sorted(service.durable_positions().items())[: self.max_topics]:
            for name, offset in sorted(positions.items()):
                committed_on = topics.get(name)
                if committed_on is not None:
                    clients.append({"client_id": client_id, "topic": name, "committed": offset,
                                    "lag": max(0, committed_on.next_offset - 1 - offset)})
        groups = [{"topic": name, "group": group_name, "position": group.position, "lag": group.lag,
                   "outstanding": group.outstanding, "members": len(group.members),
                   "redelivered": group.redelivered}
                  for (name, group_name), group in sorted(service.groups.items())[: self.max_topics]]
        return {"connections": service.connections, "topics_total": len(topics), "topics": shown,
                "clients": clients, "groups": groups}


class _Console(Resource):
    def render_GET(self, request) -> bytes:
        request.redirect(b"/console/")
        return b""


class Static(Resource):
    """
    One file of the package's web directory, read once when the site is
    made (a few kilobytes: serving it never touches the disk, so never
    blocks the reactor).  C{public}: any page may load it (a library file
    with no secret in it), for pages served elsewhere that import zaichik.js.
    """

    isLeaf = True

    def __init__(self, name: str, content_type: str, public: bool = False) -> None:
        super().__init__()
        with open(os.path.join(WEB, name), "rb") as f:
            self.body = f.read()
        self.content_type = content_type.encode("ascii")
        self.public = public

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        if self.public:
            request.setHeader(b"access-control-allow-origin", b"*")
        return self.body


def http_site(service: BrokerService, max_topics: int = DEFAULT_MAX_TOPICS,
              websockets: Sequence[Any] = ()) -> Site:
    """The HTTP side: /metrics, /healthz, /zaichik.js, /zaichik.d.ts and /console/."""
    site = metrics_site(service, max_topics)
    root = site.resource
    root.putChild(b"zaichik.js", Static("zaichik.js", "text/javascript; charset=utf-8", public=True))
    root.putChild(b"zaichik.d.ts", Static("zaichik.d.ts", "application/typescript; charset=utf-8", public=True))
    console = _Console()
    console.putChild(b"", Static("console.html", "text/html; charset=utf-8"))
    console.putChild(b"console.js", Static("console.js", "text/javascript; charset=utf-8"))
    console.putChild(b"console.css", Static("console.css", "text/css; charset=utf-8"))
    console.putChild(b"config.json", ConsoleConfig(service, websockets))
    console.putChild(b"state.json", ConsoleState(service))
    root.putChild(b"console", console)
    return site
