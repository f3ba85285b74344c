"""
The C{zaichik} command: publish, subscribe and look at topics from a shell.

    zaichik pub greetings hello world          # two messages
    seq 10 | zaichik pub numbers --ack         # one message per line, print offsets
    zaichik sub greetings --from earliest --count 2
    zaichik topics
    zaichik create orders --retention 60s --compaction-window 10s
    zaichik check /var/lib/zaichik             # damage in a data dir (no broker needed)

C{--server} (or C{ZAICHIK_SERVER}) takes C{host:port}, a port, or a Twisted
client endpoint description.  Errors are one line on stderr and a non-zero
exit: 1 for an error the broker answered, 2 for usage, 3 for a connection
that could not be made or was lost.  C{check} exits 1 when it finds damage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.task import react

from zaichik import units
from zaichik.client import Start, ZaichikError, connect

EXIT_BROKER_ERROR = 1
EXIT_DAMAGE = 1  # check
EXIT_USAGE = 2
EXIT_CONNECTION = 3

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


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _duration(text: str) -> int:
    try:
        return units.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _start(text: str):
    """C{latest}, C{earliest}, C{default} or C{offset:N}."""
    if text in ("latest", "earliest", "default"):
        return Start[text.upper()], 0
    if text.startswith("offset:") and text[7:].isdigit():
        return Start.OFFSET, int(text[7:])
    raise argparse.ArgumentTypeError(f"--from takes latest, earliest, default or offset:N, not {text!r}")


def _key_of(line: str, key_from: Optional[str]) -> Optional[bytes]:
    """
    The key for one input line: C{--key-from N} takes the N-th
    whitespace-separated field (from 1), C{--key-from json:NAME} a field of
    a JSON object.
    """
    if key_from is None:
        return None
    if key_from.startswith("json:"):
        try:
            value = json.loads(line)[key_from[5:]]
        except (ValueError, KeyError, TypeError):
            raise CommandError(f"no JSON field {key_from[5:]!r} in line: {line!r}", EXIT_USAGE) from None
        return str(value).encode()
    if not key_from.isdigit() or key_from == "0":
        raise CommandError(f"--key-from takes a field number from 1, or json:NAME, not {key_from!r}",
                           EXIT_USAGE)
    fields = line.split()
    index = int(key_from) - 1
    if not 0 <= index < len(fields):
        raise CommandError(f"line has no field {key_from}: {line!r}", EXIT_USAGE)
    return fields[index].encode()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="zaichik", description="Talk to a zaichik broker.")
    top.add_argument("--server", default=os.environ.get("ZAICHIK_SERVER", "localhost:8889"),
                     help="host:port, port, or endpoint description (default: %(default)s)")
    top.add_argument("--client-id", default="", help="durable client id (HELLO)")
    top.add_argument("--token", default=os.environ.get("ZAICHIK_TOKEN", ""),
                     help="authentication token NAME:SECRET (HELLO; or ZAICHIK_TOKEN)")
    top.add_argument("--tls", action="store_true", help="connect over TLS")
    top.add_argument("--ca", help="PEM file of the CA that signed the broker's certificate (implies --tls)")
    commands = top.add_subparsers(dest="command", required=True)

    pub = commands.add_parser("pub", help="publish messages (arguments, or one per line from stdin)")
    pub.add_argument("topic")
    pub.add_argument("messages", nargs="*")
    pub.add_argument("--key", help="the key of every message")
    pub.add_argument("--key-from", metavar="N|json:NAME",
                     help="key each line by its N-th field, or by a field of a JSON line")
    pub.add_argument("--ack", action="store_true", help="wait for each PUBLISHED; print offsets")

    sub = commands.add_parser("sub", help="print messages as they arrive")
    sub.add_argument("topics", nargs="+")
    sub.add_argument("--from", dest="start", type=_start, default=(Start.DEFAULT, 0),
                     help="latest, earliest, default (after the client's commit, else the oldest "
                          "retained; the default) or offset:N")
    sub.add_argument("--commit", action="store_true", help="commit each message once printed")
    sub.add_argument("--count", type=int, default=0, help="exit after this many messages")
    sub.add_argument("--max-inflight", type=int, default=0)
    sub.add_argument("--format", choices=("text", "json"), default="text")

    commands.add_parser("topics", help="list topics")

    token = commands.add_parser("hash-token",
                                help="make a token for a credential: the token on stderr, the line "
                                     "for the --auth file on stdout")
    token.add_argument("name")
    token.add_argument("permissions", nargs="*", metavar="PERMISSION=PATTERNS",
                       help="e.g. publish=sensors/* subscribe=sensors/#,alerts create=# client_id=worker-*")

    create = commands.add_parser("create", help="create a topic")
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


async def _pub(client, args, out: TextIO, stdin: TextIO) -> None:
    if args.key and args.key_from:
        raise CommandError("--key and --key-from exclude each other", EXIT_USAGE)
    lines: Sequence[str] = args.messages if args.messages else (line.rstrip("\n") for line in stdin)
    failures: List[ZaichikError] = []
    client.on_error = failures.append
    fixed_key = args.key.encode() if args.key else None
    for line in lines:
        key = fixed_key if args.key_from is None else _key_of(line, args.key_from)
        if args.ack:
            result = await client.publish(args.topic, line.encode(), key=key)
            note = " duplicate" if result.duplicate else ""
            out.write(f"{result.offset}{note}\n")
        else:
            client.publish_nowait(args.topic, line.encode(), key=key)
    await client.ping()  # every fire-and-forget error arrives before this answer
    if failures:
        raise failures[0]


def _text(value: Optional[bytes]) -> str:
    return "" if value is None else value.decode("utf-8", "backslashreplace")


async def _sub(client, args, out: TextIO) -> None:
    start, offset = args.start
    received = []
    done = client.closed
    finished: Deferred = Deferred()

    def show(message) -> None:
        if finished.called:
            return
        if args.format == "json":
            out.write(json.dumps({"topic": message.topic, "offset": message.offset,
                                  "timestamp": message.timestamp,
                                  "key": None if message.key is None else _text(message.key),
                                  "value": _text(message.value)}) + "\n")
        else:
            key = f" [{_text(message.key)}]" if message.key is not None else ""
            out.write(f"{message.topic} {message.offset}{key} {_text(message.value)}\n")
        out.flush()
        received.append(message)
        if args.commit:
            client.commit(message.topic, message.offset).addErrback(finished.errback)
        if args.count and len(received) >= args.count and not finished.called:
            finished.callback(None)

    def lost(_):
        if not finished.called:
            finished.errback(ConnectionLost("the broker closed the connection"))

    done.addBoth(lost)
    for topic in args.topics:
        await client.subscribe(topic, callback=show, start=start, offset=offset,
                               max_inflight=args.max_inflight)
    await finished


async def _topics(client, out: TextIO) -> None:
    rows = [("topic", "retention", "compaction", "next offset", "retained", "subscribers")]
    for t in await client.list_topics():
        rows.append((t.name, units.format_duration(t.retention_ttl), units.format_duration(t.compaction_window),
                     str(t.next_offset), str(t.retained), str(t.subscribers)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                            for i, (cell, w) in enumerate(zip(row, widths))).rstrip() + "\n")


def _hash_token(args, out: TextIO) -> None:
    from zaichik.auth import new_token

    if ":" in args.name or not args.name:
        raise CommandError("a credential name is not empty and has no ':'", EXIT_USAGE)
    token, stored = new_token(args.name)
    # The token for the client on stderr; the credentials-file line on
    # stdout, so that '>> credentials' stores only the hash.
    sys.stderr.write(f"token: {token}\n")
    out.write(" ".join([args.name, stored, *args.permissions]) + "\n")


async def run(reactor, args, out: TextIO = sys.stdout, stdin: TextIO = sys.stdin) -> None:
    if args.command == "hash-token":
        _hash_token(args, out)
        return
    try:
        client = await connect(reactor, args.server, client_id=args.client_id, token=args.token,
                               tls=args.tls, ca=args.ca)
    except (ConnectError, OSError) as e:
        raise CommandError(f"cannot connect to {args.server}: {e}", EXIT_CONNECTION) from None
    try:
        if args.command == "pub":
            await _pub(client, args, out, stdin)
        elif args.command == "sub":
            await _sub(client, args, out)
        elif args.command == "topics":
            await _topics(client, out)
        elif args.command == "create":
            await client.create_topic(args.topic, args.retention, args.compaction_window)
    finally:
        if not client.closed.called:
            try:
                await client.close()
            except (ConnectionDone, ConnectionLost, ZaichikError):
                pass


def main(argv: Optional[List[str]] = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "check":
        raise SystemExit(_check(args))  # no reactor, no broker
    status = []

    async def _main(reactor):
        try:
            await run(reactor, args)
        except CommandError as e:
            sys.stderr.write(f"zaichik: {e}\n")
            status.append(e.code)
        except ZaichikError as e:
            sys.stderr.write(f"zaichik: {e}\n")
            status.append(EXIT_BROKER_ERROR)
        except (ConnectionDone, ConnectionLost) as e:
            sys.stderr.write(f"zaichik: connection to {args.server} lost: {e}\n")
            status.append(EXIT_CONNECTION)

    try:
        react(_main)
    except SystemExit as e:
        if status:
            raise SystemExit(status[0]) from None
        raise SystemExit(e.code) from None


if __name__ == "__main__":
    main()
