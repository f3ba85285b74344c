"""
Where C{twistd zaichik} logs, and its log format for machines.

C{--log-format json} writes one JSON object a line (JSON Lines: no record
separator), with:

  - C{time}: ISO 8601, UTC, to the millisecond;
  - C{level}: C{debug}, C{info}, C{warn}, C{error} or C{critical};
  - C{namespace}: the logger's (C{zaichik.service}, C{zaichik.tap}, ...);
  - C{message}: the event rendered as text, as the text log shows it;
  - the event's own structured fields (C{topic}, C{client_id}, ...);
  - C{traceback}: the traceback, when the event carries a failure.

Twisted's bookkeeping (the C{log_*} keys, the logger's source object) is
left out.  The lines go to twistd's C{--logfile}, rotated as twistd rotates
its text log (every 1,000,000 bytes and on SIGUSR1; see
L{twisted.python.logfile.LogFile}); or to stdout with C{--logfile -}, or when
running in the foreground (C{-n}) without C{--logfile}; else to
C{twistd.log}.

twistd takes a log observer factory by its dotted name (its C{--logger}
option), so where the log goes is recorded here when the options are
parsed (L{configure}).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Dict, Optional

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

JSON_OBSERVER = "zaichik.logs.json_observer"

_destination: Dict[str, Any] = {"logfile": None, "nodaemon": False, "syslog": False, "logger": None}

# Keys of events logged through the legacy twisted.python.log API (by
# Twisted itself, mostly): their content is rendered into "message".
_LEGACY_KEYS = frozenset(["message", "isError", "system", "time", "format", "why", "failure", "logLevel",
                          "printed"])


def configure(logfile: Optional[str] = None, nodaemon: bool = False, syslog: bool = False,
              logger: Optional[str] = None) -> None:
    """Record twistd's log options (C{--logfile}, C{-n}, C{--syslog}, C{--logger})."""
    _destination.update(logfile=logfile, nodaemon=nodaemon, syslog=syslog, logger=logger)


def to_stdout() -> bool:
    """Does the log go to stdout (C{-n} without C{--logfile}, or C{--logfile -})?"""
    d = _destination
    if d["syslog"] or (d["logger"] and d["logger"] != JSON_OBSERVER):
        return False
    return d["logfile"] == "-" or (not d["logfile"] and bool(d["nodaemon"]))


def _time(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def event_as_dict(event: Dict[str, Any]) -> Dict[str, Any]:
    """One log event as the JSON object C{--log-format json} writes (not yet serialized)."""
    legacy = "log_legacy" in event or event.get("log_namespace") == "log_legacy"
    failure = event.get("log_failure")
    message: Optional[str] = None
    if failure is None and legacy and event.get("isError") and event.get("failure") is not None:
        # log.err(): the rendered legacy text would hold the whole traceback.
        failure = event["failure"]
        message = event.get("why") or "Unhandled Error"
    if message is None:
        message = formatEvent(event)
    record: Dict[str, Any] = {}
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY_KEYS):
            continue
        record[key] = value
    level = event.get("log_level")
    namespace = event.get("log_namespace")
    if legacy:
        namespace = "twisted"
        system = event.get("log_system", event.get("system"))
        if system and system != "-":
            record["system"] = system
    record.update(
        time=_time(event.get("log_time")),
        level=level.name if isinstance(level, type(LogLevel.info)) else "info",
        namespace=namespace,
        message=message,
    )
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    return record


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


def event_as_json(event: Dict[str, Any]) -> str:
    """One log event as one line of JSON (without the newline)."""
    record = event_as_dict(event)
    try:
        return json.dumps(record, default=_jsonable, allow_nan=False)
    except (TypeError, ValueError):
        # A field that cannot be serialized as it is (keys that are not
        # strings, a NaN): each such field as text instead.
        safe = {}
        for key, value in record.items():
            try:
                json.dumps(value, default=_jsonable, allow_nan=False)
                safe[str(key)] = value
            except (TypeError, ValueError):
                safe[str(key)] = repr(value)
        return json.dumps(safe, default=_jsonable, allow_nan=False)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON to C{out} (and flushes it)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: Dict[str, Any]) -> None:
        self._out.write(event_as_json(event) + "\n")
        self._out.flush()


def json_observer() -> ILogObserver:
    """twistd's C{--logger} for C{--log-format json}: the destination twistd would use for its text log."""
    logfile = _destination["logfile"]
    if logfile == "-" or (not logfile and _destination["nodaemon"]):
        return JSONLinesObserver(sys.stdout)
    from twisted.python.logfile import LogFile

    out = LogFile.fromFullPath(logfile or "twistd.log")
    _rotate_on_sigusr1(out)
    return JSONLinesObserver(out)


def _rotate_on_sigusr1(out) -> None:
    """As twistd does for its text log file: SIGUSR1 rotates it (unless SIGUSR1 is taken)."""
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum, frame):
        from twisted.internet import reactor

        reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)
