"""
The C{zaichik} command: publish, subscribe and look at topics from a shell,
in the manner of mosquitto_pub/mosquitto_sub, the nats CLI and kcat.

    zaichik pub greetings hello world          # two messages
    seq 10 | zaichik pub numbers --ack         # one message per line, print offsets
    tail -f app.log | zaichik pub logs         # each line published as it comes
    zaichik sub greetings --from earliest --count 2
    zaichik sub greetings --client-id w1 --commit
    zaichik sub logs --format raw | grep ERROR # the values alone
    zaichik sub 'sensors.>'                    # every topic under sensors. (a pattern)
    zaichik sub jobs --group workers           # a share of jobs; each acked once printed
    zaichik topics
    zaichik create orders --retention 60s --compaction-window 10s
    zaichik check /var/lib/zaichik             # damage in a data dir (no broker needed)

Connection options (C{-s/--server}, C{--client-id}, C{--token}, C{--tls},
C{--ca}, C{--timeout}) go before or after the subcommand.  C{--server} (or
C{ZAICHIK_SERVER}) takes C{host:port}, a port, C{unix:path=P}, or several
C{host:port}s separated by commas (tried in turn).

The command runs on the blocking client (L{zaichik.sync}): standard input
is read line by line in the main thread and each line handed to the
client, which blocks while the connection has a bounded amount unwritten,
so memory stays flat however much is piped in and each line goes out as it
is read; Ctrl-C is a KeyboardInterrupt in that thread; and no Twisted is
imported, so the command starts quickly.

Errors are one line on stderr, and the exit status says what happened (see
L{EXIT_STATUS}).  C{check} exits 1 when it finds damage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Iterable, Iterator, List, Optional, TextIO, Tuple

from zaichik import __version__, units
from zaichik.codec import Start

EXIT_OK = 0
EXIT_BROKER_ERROR = 1
EXIT_DAMAGE = 1  # check
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_INTERRUPTED = 130   # Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_PIPE = 141          # standard output closed (128 + SIGPIPE): `| head`

EXIT_STATUS = """\
exit status:
  0    done
  1    the broker answered with an error (BAD_TOPIC, FRAME_TOO_LARGE, LIMIT, ...)
  2    usage: a bad option or argument, or input that cannot be used (a line
       without the --key-from field, a topic that is not UTF-8)
  3    no connection: refused, timed out (--timeout), lost, TLS failure
  130  interrupted (Ctrl-C); nothing is printed
  141  standard output was closed (zaichik sub ... | head); nothing is printed
"""

CHECK_EPILOG = """\
Every segment is read whole and each batch's CRC checked (.idx files are not
trusted); meta.json, commits.log and FORMAT are checked too.  Nothing is
written: files are opened read-only, the lock is not taken, nothing is
upgraded.  Run it on a stopped broker's data dir: a running broker's newest
segment may be mid-write.

exit status:
  0  no damage.  Torn tails (the end of a write a crash cut short) and
     segments of release 0.1.0 (upgraded when the broker starts) are
     warnings: they still exit 0
  1  damage found (or the data dir is of a newer release)
  2  usage error: DATA_DIR is not a directory, or not a data dir (no topics/)
"""

SUB_DESCRIPTION = """\
Print messages of the topics as they arrive, until --count or Ctrl-C.

A TOPIC may be a pattern: it follows every topic it matches, those that
exist and those created later, and each line names the message's topic.
  zaichik sub 'sensors.>'              sensors.a, sensors.a.b, ... (not sensors)
  zaichik sub 'sensors.*.temp'         sensors.kitchen.temp, ...

With --group NAME the command is a member of that consumer group of each
TOPIC: the topic's messages are shared among the members, each to one of
them, and each is acknowledged once printed (--no-ack: never), so a
message printed by a member that dies before acknowledging it is sent
again, to another member (at least once).
  zaichik sub jobs --group workers     in each of several shells
  zaichik sub jobs --group workers --ack-timeout 5m --max-inflight 1
