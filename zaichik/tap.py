"""
C{twistd zaichik}: command-line options, the service they build, and how it
starts.

Every start-up error is one line on stderr (C{twistd zaichik: ...}) and
exit status 1, without a traceback: a bad option, a port that cannot be
listened on, a credentials file that cannot be read, a data dir that cannot
be used.  Errors found while parsing the options exit there; those found
when listening or opening storage are turned into the same line by
L{BrokerRoot}, the application's top service.

A bare port number listens on 127.0.0.1 only, unless C{--auth} is given (as
mosquitto 2 does): without credentials a broker is for this machine, until
an interface is named (C{--port tcp:8889:interface=0.0.0.0}).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

import zaichik
from zaichik import codec, logs, speedups, units
from zaichik.clock import MonotonicTimers
from zaichik.edge.tcp import BrokerFactory
from zaichik.service import BrokerService, Limits
from zaichik.storage import IStorage

_log = Logger()

LOCAL_INTERFACE = "127.0.0.1"
DEFAULT_PORT = 8889


def parse_duration(text: str) -> int:
    try:
        return units.parse_duration(text)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def is_bare_port(port: str) -> bool:
    return port.strip().isdigit()


def endpoint_description(port: str, local: bool = False) -> str:
    """
    A bare port number becomes C{tcp:PORT}, on 127.0.0.1 only if C{local};
    anything else is a strports endpoint description, used as given.
    """
    if not is_bare_port(port):
        return port
    return f"tcp:{port.strip()}:interface={LOCAL_INTERFACE}" if local else f"tcp:{port.strip()}"


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("not a whole number") from None
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _frame_size(text: str) -> int:
    value = _non_negative_int(text)
    if value < 64:
        raise ValueError("must be at least 64 (bytes)")
    return value


def _naming(name: str, coerce):
    """C{coerce}, whose errors name the option: C{--max-connections -5: must be 0 or more}."""

    def coerced(text: str):
        try:
            return coerce(text)
        except (ValueError, usage.UsageError) as e:
            raise usage.UsageError(f"--{name} {text}: {e}") from None

    coerced.coerceDoc = getattr(coerce, "coerceDoc", "")  # type: ignore[attr-defined]
    return coerced


def describe(error: BaseException, path: Optional[str] = None) -> str:
    """
    An error as a short phrase for a one-line message (no exception class
    names); the file name of an OSError is left out when it is C{path}.
    """
    if isinstance(error, CannotListenError) and error.socketError is not None:
        return describe(error.socketError)
    if isinstance(error, OSError) and error.strerror:
        if error.filename and error.filename != path:
            return f"{error.filename}: {error.strerror}"
        return error.strerror
    text = str(error).strip().rstrip(".")
    return text.splitlines()[0] if text else type(error).__name__


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run the zaichik pub/sub broker."

    optParameters = [
        ["max-frame-size", None, codec.DEFAULT_MAX_FRAME_SIZE,
         "Largest frame body accepted, in bytes (at least 64).", _frame_size],
        ["default-retention", None, 0,
         "retention_ttl of topics created by PUBLISH or SUBSCRIBE (ms, or 60s, 5m...).", parse_duration],
        ["default-compaction-window", None, 0,
         "compaction_window of topics created by PUBLISH or SUBSCRIBE.", parse_duration],
        ["max-retained-bytes", None, 0,
         "Bound on each topic's retained bytes (encoded messages); 0: no bound.", _non_negative_int],
        ["retained-bytes-policy", None, "expire",
         "At --max-retained-bytes: expire (the oldest make room) or reject (LIMIT)."],
        ["sweep-interval", None, 1000,
         "How often expired messages are swept from memory (default 1s).", parse_duration],
        ["max-connections", None, Limits.max_connections, "Open connections at most.", _non_negative_int],
        ["max-topics", None, Limits.max_topics, "Topics at most.", _non_negative_int],
        ["max-subscriptions", None, Limits.max_subscriptions,
         "Subscriptions of one connection at most.", _non_negative_int],
        ["max-output-buffer", None, Limits.max_output_buffer,
         "Bytes queued for a subscriber that does not read before --slow-consumer applies.",
         _non_negative_int],
        ["slow-consumer", None, "disconnect",
         "disconnect (ERROR LIMIT and close) or block (stop reading the topic's publishers)."],
        ["data-dir", None, None,
         "Keep topics, messages, commits and compaction state in this directory (default: memory only)."],
        ["engine", None, None,
         "Share topics with other brokers through Redis: redis://HOST:PORT[/DB] (one primary) or "
         "redis+cluster://HOST:PORT,HOST:PORT,... (a Redis Cluster's seed nodes). See docs/scale-out.rst."],
        ["cache-size", None, 32 * 1024 * 1024,
         "With --data-dir or --engine: bytes of the newest messages kept in memory, for all topics "
         "(older ones are read from disk). Default 32 MiB.", _non_negative_int],
        ["fsync", None, "interval",
         "With --data-dir: always (reply after the disk has it), interval (every 100 ms), never."],
        ["auth", None, None,
         "Credentials file: every connection must authenticate with HELLO (see zaichik.auth)."],
        ["metrics-port", None, None,
         "Serve Prometheus metrics (/metrics), /healthz, the web console (/console/) and zaichik.js "
         "over HTTP here: a port or an endpoint description (tcp:9102:interface=0.0.0.0). A bare "
         "port listens on 127.0.0.1 only, unless --auth is given (these pages ask for no credentials)."],
        ["metrics-max-topics", None, 1000,
         "Topics with /metrics series of their own (the first ones by name); the others are "
         "summed into series labelled topic=\"_other\".", _non_negative_int],
        ["log-format", None, "text", "text, or json: one JSON object a line with structured fields."],
        ["frame-timeout", None, int(Limits.frame_timeout * 1000),
         "A frame must be complete this long after its first byte arrives (LIMIT and close "
         "beyond; 0: no bound).", parse_duration],
        ["max-pending-input", None, Limits.max_pending_input,
         "Bytes of incomplete frames held for all connections together; the connection that "
         "passes it is told LIMIT and closed (0: no bound).", _non_negative_int],
        ["max-connections-per-address", None, Limits.max_connections_per_address,
         "Open connections from one address (one user on a unix socket); 0: no bound.", _non_negative_int],
        ["max-key-size", None, Limits.max_key_size, "Bytes of a message key at most (LIMIT beyond).",
         _non_negative_int],
        ["max-compaction-keys", None, Limits.max_compaction_keys,
         "Compaction keys one topic remembers at most; a new key beyond it is refused with LIMIT "
         "until keys leave their window (a key costs a few hundred bytes).", _non_negative_int],
        ["max-compaction-keys-total", None, Limits.max_compaction_keys_total,
         "Compaction keys of all topics together at most.", _non_negative_int],
        ["max-client-id", None, Limits.max_client_id, "Bytes of a HELLO client_id at most.", _non_negative_int],
        ["durable-ttl", None, Limits.durable_ttl,
         "Forget a durable client's positions after it has neither been connected nor committed "
         "for this long (default 7d; 0: never).", parse_duration],
        ["idle-timeout", None, int(Limits.idle_timeout * 1000),
         "Close connections that send nothing for this long; PING keeps them alive (0: never).",
         parse_duration],
    ]

    parent = None

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self["websocket-port"] = []
        self["websocket-origin"] = []

    def opt_websocket_port(self, port: str) -> None:
        """
        Listen for WebSocket clients (browsers; subprotocol zaichik.v1) on
        this port number or strports endpoint description (ssl:... for
        wss://).  May be given more than once.  A bare port number listens on
        127.0.0.1 only, unless --auth is given.
        """
        self["websocket-port"].append(port)

    def opt_websocket_origin(self, origin: str) -> None:
        """
        A web page origin (https://app.example.com) allowed to open a
        WebSocket, or * for any; may be given more than once.  Default: pages
        from the listener's own host name (any port, so the console on
        --metrics-port of the same host).  Clients that send no Origin (not
        browsers) are always let in.
        """
        self["websocket-origin"].append(origin)

    def opt_port(self, port: str) -> None:
        """
        Listen for clients on this port number or strports endpoint
        description (tcp:8889:interface=0.0.0.0, unix:/path, ssl:...).  May
        be given more than once.  A bare port number listens on 127.0.0.1
        only, unless --auth is given.  Default: 8889.
        """
        self["port"].append(port)

    opt_p = opt_port

    def parseOptions(self, options=None) -> None:
        """
        Under twistd, a usage error exits with one line on stderr rather
        than twistd's page of usage.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            hint = " (twistd zaichik --help lists the options)" if "not recognized" in str(e) else ""
            raise SystemExit(f"twistd zaichik: {e}{hint}") from None

    def postOptions(self) -> None:
        if self["sweep-interval"] <= 0:
            raise usage.UsageError("--sweep-interval must be positive")
        if self["retained-bytes-policy"] not in ("expire", "reject"):
            raise usage.UsageError("--retained-bytes-policy is expire or reject")
        if self["slow-consumer"] not in ("disconnect", "block"):
            raise usage.UsageError("--slow-consumer is disconnect or block")
        if self["fsync"] not in ("always", "interval", "never"):
            raise usage.UsageError("--fsync is always, interval or never")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format is text or json")
        try:
            speedups.gc_threshold()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self.authenticator = None
        if self["auth"]:
            from zaichik.auth import CredentialsFileError, PortalAuthenticator

            try:
                self.authenticator = PortalAuthenticator.from_file(self["auth"])
            except (OSError, CredentialsFileError) as e:
                raise usage.UsageError(f"--auth {self['auth']}: {describe(e, self['auth'])}") from None
        # Without credentials, a bare port is for this machine only.
        local = not self["auth"]
        self["port"] = [self._endpoint("--port", port, local) for port in self["port"] or [str(DEFAULT_PORT)]]
        self["websocket-port"] = [self._endpoint("--websocket-port", port, local) for port in self["websocket-port"]]
        if self["metrics-port"]:
            self["metrics-port"] = self._endpoint("--metrics-port", self["metrics-port"], local)
        if self["engine"]:
            self._check_engine()
        if self["data-dir"]:
            from zaichik.storage.disk import DataDirLocked, check_not_locked

            try:
                # The lock itself is taken when the broker starts (after
                # twistd has daemonized); this only refuses early.
                check_not_locked(self["data-dir"])
            except (DataDirLocked, OSError) as e:
                raise usage.UsageError(f"--data-dir {self['data-dir']}: {describe(e, self['data-dir'])}") from None
        if self.parent is not None:
            # twistd reads its logger option once options are parsed and
            # before the service is made: this is the moment to choose it.
            if self["log-format"] == "json":
                self.parent["logger"] = logs.JSON_OBSERVER
            logs.configure(self.parent.get("logfile"), bool(self.parent.get("nodaemon")),
                           bool(self.parent.get("syslog")), self.parent.get("logger"))

    def _check_engine(self) -> None:
        from zaichik.storage.resp import parse_url

        try:
            parse_url(self["engine"])
        except ValueError as e:
            raise usage.UsageError(f"--engine: {e}") from None
        if self["data-dir"]:
            raise usage.UsageError("--engine and --data-dir: messages live in the engine (Redis); choose one")
        if self["max-retained-bytes"]:
            raise usage.UsageError("--max-retained-bytes is not offered with --engine (use Redis' maxmemory "
                                   "and retention_ttl)")
        try:
            import hiredis  # noqa: F401
        except ImportError:
            raise usage.UsageError("--engine needs hiredis: pip install 'zaichik[redis]'") from None

    @staticmethod
    def _endpoint(option: str, port: str, local: bool) -> str:
        """The endpoint description for C{port}, checked (nothing is bound yet)."""
        if is_bare_port(port) and not 0 <= int(port) <= 65535:
            raise usage.UsageError(f"{option} {port}: a port number is 0 to 65535")
        description = endpoint_description(port, local)
        from twisted.internet import reactor

        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise usage.UsageError(f"{option} {port}: {describe(e)}") from None
        return description


def _named_parameters(parameters: Any) -> Any:
    """C{optParameters} whose coercers' errors name their option."""
    named = []
    for p in parameters:
        if len(p) > 4 and p[4] is not None:
            p = [*p[:4], _naming(p[0], p[4])]
        named.append(p)
    return named


Options.optParameters = _named_parameters(Options.optParameters)
# --help prints a handler's docstring as it is: one paragraph, no indentation.
for _handler in (Options.opt_port, Options.opt_websocket_port, Options.opt_websocket_origin):
    _handler.__doc__ = " ".join((_handler.__doc__ or "").split())


def makeService(config: Options) -> MultiService:
    speedups.tune_malloc()  # large messages' buffers reused, not mapped afresh (see there)
    speedups.tune_gc()  # cycles looked for less often (see there)
    limits = Limits(
        max_connections=config["max-connections"],
        max_topics=config["max-topics"],
        max_subscriptions=config["max-subscriptions"],
        max_retained_bytes=config["max-retained-bytes"],
        retained_bytes_policy=config["retained-bytes-policy"],
        max_output_buffer=config["max-output-buffer"],
        slow_consumer=config["slow-consumer"],
        idle_timeout=config["idle-timeout"] / 1000.0,
        frame_timeout=config["frame-timeout"] / 1000.0,
        max_pending_input=config["max-pending-input"],
        max_connections_per_address=config["max-connections-per-address"],
        max_frame_size=config["max-frame-size"],
        max_key_size=config["max-key-size"],
        max_compaction_keys=config["max-compaction-keys"],
        max_compaction_keys_total=config["max-compaction-keys-total"],
        max_client_id=config["max-client-id"],
        durable_ttl=config["durable-ttl"],
    )
    authenticator = getattr(config, "authenticator", None)
    if authenticator is None and config["auth"]:
        from zaichik.auth import PortalAuthenticator

        authenticator = PortalAuthenticator.from_file(config["auth"])
    storage: Optional[IStorage] = None
    if config["data-dir"]:
        from zaichik.storage.disk import DiskStorage

        storage = DiskStorage(config["data-dir"], fsync=config["fsync"], cache_size=config["cache-size"])
    elif config["engine"]:
        from zaichik.storage.redis import RedisStorage

        storage = RedisStorage(config["engine"], durable_ttl=config["durable-ttl"], cache_size=config["cache-size"])
    broker = BrokerService(
        storage=storage,
        authenticator=authenticator,
        default_retention=config["default-retention"],
        default_compaction_window=config["default-compaction-window"],
        sweep_interval=config["sweep-interval"] / 1000.0,
        limits=limits,
    )
    top = BrokerRoot(broker, twistd=config.parent, data_dir=config["data-dir"], fsync=config["fsync"],
                     engine=config["engine"])
    MonotonicTimers().setServiceParent(top)  # first: timers keep their period when the wall clock steps
    broker.setServiceParent(top)
    factory = BrokerFactory(broker, config["max-frame-size"])
    for description in config["port"]:
        Listener("--port", description, factory).setServiceParent(top)
    websockets = []
    if config["websocket-port"]:
        from zaichik.edge.websocket import WebSocketFactory

        ws_factory = WebSocketFactory(broker, config["max-frame-size"], config["websocket-origin"])
        for description in config["websocket-port"]:
            listener = Listener("--websocket-port", description, ws_factory)
            listener.setServiceParent(top)
            websockets.append(listener)
    if config["metrics-port"]:
        from zaichik.edge.http import http_site

        site = http_site(broker, config["metrics-max-topics"], websockets)
        Listener("--metrics-port", config["metrics-port"], site).setServiceParent(top)
    return top


class StartupError(Exception):
    """The broker cannot start; the message is the one line that says why."""


def report(line: str) -> None:
    """
    A start-up error: one line on the original stderr, and in the log too,
    unless the log is on stdout (a foreground C{twistd -n} without
    C{--logfile}), where the line on stderr says it once.
    """
    stderr = sys.__stderr__
    if stderr is not None:
        try:
            stderr.write(f"twistd zaichik: {line}\n")
            stderr.flush()
        except (OSError, ValueError):
            pass
    if not logs.to_stdout():
        _log.critical("Cannot start: {error}", error=line)


def _exit_status_at_exit(status: int) -> None:
    """
    Exit with C{status} once twistd is done (it always exits 0 after its
    reactor stopped): for an error found after the reactor started.
    """
    import atexit

    def exit_now() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(exit_now)


@implementer(IStreamServerEndpoint)
class _Announced:
    """An endpoint whose C{listen} also calls C{announce} with the port."""

    def __init__(self, endpoint, announce) -> None:
        self.endpoint = endpoint
        self.announce = announce

    def listen(self, factory) -> Deferred:
        return self.endpoint.listen(factory).addCallback(self.announce)


def _address(port) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


class Listener(StreamServerEndpointService):
    """
    One listening port, from an option's endpoint description: where it
    listens is logged, and a failure to listen becomes a L{StartupError}
    that names the option and the description.
    """

    WHAT = {"--port": "Listening for clients on {address} ({listener})",
            "--metrics-port": "Serving /metrics, /healthz, the console and zaichik.js on {address} ({listener})",
            "--websocket-port": "Listening for WebSocket clients on {address} ({listener})"}

    def __init__(self, option: str, description: str, factory) -> None:
        from twisted.internet import reactor

        endpoint = endpoints.serverFromString(reactor, description)
        super().__init__(_Announced(endpoint, self._listening), factory)
        # As strports.service() does: a port that cannot be listened on at
        # once raises from privilegedStartService rather than being logged.
        self._raiseSynchronously = True
        self.option = option
        self.description = description
        self.address: Optional[str] = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(f"cannot listen on {self.option} {self.description}: {describe(e)}") from None

    def startService(self) -> None:
        try:
            super().startService()  # listens now if privilegedStartService did not
        except StartupError:
            raise
        except Exception as e:
            raise StartupError(f"cannot listen on {self.option} {self.description}: {describe(e)}") from None

    def _listening(self, port):
        self.address = _address(port)
        self.port = port
        text = self.WHAT.get(self.option, "Listening on {address} ({listener})")
        if self.address.startswith(f"{LOCAL_INTERFACE}:"):
            text += (": local only, other machines cannot connect (a bare port listens on 127.0.0.1 "
                     "unless --auth is given; tcp:PORT:interface=0.0.0.0 listens on every interface)")
        _log.info(text, address=self.address, listener=self.description, option=self.option)
        return port


class BrokerRoot(MultiService):
    """
    The top service of C{twistd zaichik}: the broker, its listeners and
    metrics.  It logs what the broker starts with (version, storage) and
    what it recovered, and turns a start-up failure (a port that cannot be
    listened on, storage that cannot be opened) into one line on stderr and
    exit status 1.

    twistd runs C{privilegedStartService} (the ports are bound) and
    C{startService} (storage is opened) before its reactor runs; a failure
    there exits at once (twistd's own way of refusing to start, as when it
    cannot switch user), telling a daemonizing twistd's parent through its
    status pipe.  A failure found once the reactor runs stops it.

    @ivar twistd: twistd's options (for its pid file and status pipe), or
        None when not run by twistd.
    """

    def __init__(self, broker: BrokerService, twistd: Optional[Dict[str, Any]] = None,
                 data_dir: Optional[str] = None, fsync: str = "interval", engine: Optional[str] = None) -> None:
        super().__init__()
        self.broker = broker
        self.twistd = twistd
        self.engine = engine
        self.data_dir = data_dir
        self.fsync = fsync
        self._failed: Optional[str] = None
        self._said_start = False

    def privilegedStartService(self) -> None:
        self._log_start()
        try:
            super().privilegedStartService()
        except StartupError as e:
            self.fail(str(e))

    def startService(self) -> None:
        self._log_start()
        self.broker.ready.addCallbacks(self._ready, self._not_ready)
        try:
            super().startService()
        except StartupError as e:
            self.fail(str(e))
        if self._failed is not None:
            self.fail(self._failed)

    def _log_start(self) -> None:
        if self._said_start:
            return
        self._said_start = True
        fields: Dict[str, Any] = {"version": zaichik.__version__}
        if self.engine:
            fields.update(storage="engine", engine=self.engine)
            mode = "on the engine {engine}, shared with every broker that uses it"
        elif self.data_dir:
            fields.update(storage="data-dir", data_dir=self.data_dir, fsync=self.fsync)
            mode = "data dir {data_dir}, --fsync {fsync}"
        else:
            fields.update(storage="memory")
            mode = "in memory only (nothing is kept across a restart: --data-dir keeps it)"
        _log.info("zaichik {version} starting: " + mode, **fields)

    def _ready(self, result):
        broker = self.broker
        fields = dict(topics=len(broker.topics), retained=sum(t.retained for t in broker.topics.values()),
                      durable_clients=len(broker.durable_positions()))
        if self.data_dir:
            _log.info("Recovered from {data_dir}: {topics} topics, {retained} messages retained, "
                      "{durable_clients} durable clients' positions", data_dir=self.data_dir, **fields)
        else:
            _log.info("Ready: {topics} topics, {retained} messages retained (in memory)", **fields)
        return result

    def _not_ready(self, failure) -> None:
        """Storage could not be opened: said here (the broker logs nothing more)."""
        line = self._storage_error(failure.value)
        from twisted.internet import reactor

        if reactor.running:
            self.fail_running(line)
        else:
            self._failed = line  # startService exits once its children are started
        return None

    def _storage_error(self, error: BaseException) -> str:
        if self.engine:
            return f"cannot use --engine {self.engine}: {getattr(error, 'message', None) or describe(error)}"
        if not self.data_dir:
            return f"cannot open storage: {describe(error)}"
        where = self.data_dir
        if isinstance(error, OSError) and error.strerror and error.filename == where:
            reason = error.strerror
        else:
            reason = describe(error)
            if reason.startswith(where + " "):
                reason = "it " + reason[len(where) + 1:]
        return f"cannot use --data-dir {where}: {reason}"

    def fail(self, line: str) -> None:
        """Before the reactor runs: say why, and exit with status 1."""
        report(line)
        twistd = self.twistd
        if twistd is not None:
            pidfile = twistd.get("pidfile")
            if pidfile:
                try:
                    with open(pidfile) as f:
                        mine = f.read().strip() == str(os.getpid())
                    if mine:
                        os.unlink(pidfile)
                except OSError:
                    pass
            pipe = twistd.get("statusPipe")
            if pipe is not None:
                # What a daemonizing twistd's waiting parent prints.
                try:
                    os.write(pipe, ("1 " + line).encode("ascii", "backslashreplace")[:100])
                    os.close(pipe)
                except OSError:
                    pass
                twistd["statusPipe"] = None
        raise SystemExit(1)

    def fail_running(self, line: str) -> None:
        """Once the reactor runs: say why, stop it, and exit with status 1."""
        from twisted.internet import reactor
        from twisted.internet.error import ReactorNotRunning

        report(line)
        _exit_status_at_exit(1)
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass
