"""
C{twistd zaichik}: command-line options and the service they build.
"""

from __future__ import annotations

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.python import usage

from zaichik import codec, logs, units
from zaichik.clock import MonotonicTimers
from zaichik.protocol import BrokerFactory
from zaichik.service import BrokerService, Limits

def parse_duration(text: str) -> int:
    try:
        return units.parse_duration(text)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def endpoint_description(port: str) -> str:
    """A bare port number becomes C{tcp:PORT}; anything else is a strports description."""
    return f"tcp:{port}" if port.strip().isdigit() else port


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _frame_size(text: str) -> int:
    value = int(text)
    if value < 64:
        raise ValueError("--max-frame-size is at least 64 bytes")
    return value


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
        ["cache-size", None, 32 * 1024 * 1024,
         "With --data-dir: bytes of the newest messages kept in memory, for all topics "
         "(older ones are read from disk). Default 32 MiB.", _non_negative_int],
        ["fsync", None, "interval",
         "With --data-dir: always (reply after the disk has it), interval (every 100 ms), never."],
        ["auth", None, None,
         "Credentials file: every connection must authenticate with HELLO (see zaichik.auth)."],
        ["metrics-port", None, None,
         "Serve Prometheus metrics (/metrics) and /healthz over HTTP here: a port or an "
         "endpoint description (tcp:9102:interface=127.0.0.1)."],
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

    def opt_port(self, port: str) -> None:
        """
        Listen on this port number or strports endpoint description
        (tcp:8889:interface=127.0.0.1, unix:/path, ssl:...).  May be given
        more than once.  Default: tcp:8889.
        """
        self["port"].append(endpoint_description(port))

    opt_p = opt_port

    def postOptions(self) -> None:
        if not self["port"]:
            self["port"] = ["tcp:8889"]
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
        if self["log-format"] == "json" and self.parent is not None:
            # twistd reads its logger option once options are parsed and
            # before the service is made: this is the moment to choose it.
            logs.configure(self.parent.get("logfile"), bool(self.parent.get("nodaemon")))
            self.parent["logger"] = logs.JSON_OBSERVER


def makeService(config: Options) -> MultiService:
    top = MultiService()
    MonotonicTimers().setServiceParent(top)  # first: timers keep their period when the wall clock steps
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
    authenticator = None
    if config["auth"]:
        from zaichik.auth import CredentialsFileError, PortalAuthenticator

        try:
            authenticator = PortalAuthenticator.from_file(config["auth"])
        except (OSError, CredentialsFileError) as e:
            raise usage.UsageError(f"--auth {config['auth']}: {e}") from None
    storage = None
    if config["data-dir"]:
        from zaichik.storage.disk import DataDirLocked, DiskStorage, check_not_locked

        try:
            # The lock itself is taken when the broker starts (after twistd
            # has daemonized); this only refuses early, with a clear message.
            check_not_locked(config["data-dir"])
        except (DataDirLocked, OSError) as e:
            raise usage.UsageError(f"--data-dir: {e}") from None
        storage = DiskStorage(config["data-dir"], fsync=config["fsync"], cache_size=config["cache-size"])
    broker = BrokerService(
        storage=storage,
        authenticator=authenticator,
        default_retention=config["default-retention"],
        default_compaction_window=config["default-compaction-window"],
        sweep_interval=config["sweep-interval"] / 1000.0,
        limits=limits,
    )
    broker.setServiceParent(top)
    factory = BrokerFactory(broker, config["max-frame-size"])
    for description in config["port"]:
        strports.service(description, factory).setServiceParent(top)
    if config["metrics-port"]:
        from zaichik.metrics import metrics_site

        strports.service(endpoint_description(config["metrics-port"]), metrics_site(broker)).setServiceParent(top)
    return top