"""

DEFAULT_TIMEOUT = 10.0


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _StdoutClosed(Exception):
    """Standard output is gone (a closed pipe)."""


def _duration(text: str) -> int:
    try:
        return units.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    """C{--timeout}: a duration with a unit (C{500ms}, C{5s}, C{1m}); a plain number is seconds."""
    try:
        value = float(text)
    except ValueError:
        try:
            return units.parse_duration(text) / 1000
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a timeout is more than 0, not {text!r}")
    return value


def _start(text: str):
    """C{latest}, C{earliest}, C{default} or C{offset:N}."""
    if text in ("latest", "earliest", "default"):
        return Start[text.upper()], 0
    if text.startswith("offset:") and text[7:].isdigit():
        return Start.OFFSET, int(text[7:])
    raise argparse.ArgumentTypeError(f"--from takes latest, earliest, default or offset:N, not {text!r}")


def _key_of(line: bytes, key_from: Optional[str], number: int) -> Optional[bytes]:
    """
    The key for one input line: C{--key-from N} takes the N-th
    whitespace-separated field (from 1), C{--key-from json:NAME} a field of
    a JSON object.
    """
    if key_from is None:
        return None
    if key_from.startswith("json:"):
        name = key_from[5:]
        try:
            value = json.loads(line)[name]
        except UnicodeDecodeError:
            raise CommandError(f"line {number} is not UTF-8 text, so not JSON", EXIT_USAGE) from None
        except (ValueError, KeyError, TypeError, IndexError):
            shown = line[:80].decode("utf-8", "backslashreplace")
            raise CommandError(f"line {number} has no JSON field {name!r}: {shown!r}", EXIT_USAGE) from None
        return value.encode() if isinstance(value, str) else json.dumps(value).encode()
    if not key_from.isdigit() or key_from == "0":
        raise CommandError(f"--key-from takes a field number from 1, or json:NAME, not {key_from!r}",
                           EXIT_USAGE)
    fields = line.split()
    index = int(key_from) - 1
    if not 0 <= index < len(fields):
        shown = line[:80].decode("utf-8", "backslashreplace")
        raise CommandError(f"line {number} has no field {key_from}: {shown!r}", EXIT_USAGE)
    return fields[index]


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """
    The options every broker command takes.  On the subcommands their
    defaults are SUPPRESS, so that they are taken after the subcommand and
    do not undo what was given before it.
    """

    def default(value):
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection (before or after the subcommand)")
    group.add_argument("-s", "--server", default=default(os.environ.get("ZAICHIK_SERVER", "localhost:8889")),
                       help="host:port, a port, unix:path=P, or host:port,host:port,... tried in turn "
                            "(or ZAICHIK_SERVER; default localhost:8889)")
    group.add_argument("--client-id", default=default(""), help="durable client id (HELLO)")
    group.add_argument("--token", default=default(os.environ.get("ZAICHIK_TOKEN", "")),
                       help="authentication token NAME:SECRET (HELLO; or ZAICHIK_TOKEN)")
    group.add_argument("--tls", action="store_true", default=default(False), help="connect over TLS")
    group.add_argument("--ca", default=default(None),
                       help="PEM file of the CA that signed the broker's certificate (implies --tls)")
    group.add_argument("--timeout", type=_seconds, default=default(DEFAULT_TIMEOUT), metavar="DURATION",
                       help="for connecting and for each answer: 5s, 500ms (a plain number is "
                            "seconds; default 10s)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="zaichik", description="Talk to a zaichik broker.",
                                  epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"zaichik {__version__}")
    _connection_options(top, suppress=False)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  **kwargs)
        _connection_options(sub, suppress=True)
        return sub

    pub = command("pub", help="publish messages (arguments, or one per line of stdin as it is read)",
                  description="Publish each argument, or else each line of stdin as it is read (without "
                              "its \\n or \\r\\n; bytes as they are).")
    pub.add_argument("topic")
    pub.add_argument("messages", nargs="*")
    pub.add_argument("--key", help="the key of every message")
    pub.add_argument("--key-from", metavar="N|json:NAME",
                     help="key each line by its N-th field, or by a field of a JSON line")
    pub.add_argument("--ack", action="store_true", help="wait for each PUBLISHED; print offsets")

    sub = command("sub", help="print messages as they arrive (of topics, patterns, or as a group member)",
                  description=SUB_DESCRIPTION)
    sub.add_argument("topics", nargs="+", metavar="TOPIC",
                     help="a topic, or a pattern: a segment * matches any one segment, a last > one or "
                          "more (sensors.*.temp, 'sensors.>': quote it for the shell)")
    sub.add_argument("--from", dest="start", type=_start, default=(Start.DEFAULT, 0),
                     help="latest, earliest, default (after the client's commit, else the oldest "
                          "retained; the default) or offset:N; with --group, where a new group begins "
                          "(default: the oldest retained)")
    sub.add_argument("--commit", action="store_true", help="commit each message once printed")
    sub.add_argument("--count", type=int, default=0, help="exit after this many messages")
    sub.add_argument("--max-inflight", type=int, default=0,
                     help="messages sent and not committed at most (per topic, for a pattern; with "
                          "--group: not acknowledged); 0: no limit (with --group: 1000)")
    group = sub.add_argument_group("consumer groups (work queues)")
    group.add_argument("--group", metavar="NAME",
                       help="join consumer group NAME of each TOPIC (which must retain messages): each "
                            "message goes to one member of the group; each is acknowledged once printed")
    group.add_argument("--no-ack", action="store_true",
                       help="with --group: do not acknowledge (what is printed is sent again, to any "
                            "member, after --ack-timeout)")
    group.add_argument("--ack-timeout", type=_duration, default=0, metavar="DURATION",
                       help="with --group: a message not acknowledged within this is sent again, to any "
                            "member (e.g. 30s, 500ms; default: the broker's, 30s)")
    sub.add_argument("--format", choices=("text", "json", "raw"), default="text",
                     help="text: TOPIC OFFSET [KEY] VALUE; json: one object a line; raw: the value's "
                          "bytes alone, then a newline")

    topics = command("topics", help="list topics (and, with --metrics, consumer groups and their lag)")
    topics.add_argument("--metrics", metavar="[HOST:]PORT|URL",
                        help="the broker's --metrics-port: also list its consumer groups (members, "
                             "outstanding, lag, redeliveries), which the protocol's TOPICS reply does not carry")

    token = commands.add_parser("hash-token",
                                help="make a token for a credential: the token on stderr, the line "
                                     "for the --auth file on stdout")
    token.add_argument("name")
    token.add_argument("permissions", nargs="*", metavar="PERMISSION=PATTERNS",
                       help="e.g. publish=sensors/* subscribe=sensors/#,alerts create=# client_id=worker-*")

    create = command("create", help="create a topic")
    create.add_argument("topic")
    create.add_argument("--retention", type=_duration, default=0, help="e.g. 60s (default 0)")
    create.add_argument("--compaction-window", type=_duration, default=0, help="e.g. 10s (default 0)")

    check = commands.add_parser(
        "check", help="report damage in a data dir without starting a broker (exit 1 if any)",
        description="Report damage in a broker's data dir: per topic and segment, the messages, offsets\n"
                    "and bytes; damaged byte ranges and the offsets they cost, torn tails, segments of\n"
                    "release 0.1.0; bad lines in commits.log.",
        epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("data_dir", metavar="DATA_DIR", help="the broker's --data-dir")
    shown = check.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    shown.add_argument("--quiet", "-q", action="store_true", help="print only damage and the summary line")
    check.add_argument("--progress", action="store_true",
                       help="show a progress bar on stderr (the default when stderr is a terminal)")
    return top


def _check(args, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """C{zaichik check DATA_DIR}: the exit status."""
    from zaichik.storage import check

    bar = check.ProgressBar(err) if args.progress or err.isatty() else None
    try:
        report = check.check(args.data_dir, progress=bar)
    except check.NotADataDir as e:
        err.write(f"zaichik: {e}\n")
        return EXIT_USAGE
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        out.write(check.render_text(report, quiet=args.quiet))
    out.flush()
    return report.exit_code


def _hash_token(args, out: TextIO) -> None:
    from zaichik.auth import new_token

    if ":" in args.name or not args.name:
        raise CommandError("a credential name is not empty and has no ':'", EXIT_USAGE)
    token, stored = new_token(args.name)
    # The token for the client on stderr; the credentials-file line on
    # stdout, so that '>> credentials' stores only the hash.
    sys.stderr.write(f"token: {token}\n")
    out.write(" ".join([args.name, stored, *args.permissions]) + "\n")


# --- talking to the broker ------------------------------------------------------------


def _lines(stream) -> Iterator[bytes]:
    """Lines of a binary stream as each arrives, without C{\\n} or C{\\r\\n}."""
    readline = stream.readline
    while True:
        line = readline()
        if not line:
            return
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        yield line


class _Output:
    """Standard output as bytes; a closed pipe becomes L{_StdoutClosed}."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except (BrokenPipeError, ValueError):
            raise _StdoutClosed() from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            raise _StdoutClosed() from None


