"""
The broker's HTTP side (L{zaichik.edge.http}) in process: the console's
state and config as JSON, zaichik.js and the console's files from the
package, and the redirect to /console/.
"""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from zaichik import codec
from zaichik.edge.http import WEB, http_site
from zaichik.edge.tcp import BrokerFactory
from zaichik.service import BrokerService


def get(site, path: str) -> DummyRequest:
    request = DummyRequest([segment.encode("ascii") for segment in path.lstrip("/").split("/")])
    request.uri = path.encode("ascii")
    resource = site.getResourceFor(request)
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request


def body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


class _Listener:
    """What ConsoleConfig reads of a tap.Listener."""

    def __init__(self, port: int, description: str) -> None:
        self.description = description
        self.port = self

        class Host:
            pass

        self._host = Host()
        self._host.port = port

    def getHost(self):
        return self._host


class HttpSiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.service = BrokerService(clock=self.clock)
        self.site = http_site(self.service, websockets=[_Listener(8890, "tcp:8890"),
                                                        _Listener(8443, "ssl:8443:privateKey=k.pem")])

    def send(self, *requests) -> list:
        connection = BrokerFactory(self.service).buildProtocol(None)
        connection.makeConnection(StringTransport())
        connection.dataReceived(b"".join(codec.frame(r.encode()) for r in requests))
        return connection

    def test_state_lists_topics_clients_and_groups(self):
        self.send(codec.Hello(1, "reader", ""), codec.CreateTopic(2, "jobs", 60_000, 5_000),
                  *[codec.Publish(0, "jobs", b"x" * 10) for _ in range(4)],
                  codec.Subscribe(3, "jobs", codec.Start.EARLIEST), codec.Commit(4, "jobs", 0))
        self.send(codec.SubscribeGroup(1, "jobs", "workers", codec.Start.EARLIEST, 0, 2, 0))
        request = get(self.site, "/console/state.json")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        state = json.loads(body(request))
        [topic] = state["topics"]
        self.assertEqual({k: topic[k] for k in ("name", "retention_ttl", "compaction_window", "next_offset",
                                                 "retained", "subscribers", "messages_out")},
                         {"name": "jobs", "retention_ttl": 60_000, "compaction_window": 5_000, "next_offset": 4,
                          "retained": 4, "subscribers": 2, "messages_out": 6})
        self.assertGreater(topic["retained_bytes"], 40)
        self.assertEqual(state["clients"], [{"client_id": "reader", "topic": "jobs", "committed": 0, "lag": 3}])
        self.assertEqual(state["groups"], [{"topic": "jobs", "group": "workers", "position": 0, "lag": 4,
                                            "outstanding": 2, "members": 1, "redelivered": 0}])
        self.assertEqual((state["connections"], state["topics_total"]), (2, 1))

    def test_config_names_the_websocket_listeners(self):
        config = json.loads(body(get(self.site, "/console/config.json")))
        self.assertEqual(config, {"websockets": [{"port": 8890, "tls": False}, {"port": 8443, "tls": True}],
                                  "auth": False})

    def test_zaichik_js_from_the_package_for_any_page(self):
        request = get(self.site, "/zaichik.js")
        with open(os.path.join(WEB, "zaichik.js"), "rb") as f:
            self.assertEqual(body(request), f.read())
        headers = request.responseHeaders
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/javascript; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        self.assertIn(b"export declare function connect", body(get(self.site, "/zaichik.d.ts")))

    def test_console_files(self):
        page = get(self.site, "/console/")
        self.assertIn(b"<title>zaichik console</title>", body(page))
        self.assertIsNone(page.responseHeaders.getRawHeaders(b"access-control-allow-origin"))
        self.assertIn(b'from "/zaichik.js"', body(get(self.site, "/console/console.js")))
        self.assertEqual(get(self.site, "/console/console.css").responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/css; charset=utf-8"])

    def test_console_without_slash_redirects(self):
        request = get(self.site, "/console")
        self.assertEqual(request.responseCode, 302)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"location"), [b"/console/"])

    def test_metrics_and_healthz_still_there(self):
        self.assertIn(b"metrics", self.site.resource.children)  # (a WSGI app: tested over HTTP in test_metrics)
        self.service.running = True
        self.assertEqual(body(get(self.site, "/healthz")), b"ok\n")
