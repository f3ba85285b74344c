"""
Log output for machines: C{twistd zaichik --log-format json} writes one JSON
object a line (C{twisted.logger}'s own event format, with every structured
field of the event: topic, client_id, ...), to twistd's C{--logfile}
(C{-} for stdout), else to stdout when running in the foreground, else to
C{twistd.log}.

twistd takes a log observer factory by its dotted name (its C{--logger}
option), so the destination is recorded here when options are parsed.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver

JSON_OBSERVER = "zaichik.logs.json_observer"
_destination = {"logfile": None, "nodaemon": False}


def configure(logfile, nodaemon: bool) -> None:
    _destination.update(logfile=logfile, nodaemon=nodaemon)


def json_observer() -> ILogObserver:
    logfile = _destination["logfile"]
    if logfile == "-" or (not logfile and _destination["nodaemon"]):
        return jsonFileLogObserver(sys.stdout)
    return jsonFileLogObserver(open(logfile or "twistd.log", "a", encoding="utf-8"))