def _pub(client, args, out: _Output, stdin) -> None:
    if args.key and args.key_from:
        raise CommandError("--key and --key-from exclude each other", EXIT_USAGE)
    lines: Iterable[bytes] = ([os.fsencode(m) for m in args.messages] if args.messages
                              else _lines(stdin))
    failures: List[BaseException] = []
    client.on_error = failures.append   # called on the client's thread: a list append is safe
    fixed_key = os.fsencode(args.key) if args.key else None
    for number, line in enumerate(lines, 1):
        key = fixed_key if args.key_from is None else _key_of(line, args.key_from, number)
        if args.ack:
            result = client.publish(args.topic, line, key=key)
            out.write(b"%d%s\n" % (result.offset, b" duplicate" if result.duplicate else b""))
            out.flush()
        else:
            client.publish_nowait(args.topic, line, key=key)
        if failures:
            break  # a fire-and-forget publish failed: the next would too
    client.ping()  # every fire-and-forget error arrives before this answer
    if failures:
        raise failures[0]


def _text(value: Optional[bytes]) -> str:
    return "" if value is None else value.decode("utf-8", "backslashreplace")


def _format(message, style: str) -> bytes:
    if style == "raw":
        return message.value + b"\n"
    if style == "json":
        return (json.dumps({"topic": message.topic, "offset": message.offset,
                            "timestamp": message.timestamp,
                            "key": None if message.key is None else _text(message.key),
                            "value": _text(message.value)}) + "\n").encode()
    key = f" [{_text(message.key)}]" if message.key is not None else ""
    return f"{message.topic} {message.offset}{key} {_text(message.value)}\n".encode("utf-8", "backslashreplace")


def _sub(client, args, out: _Output) -> None:
    import queue
    import threading

    start, offset = args.start
    # One thread per subscription forwards its messages to the main thread
    # through a bounded queue: a slow stdout slows reading from the broker.
    inbox: "queue.Queue" = queue.Queue(maxsize=1000)
    END = object()

    def forward(subscription) -> None:
        try:
            for message in subscription:
                inbox.put(message)
            inbox.put((END, None))
        except BaseException as e:
            inbox.put((END, e))

    grouped = args.group is not None
    subscriptions = []
    for topic in args.topics:
        if grouped:
            subscriptions.append(client.subscribe_group(topic, args.group, start=start, offset=offset,
                                                        max_inflight=args.max_inflight,
                                                        ack_timeout=args.ack_timeout))
        else:
            subscriptions.append(client.subscribe(topic, start=start, offset=offset,
                                                  max_inflight=args.max_inflight))
    for subscription in subscriptions:
        threading.Thread(target=forward, args=(subscription,), daemon=True,
                         name=f"zaichik-sub-{subscription.topic}").start()

    printed = 0
    ended = 0
    uncommitted = {}
    unacked: List[Tuple[str, int]] = []
    ack = grouped and not args.no_ack
    while True:
        item = inbox.get()
        if type(item) is tuple and item[0] is END:
            if item[1] is not None:
                raise item[1]
            ended += 1
            if ended == len(subscriptions):
                reason = client.close_reason
                if reason is not None:
                    raise reason
                return
            continue
        out.write(_format(item, args.format))
        printed += 1
        if ack:
            unacked.append((item.topic, item.offset))
        else:
            uncommitted[item.topic] = item.offset
        done = bool(args.count) and printed >= args.count
        if done or inbox.empty():
            out.flush()
            # Printed (and flushed) before committed or acknowledged: at least once.
            if args.commit:
                for topic, last in uncommitted.items():
                    client.commit(topic, last)
            uncommitted.clear()
            for topic, offset in unacked:
                # One by one: a group's messages need not come in order of
                # offset (one sent again comes after later ones), so a
                # COMMIT of the highest could acknowledge one not printed.
                client.ack(topic, offset)
            unacked.clear()
        if done:
            return


def _topics(client, out: _Output) -> None:
    rows = [("topic", "retention", "compaction", "next offset", "retained", "subscribers")]
    for t in client.list_topics():
        rows.append((t.name, units.format_duration(t.retention_ttl), units.format_duration(t.compaction_window),
                     str(t.next_offset), str(t.retained), str(t.subscribers)))
    _table(rows, out)


def _table(rows: list, out: _Output) -> None:
    """Columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write(("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip() + "\n").encode())
    out.flush()


def _groups(where: str, timeout: Optional[float], out: _Output) -> None:
    """The consumer groups, from the broker's metrics endpoint (TOPICS carries none)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = where if "://" in where else f"http://{where if ':' in where else 'localhost:' + where}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout or 10) as answer:
            text = answer.read().decode("utf-8")
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot read the metrics at {url}: {getattr(e, 'reason', None) or e}",
                           EXIT_CONNECTION) from None
    columns = {"zaichik_group_members": 2, "zaichik_group_outstanding": 3, "zaichik_group_lag": 4,
               "zaichik_group_redeliveries_total": 5}
    groups: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            column = columns.get(sample.name)
            if column is not None:
                key = (sample.labels["topic"], sample.labels["group"])
                groups.setdefault(key, ["0"] * 6)[column] = str(int(sample.value))
    rows = [("topic", "group", "members", "outstanding", "lag", "redeliveries")]
    for (topic, group), row in sorted(groups.items()):
        row[0], row[1] = topic, group
        rows.append(tuple(row))
    out.write(b"\n")
    _table(rows, out)


def _connect(args):
    from zaichik.client.aio import describe_connect_error
    from zaichik.sync import ConnectionLostError, ConnectTimeout, ZaichikError, connect

    if args.ca:
        try:
            open(args.ca, "rb").close()
        except OSError as e:
            raise CommandError(f"cannot read --ca {args.ca}: {e.strerror or e}", EXIT_USAGE) from None

    try:
        return connect(args.server, client_id=args.client_id, token=args.token, tls=args.tls, ca=args.ca,
                       connect_timeout=args.timeout, request_timeout=args.timeout)
    except ZaichikError:
        raise
    except (ConnectionLostError, ConnectTimeout) as e:
        cause = e.__cause__
        why = describe_connect_error(cause) if cause is not None else str(e)
        raise CommandError(f"cannot connect to {args.server}: {why}", EXIT_CONNECTION) from None
    except OSError as e:
        # The --ca file, for one.
        raise CommandError(f"cannot connect to {args.server}: {describe_connect_error(e)}"
                           + (f": {e.filename}" if getattr(e, "filename", None) else ""),
                           EXIT_CONNECTION) from None
    except ValueError as e:
        raise CommandError(f"bad --server {args.server!r}: {e}", EXIT_USAGE) from None


def _check_sub_options(args) -> None:
    if args.group is None:
        for given, option in ((args.no_ack, "--no-ack"), (args.ack_timeout, "--ack-timeout")):
            if given:
                raise CommandError(f"{option} is for a group member: give --group NAME", EXIT_USAGE)
    elif args.commit:
        raise CommandError("a group member acknowledges each message once printed: --commit is for a "
                           "plain subscription (--no-ack not to acknowledge)", EXIT_USAGE)


def run(args, out: _Output, stdin) -> None:
    """Carry out a broker command; raises what ends it badly."""
    if args.command == "sub":
        _check_sub_options(args)
    client = _connect(args)
    try:
        if args.command == "pub":
            _pub(client, args, out, stdin)
        elif args.command == "sub":
            _sub(client, args, out)
        elif args.command == "topics":
            _topics(client, out)
            if args.metrics:
                _groups(args.metrics, args.timeout, out)
        elif args.command == "create":
            client.create_topic(args.topic, args.retention, args.compaction_window)
    except KeyboardInterrupt:
        # What pub already read goes out (briefly waited for); then 130.
        signal.signal(signal.SIGINT, lambda *_: _quit(EXIT_INTERRUPTED))
        if args.command == "pub":
            client.flush(timeout=1.0)
        raise
    except _StdoutClosed:
        raise
    except BaseException:
        _close_quietly(client)
        raise
    _close_quietly(client)


def _close_quietly(client) -> None:
    if not client.is_closed:
        try:
            client.close()
        except Exception:
            pass


def _error_status(error: BaseException, args) -> Tuple[str, int]:
    """The one line and exit status for an error that ended a command."""
    from zaichik.sync import ConnectionLostError, RequestTimeout, ZaichikError

    if isinstance(error, CommandError):
        return str(error), error.code
    if isinstance(error, ZaichikError):
        return str(error), EXIT_BROKER_ERROR
    if isinstance(error, RequestTimeout):
        return f"{args.server} did not answer within {args.timeout:g} s", EXIT_CONNECTION
    if isinstance(error, ConnectionLostError):
        return f"connection to {args.server} lost: {error}", EXIT_CONNECTION
    if isinstance(error, TimeoutError):
        return f"{args.server}: {error}", EXIT_CONNECTION
    if isinstance(error, ValueError):
        return str(error), EXIT_USAGE
    raise error


def _quit(status: int) -> None:
    """Exit now, without flushing anything more to a closed or unwanted stdout."""
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(status)


def main(argv: Optional[List[str]] = None) -> None:
    try:
        status = _main(argv)
    except KeyboardInterrupt:
        _quit(EXIT_INTERRUPTED)
    except _StdoutClosed:
        _quit(EXIT_PIPE)
    raise SystemExit(status)


def _main(argv: Optional[List[str]]) -> int:
    top = parser()
    args, extra = top.parse_known_args(argv)
    if extra:
        # `pub T --ack m1 m2`: argparse leaves positionals that follow an
        # option unparsed; they are more messages (or topics).
        if args.command in ("pub", "sub") and not any(e.startswith("-") for e in extra):
            (args.messages if args.command == "pub" else args.topics).extend(extra)
        else:
            top.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "check":
        return _check(args)
    if args.command == "hash-token":
        try:
            _hash_token(args, sys.stdout)
        except CommandError as e:
            sys.stderr.write(f"zaichik: {e}\n")
            return e.code
        return EXIT_OK
    out = _Output(sys.stdout.buffer)
    status = EXIT_OK
    try:
        run(args, out, sys.stdin.buffer)
        out.flush()
    except (KeyboardInterrupt, _StdoutClosed):
        raise
    except Exception as e:
        line, status = _error_status(e, args)
        sys.stderr.write(f"zaichik: {line}\n")
    out.flush()
    return status


if __name__ == "__main__":
    main()
