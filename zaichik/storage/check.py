"""
C{zaichik check DATA_DIR}: find damage in a data directory without starting
a broker, and say what it costs (which offsets are lost).

Everything is read and nothing is written: files are opened read-only, the
lock is not taken, nothing is upgraded.  Each segment is read whole (one at
a time) and every batch's CRC checked, as the broker does for a segment it
has no index for; C{.idx} files are not trusted, only compared with what
the segment holds.  The layout is in L{zaichik.storage.disk}, the format in
L{zaichik.storage.segment}.

L{check} returns a L{Report}; L{render_text} and L{Report.to_json} show it.
A L{Finding} has a severity:

  - C{damage}: bytes that are not what the broker wrote (a flipped bit, a
    damaged header, a bad line in commits.log, an unreadable meta.json);
  - C{error}: the directory cannot be vouched for (a file that cannot be
    read, a data dir of a newer release);
  - C{warning}: what a crash leaves (a torn tail) or what the broker will
    change when it starts (a segment of release 0.1.0);
  - C{note}: informational (offsets skipped, a stale index).

In JSON a finding's C{at}/C{length} are a byte range of its file, and
C{offsets} is C{{"first", "last", "count"}} (first and last included).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from zaichik import codec, units
from zaichik.storage import segment as fmt

DAMAGE = "damage"
ERROR = "error"
WARNING = "warning"
NOTE = "note"

EXIT_OK = 0
EXIT_DAMAGE = 1
EXIT_USAGE = 2

READ_CHUNK = 4 * 1024 * 1024  # bytes read at a time (for the progress bar)

# Kinds of finding, as the summary counts them.
DAMAGED_RANGE_KINDS = frozenset({"damage", "bad-tail", "bad-last-batch", "header", "v1-damage", "short-segment",
                                 "empty-segment"})
TORN_KINDS = frozenset({"torn-tail", "old-torn-tail", "v1-torn", "short-newest"})

_SEGMENT_NAME = re.compile(r"^[0-9]{20}\.seg$")

Progress = Callable[[int, int], None]  # (bytes read, total bytes)


class NotADataDir(Exception):
    """The path given is not a data directory (a usage error)."""


@dataclass
class Finding:
    severity: str
    kind: str
    path: str  # relative to the data dir
    message: str
    at: Optional[int] = None  # bytes of the file concerned: from here ...
    length: Optional[int] = None  # ... this many
    offsets: Optional[Tuple[int, int]] = None  # offsets lost or concerned, first and last included

    @property
    def offset_count(self) -> int:
        return 0 if self.offsets is None else self.offsets[1] - self.offsets[0] + 1

    def to_json(self) -> dict:
        return {
            "severity": self.severity,
            "kind": self.kind,
            "path": self.path,
            "message": self.message,
            "at": self.at,
            "length": self.length,
            "offsets": None if self.offsets is None else {
                "first": self.offsets[0], "last": self.offsets[1], "count": self.offset_count},
        }


@dataclass
class SegmentReport:
    path: str  # relative to the data dir
    base: Optional[int]  # from the file name
    bytes: int
    format: Optional[int] = None  # 2, 1 (release 0.1.0's), None (not a segment)
    messages: int = 0
    first_offset: Optional[int] = None  # the first and last messages' offsets
    last_offset: Optional[int] = None
    end_offset: Optional[int] = None  # one past the newest offset used (messages and gap markers)
    reserved: int = 0  # the newest reservation in it (where a broker goes on after an unclean stop)
    not_kept: int = 0  # offsets that went to messages not kept (a topic that retains nothing)
    findings: List[Finding] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "path": self.path, "base": self.base, "bytes": self.bytes, "format": self.format,
            "messages": self.messages, "first_offset": self.first_offset, "last_offset": self.last_offset,
            "end_offset": self.end_offset, "not_kept": self.not_kept,
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass
class TopicReport:
    path: str  # relative to the data dir
    name: Optional[str]  # from meta.json (None if it cannot be read)
    settings: Optional[dict] = None  # meta.json
    segments: List[SegmentReport] = field(default_factory=list)
    findings: List[Finding] = field(default_factory=list)
    next_offset: Optional[int] = None  # the offset the broker gives next, once started

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.segments)

    def all_findings(self) -> Iterator[Finding]:
        yield from self.findings
        for s in self.segments:
            yield from s.findings

    def to_json(self) -> dict:
        return {
            "path": self.path, "name": self.name, "settings": self.settings, "messages": self.messages,
            "bytes": self.bytes, "next_offset": self.next_offset,
            "segments": [s.to_json() for s in self.segments],
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass
class Report:
    data_dir: str
    format: Optional[int] = None  # the FORMAT file's number (None: missing or not a number)
    topics: List[TopicReport] = field(default_factory=list)
    findings: List[Finding] = field(default_factory=list)  # the data dir's own (FORMAT, the lock, topics/)
    commit_lines: Optional[int] = None  # lines in commits.log (None: there is none)
    commit_findings: List[Finding] = field(default_factory=list)

    def all_findings(self) -> Iterator[Finding]:
        yield from self.findings
        for t in self.topics:
            yield from t.all_findings()
        yield from self.commit_findings

    @property
    def summary(self) -> Dict[str, int]:
        findings = list(self.all_findings())
        bad = [f for f in findings if f.severity in (DAMAGE, ERROR)]
        ranges = [f for f in bad if f.kind in DAMAGED_RANGE_KINDS]
        return {
            "topics": len(self.topics),
            "segments": sum(len(t.segments) for t in self.topics),
            "messages": sum(t.messages for t in self.topics),
            "bytes": sum(t.bytes for t in self.topics),
            "damaged_ranges": len(ranges),
            "offsets_lost": sum(f.offset_count for f in ranges),
            "torn_tails": sum(1 for f in findings if f.kind in TORN_KINDS),
            "other_problems": len(bad) - len(ranges),
            "warnings": sum(1 for f in findings if f.severity == WARNING),
        }

    @property
    def damaged(self) -> bool:
        return any(f.severity in (DAMAGE, ERROR) for f in self.all_findings())

    @property
    def exit_code(self) -> int:
        return EXIT_DAMAGE if self.damaged else EXIT_OK

    @property
    def status(self) -> str:
        if self.damaged:
            return "damaged"
        return "warnings" if any(f.severity == WARNING for f in self.all_findings()) else "ok"

    def to_json(self) -> dict:
        return {
            "data_dir": self.data_dir,
            "format": self.format,
            "status": self.status,
            "exit_code": self.exit_code,
            "summary": self.summary,
            "findings": [f.to_json() for f in self.findings],
            "topics": [t.to_json() for t in self.topics],
            "commits": {"path": "commits.log", "lines": self.commit_lines,
                        "findings": [f.to_json() for f in self.commit_findings]},
        }


# -- checking -----------------------------------------------------------------------------


def check(data_dir: str, progress: Optional[Progress] = None) -> Report:
    """
    Check the data directory C{data_dir}, reading every file and changing
    none.  C{progress(bytes read, total bytes)} is called as segments are
    read.

    @raise NotADataDir: C{data_dir} is not a directory, or has no C{topics/}.
    """
    if not os.path.isdir(data_dir):
        raise NotADataDir(f"{data_dir} is not a directory")
    root = os.path.join(data_dir, "topics")
    if not os.path.isdir(root):
        raise NotADataDir(f"{data_dir} is not a data directory (it has no topics/ folder)")
    report = Report(os.path.abspath(data_dir))
    if not _check_format(data_dir, report):
        return report  # a newer release's: its files cannot be judged by this one
    # Without FORMAT (a new data dir, or one of 0.1.0) the broker upgrades
    # every segment without the magic; with it, such a segment is damaged.
    upgrade = not os.path.exists(os.path.join(data_dir, "FORMAT"))
    _check_lock(data_dir, report)

    topic_dirs = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not os.path.isdir(path):
            report.findings.append(Finding(NOTE, "stray-file", _rel(data_dir, path),
                                           "not a topic directory: the broker ignores it"))
            continue
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            report.findings.append(Finding(ERROR, "unreadable", _rel(data_dir, path),
                                           f"cannot be listed: {e.strerror}"))
            continue
        topic_dirs.append((path, names))

    total = 0
    for path, names in topic_dirs:
        for name in names:
            if name.endswith(".seg"):
                try:
                    total += os.path.getsize(os.path.join(path, name))
                except OSError:
                    pass
    counter = _Counter(total, progress)
    counter.add(0)
    for path, names in topic_dirs:
        report.topics.append(_check_topic(data_dir, path, names, counter, upgrade))
    counter.done()

    seen: Dict[str, TopicReport] = {}
    for topic in report.topics:
        if topic.name is None:
            continue
        other = seen.get(topic.name)
        if other is not None:
            topic.findings.append(Finding(DAMAGE, "duplicate", topic.path,
                                          f"{other.path} holds topic {topic.name!r} too: the broker serves only "
                                          "one of them"))
        seen[topic.name] = topic
    _check_commits(data_dir, report)
    return report


class _Counter:
    def __init__(self, total: int, progress: Optional[Progress]) -> None:
        self.total = total
        self.read = 0
        self.progress = progress

    def add(self, n: int) -> None:
        self.read += n
        if self.progress is not None:
            self.progress(self.read, max(self.total, self.read))

    def done(self) -> None:
        if self.progress is not None:
            self.progress(max(self.total, self.read), max(self.total, self.read))


def _rel(data_dir: str, path: str) -> str:
    return os.path.relpath(path, data_dir)


def _check_format(data_dir: str, report: Report) -> bool:
    """The FORMAT file; False if the data dir is of a newer release (nothing else is checked)."""
    path = os.path.join(data_dir, "FORMAT")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        report.findings.append(Finding(NOTE, "format-missing", "FORMAT",
                                       "FORMAT is missing: a new data dir, or one of release 0.1.0 (when it "
                                       "starts, the broker upgrades the segments of 0.1.0, then writes FORMAT)"))
        return True
    except OSError as e:
        report.findings.append(Finding(ERROR, "unreadable", "FORMAT", f"cannot be read: {e.strerror}"))
        return True
    try:
        found = int(text.decode("ascii").strip() or 0)
    except ValueError:
        report.findings.append(Finding(DAMAGE, "format-invalid", "FORMAT",
                                       f"FORMAT holds {text[:40]!r}, not a format number: the broker refuses "
                                       "to start"))
        return True
    report.format = found
    if found > fmt.FORMAT:
        report.findings.append(Finding(ERROR, "format-newer", "FORMAT",
                                       f"the data dir is in format {found}, made by a newer release (this one "
                                       f"knows format {fmt.FORMAT}): check it with that release's zaichik; "
                                       "its files were not checked"))
        return False
    if found < fmt.FORMAT:
        report.findings.append(Finding(DAMAGE, "format-invalid", "FORMAT",
                                       f"FORMAT says {found}, which no release writes: the broker refuses to "
                                       "start"))
    return True


def _check_lock(data_dir: str, report: Report) -> None:
    """A broker holding the lock (seen in /proc/locks, without touching the lock)."""
    path = os.path.join(data_dir, "lock")
    pid = _lock_holder(path)
    if pid is not None:
        report.findings.append(Finding(WARNING, "in-use", "lock",
                                       f"a broker (pid {pid}) is using this data dir: its newest segments may "
                                       "change while they are read, and a tail being written looks torn"))


def _lock_holder(path: str) -> Optional[int]:
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.readlines()
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a request waiting for a lock
            continue
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == wanted:
            try:
                return int(parts[4])
            except ValueError:
                return None
    return None


# -- a topic ------------------------------------------------------------------------------


def _check_topic(data_dir: str, path: str, names: List[str], counter: _Counter, upgrade: bool) -> TopicReport:
    topic = TopicReport(_rel(data_dir, path), None)
    segments = [n for n in names if n.endswith(".seg")]
    _check_meta(data_dir, path, topic, bool(segments))
    prefix_len = len(codec.topic_prefix(topic.name)) if topic.name is not None else None

    for name in names:
        if name.endswith((".seg", ".idx")) or name == "meta.json":
            continue
        what = ("left by a crash while the broker wrote it; the broker ignores it"
                if name.endswith((".tmp", ".upgrade")) else "not a file the broker uses")
        topic.findings.append(Finding(NOTE, "stray-file", _rel(data_dir, os.path.join(path, name)), what))
    for name in names:
        if name.endswith(".idx") and name[:-4] + ".seg" not in names:
            topic.findings.append(Finding(NOTE, "index", _rel(data_dir, os.path.join(path, name)),
                                          "an index without its segment: the broker ignores it"))

    previous: Optional[SegmentReport] = None
    previous_bad_tail = False
    for i, name in enumerate(segments):
        newest = i == len(segments) - 1
        seg_path = os.path.join(path, name)
        if not _SEGMENT_NAME.match(name):
            report = SegmentReport(_rel(data_dir, seg_path), None, _size(seg_path))
            report.findings.append(Finding(DAMAGE, "segment-name", report.path,
                                           "not named by a base offset (20 digits): the broker fails to start "
                                           "on it"))
            counter.add(report.bytes)
            topic.segments.append(report)
            continue
        base = int(name[:-4])
        following = next((int(n[:-4]) for n in segments[i + 1 :] if _SEGMENT_NAME.match(n)), None)
        report = _check_segment(data_dir, seg_path, base, newest, following, prefix_len, counter, upgrade)
        topic.segments.append(report)
        if report.end_offset is None:
            continue
        if previous is not None and previous.end_offset is not None and not previous_bad_tail:
            if base > previous.end_offset:
                report.findings.insert(0, Finding(
                    NOTE, "gap", report.path,
                    f"offsets {previous.end_offset} to {base - 1} are skipped between the previous segment's end "
                    "and this one's base (never given; nothing lost)", offsets=(previous.end_offset, base - 1)))
            elif report.first_offset is not None and report.first_offset < previous.end_offset:
                report.findings.insert(0, Finding(
                    DAMAGE, "overlap", report.path,
                    f"its messages start at offset {report.first_offset}, below the previous segment's end "
                    f"({previous.end_offset}): offsets held twice"))
        previous = report
        previous_bad_tail = any(f.kind == "bad-tail" for f in report.findings)

    ends = [s.end_offset for s in topic.segments if s.end_offset is not None]
    for s in topic.segments:
        for f in s.findings:
            if f.kind in ("torn-tail", "bad-last-batch") and f.offsets is not None:
                ends.append(f.offsets[1] + 1)  # what the broker uses up when it starts
    if topic.segments:
        newest_segment = topic.segments[-1]
        clean = False
        try:
            with open(os.path.join(path, os.path.basename(newest_segment.path)[:-4] + ".idx"), "rb") as index:
                decoded = fmt.decode_index(index.read())
            clean = decoded is not None and decoded[0] == os.path.getsize(
                os.path.join(path, os.path.basename(newest_segment.path)))
        except OSError:
            pass
        if not clean:
            # Not closed cleanly: the broker goes on from the newest reservation.
            ends.append(newest_segment.reserved)
    topic.next_offset = max(ends + [0])
    return topic


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _check_meta(data_dir: str, path: str, topic: TopicReport, has_segments: bool) -> None:
    meta_path = os.path.join(path, "meta.json")
    rel = _rel(data_dir, meta_path)
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if has_segments:
            topic.findings.append(Finding(DAMAGE, "meta", rel, "meta.json is missing: the broker skips this topic "
                                          "(its messages are not served)"))
        else:
            topic.findings.append(Finding(NOTE, "meta", rel, "meta.json is missing and there are no segments: a "
                                          "topic whose creation a crash cut short; the broker skips it"))
        _name_from_dir(path, topic)
        return
    except OSError as e:
        topic.findings.append(Finding(ERROR, "meta", rel, f"meta.json cannot be read ({e.strerror}): the broker "
                                      "skips this topic"))
        _name_from_dir(path, topic)
        return
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError:
        topic.findings.append(Finding(DAMAGE, "meta", rel, f"meta.json is not valid JSON ({raw[:60]!r}): the "
                                      "broker skips this topic (its messages are not served)"))
        _name_from_dir(path, topic)
        return
    problems = []
    if not isinstance(meta, dict):
        problems.append("not a JSON object")
    else:
        if not isinstance(meta.get("name"), str):
            problems.append("no name")
        for key in ("retention_ttl", "compaction_window"):
            value = meta.get(key)
            if type(value) is not int or value < 0:
                problems.append(f"no valid {key}")
    if problems:
        topic.findings.append(Finding(DAMAGE, "meta", rel, f"meta.json has {', '.join(problems)}: the broker "
                                      "cannot start with it"))
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            topic.name = meta["name"]
        else:
            _name_from_dir(path, topic)
        return
    topic.name = meta["name"]
    topic.settings = meta
    if os.path.basename(path) != meta["name"].encode("utf-8").hex():
        topic.findings.append(Finding(WARNING, "meta", rel, f"the topic's name ({meta['name']!r}) is not the one "
                                      "its directory's name encodes"))


def _name_from_dir(path: str, topic: TopicReport) -> None:
    """Without meta.json, the name the directory's (hex) name encodes, if it does."""
    try:
        name = bytes.fromhex(os.path.basename(path)).decode("utf-8")
    except ValueError:
        return
    topic.findings.append(Finding(NOTE, "meta", topic.path, f"the directory's name says the topic is {name!r}"))


# -- a segment ------------------------------------------------------------------------------


def _read(path: str, counter: _Counter) -> bytearray:
    """A whole file, read-only, a chunk at a time (counting the bytes) into one buffer."""
    with open(path, "rb", buffering=0) as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        view = memoryview(data)
        at = 0
        while at < len(data):
            n = f.readinto(view[at : at + READ_CHUNK])
            if not n:  # shorter than it was a moment ago
                break
            at += n
            counter.add(n)
        view.release()
        del data[at:]
        while True:  # longer than it was (a broker writing to it)
            chunk = f.read(READ_CHUNK)
            if not chunk:
                return data
            data += chunk
            counter.add(len(chunk))


def _check_segment(data_dir: str, path: str, base: int, newest: bool, following: Optional[int],
                   prefix_len: Optional[int], counter: _Counter, upgrade: bool) -> SegmentReport:
    rel = _rel(data_dir, path)
    report = SegmentReport(rel, base, _size(path))
    add = report.findings.append
    try:
        data = _read(path, counter)
    except OSError as e:
        add(Finding(ERROR, "unreadable", rel, f"cannot be read: {e.strerror}"))
        return report
    report.bytes = len(data)
    if not data:
        report.end_offset = base
        if newest:
            add(Finding(NOTE, "empty-newest", rel, "empty: created just before a crash; the broker writes its "
                                                   "header when it starts"))
        else:
            add(Finding(DAMAGE, "empty-segment", rel, "empty (not even a header): the broker ignores it"))
        return report

    if upgrade and fmt.is_v1(bytes(data[:4])) and not _damaged_v2_header(data, base):
        _check_v1(data, report, newest, prefix_len)
        _check_index(path, data, None, report)
        return report
    if len(data) < fmt.SEGMENT_HEADER:
        if newest:
            add(Finding(WARNING, "short-newest", rel, f"only {len(data)} bytes, a header cut short (a crash while "
                        "the segment was created): the broker ignores it", at=0, length=len(data)))
        else:
            add(Finding(DAMAGE, "short-segment", rel, f"only {len(data)} bytes, too short to be a segment: the "
                        "broker ignores it", at=0, length=len(data)))
        return report

    report.format = fmt.FORMAT
    result = fmt.scan(data, base)
    _check_header(data, base, report, result, upgrade)

    # What each valid batch holds, and the offsets a damaged range costs.
    expected = base
    damage_before = {end: start for start, end in result.damage}
    for batch in result.batches:
        if batch.is_reservation:
            report.reserved = max(report.reserved, batch.first)
            continue
        start = damage_before.get(batch.pos)
        if start is not None:
            _damaged_range(report, data, start, batch, expected)
        elif batch.is_passed and not expected < report.reserved < batch.first:
            report.not_kept += batch.first - expected  # (not a finding: what the topic's settings ask)
        elif batch.is_passed:
            # After a stop that was not clean the topic went on from its reservation.
            add(Finding(NOTE, "skipped", rel, f"offsets {expected} to {report.reserved - 1} are not used (reserved "
                        "before a stop that was not clean; nothing lost)", at=batch.pos,
                        offsets=(expected, report.reserved - 1)))
            report.not_kept += batch.first - report.reserved
        elif batch.first > expected:
            what = "a gap marker uses them up" if not batch.count else "a write that failed, or a gap"
            add(Finding(NOTE, "skipped", rel, f"offsets {expected} to {batch.first - 1} are not used ({what}; "
                        "nothing lost)", at=batch.pos, offsets=(expected, batch.first - 1)))
        if batch.count:
            if report.first_offset is None:
                report.first_offset = batch.first
            report.messages += batch.count
            report.last_offset = batch.first + batch.count - 1
        expected = batch.first + batch.count
    report.end_offset = expected

    if result.torn is not None:
        _bad_tail(report, data, result.torn, expected, newest, following)
    _check_index(path, data, result, report)
    return report


def _damaged_v2_header(data, base: int) -> bool:
    """
    Does a segment whose first 4 bytes are not the magic hold format 2
    anyway (its header damaged), rather than release 0.1.0's records?
    """
    if len(data) >= fmt.SEGMENT_HEADER:
        _, version, flags, header_base = fmt.segment_header.unpack_from(data)
        if (version, flags, header_base) == (fmt.FORMAT, 0, base):
            return True
    frames, _ = fmt.v1_frames(bytes(data[:1 << 16]))
    if frames:
        return False
    return bool(fmt.scan(data, base).batches)


def _check_header(data, base: int, report: SegmentReport, result: fmt.Scan, upgrade: bool) -> None:
    magic, version, flags, header_base = fmt.segment_header.unpack_from(data)
    wrong = []
    if magic != fmt.SEGMENT_MAGIC:
        wrong.append(f"magic {bytes(magic)!r} (not {fmt.SEGMENT_MAGIC!r})")
    if version != fmt.FORMAT:
        wrong.append(f"format {version} (not {fmt.FORMAT})")
    if flags:
        wrong.append(f"flags {flags} (not 0)")
    if header_base != base:
        wrong.append(f"base offset {header_base} (the file name says {base})")
    if not wrong:
        return
    message = (f"damaged segment header: {', '.join(wrong)}; the batches after it are read anyway "
               f"({sum(b.count for b in result.batches)} messages)")
    if magic != fmt.SEGMENT_MAGIC and upgrade:
        # Without FORMAT, disk.DiskLog._upgrade_v1 runs before the header is looked at.
        message += (". In a data dir without FORMAT the broker takes a segment without its magic for one of "
                    "release 0.1.0, and the upgrade keeps none of these messages: restore the first 4 bytes "
                    "to 'ZKSG' before starting the broker")
    elif magic != fmt.SEGMENT_MAGIC and not result.batches and fmt.v1_frames(bytes(data[:1 << 16]))[0]:
        message += (". It looks like a segment of release 0.1.0, which is upgraded only in a data dir without "
                    "FORMAT")
    report.findings.append(Finding(DAMAGE, "header", report.path, message, at=0, length=fmt.SEGMENT_HEADER))


def _damaged_range(report: SegmentReport, data, start: int, after: fmt.Batch, expected: int) -> None:
    """Bytes C{start} to C{after.pos} hold no valid batch; C{after} is the next valid one."""
    length = after.pos - start
    lost = (expected, after.first - 1) if after.first > expected else None
    if not after.count and _looks_torn(data, start, after.pos, expected):
        # A torn tail the broker found at a start after a crash: the gap marker
        # it wrote after it used up its offsets.
        used = f"offsets {expected} to {after.first - 1} were used up then" if lost else "no offsets were used up"
        report.findings.append(Finding(
            WARNING, "old-torn-tail", report.path,
            f"{length} bytes at byte {start} are an old torn tail (a write a crash cut short), followed by the "
            f"gap marker the broker wrote when it next started: {used}; nothing more is lost",
            at=start, length=length, offsets=lost))
        return
    what = "no offsets are lost"
    if lost:
        what = f"offsets {expected} to {after.first - 1} are lost ({_plural(after.first - expected, 'offset')})"
    report.findings.append(Finding(
        DAMAGE, "damage", report.path,
        f"damaged: bytes {start} to {after.pos - 1} ({length} bytes) hold no valid batch; {what} (the broker "
        "skips them)", at=start, length=length, offsets=lost))


def _looks_torn(data, start: int, end: int, expected: int) -> bool:
    """Do bytes C{start} to C{end} look like a write cut short: not a whole batch by its own header?"""
    if end - start < fmt.BATCH_HEADER:
        return True
    magic, length, _, first, count, _, _ = fmt.batch_header.unpack_from(data, start)
    if magic != fmt.BATCH_MAGIC:
        return False
    return start + fmt.CRC_FROM + length > end and first >= expected


def _torn_use_up(data, torn: int, end: int) -> int:
    """
    The offset from which the broker gives new ones after finding a torn
    tail at byte C{torn} (the segment's batches ending at offset C{end}).
    The same reckoning as L{zaichik.storage.disk.DiskLog._torn_tail}.
    """
    lost = len(data) - torn
    header = bytes(data[torn : torn + fmt.BATCH_HEADER])
    most = lost // fmt.MIN_RECORD + 1
    if len(header) == fmt.BATCH_HEADER and header[:4] == fmt.BATCH_MAGIC:
        claimed = fmt.batch_header.unpack(header)
        if claimed[3] >= end and claimed[4] <= most:
            most = max(most, claimed[3] + claimed[4] - end)
    return end + most


def _whole_batch_bad_crc(data, at: int, expected: int) -> Optional[Tuple[int, int]]:
    """
    C{(first, count)} if the bytes from C{at} to the end are one whole
    batch by its header (magic, length to the last byte, offsets, count) whose
    CRC does not match: damage, not a write cut short.
    """
    if len(data) - at < fmt.BATCH_HEADER:
        return None
    magic, length, _, first, count, _, _ = fmt.batch_header.unpack_from(data, at)
    if (magic != fmt.BATCH_MAGIC or at + fmt.CRC_FROM + length != len(data) or first < expected
            or length < fmt.BATCH_HEADER - fmt.CRC_FROM
            or count * fmt.MIN_RECORD > length - (fmt.BATCH_HEADER - fmt.CRC_FROM)):
        return None
    return first, count


def _bad_tail(report: SegmentReport, data, torn: int, end: int, newest: bool, following: Optional[int]) -> None:
    """Bytes from C{torn} to the end hold no valid batch."""
    length = len(data) - torn
    add = report.findings.append
    if newest:
        skip_to = _torn_use_up(data, torn, end)
        whole = _whole_batch_bad_crc(data, torn, end)
        if whole is not None:
            first, count = whole
            add(Finding(
                DAMAGE, "bad-last-batch", report.path,
                f"the last batch (bytes {torn} to {len(data) - 1}, {length} bytes; by its header offsets {first} "
                f"to {first + count - 1}) is whole but its CRC does not match: damage, not a write cut short. "
                f"The broker will take it for a torn tail and use up offsets {end} to {skip_to - 1}",
                at=torn, length=length, offsets=(end, skip_to - 1)))
            return
        add(Finding(
            WARNING, "torn-tail", report.path,
            f"torn tail: the last {length} bytes (from byte {torn}) are not a whole batch, which is what a crash "
            f"leaves (a write cut short). The broker keeps them and, when it starts, uses up offsets {end} to "
            f"{skip_to - 1} so that none is given twice",
            at=torn, length=length, offsets=(end, skip_to - 1)))
        return
    if following is not None and following > end:
        lost: Optional[Tuple[int, int]] = (end, following - 1)
        what = f"offsets {end} to {following - 1} are lost (up to the next segment's base, {following})"
    else:
        lost = None
        what = "no offsets are lost (the next segment starts at its end)"
    add(Finding(
        DAMAGE, "bad-tail", report.path,
        f"damaged end: bytes {torn} to {len(data) - 1} ({length} bytes, to the end of the segment) hold no valid "
        f"batch; {what}", at=torn, length=length, offsets=lost))


def _check_v1(data, report: SegmentReport, newest: bool, prefix_len: Optional[int]) -> None:
    """A segment of release 0.1.0: C{u32 length, u32 crc32, frame} records."""
    report.format = 1
    frames, valid = fmt.v1_frames(data)
    offsets = []
    for frame in frames:
        offset = _v1_offset(frame, prefix_len)
        if offset is not None:
            offsets.append(offset)
    report.messages = len(frames)
    if offsets:
        report.first_offset, report.last_offset = offsets[0], offsets[-1]
        report.end_offset = max(offsets) + 1
    else:
        report.end_offset = report.base
    add = report.findings.append
    add(Finding(WARNING, "v1", report.path,
                f"in release 0.1.0's format ({len(frames)} messages): will be upgraded when the broker starts"))
    if valid < len(data):
        length = len(data) - valid
        if newest:
            add(Finding(WARNING, "v1-torn", report.path,
                        f"the last {length} bytes (from byte {valid}) are not a valid 0.1.0 record, which is "
                        "what a crash leaves (a write cut short): the upgrade drops them",
                        at=valid, length=length))
        else:
            add(Finding(DAMAGE, "v1-damage", report.path,
                        f"bytes {valid} to {len(data) - 1} ({length} bytes) are not valid 0.1.0 records: the "
                        "upgrade drops them, and any message after them in this segment",
                        at=valid, length=length))


def _v1_offset(frame: bytes, prefix_len: Optional[int]) -> Optional[int]:
    """The offset of a 0.1.0 record's MESSAGE frame (length prefix included)."""
    if prefix_len is None:
        # No meta.json: read the topic's length from the frame.
        if len(frame) < 7:
            return None
        prefix_len = 3 + fmt.u16.unpack_from(frame, 5)[0]
    at = 4 + prefix_len
    if len(frame) < at + 8:
        return None
    return fmt.u64.unpack_from(frame, at)[0]


def _check_index(path: str, data, result: Optional[fmt.Scan], report: SegmentReport) -> None:
    """An index is a cache the broker trusts when its size matches: say when it is wrong."""
    idx = path[:-4] + ".idx"
    rel = report.path[:-4] + ".idx"
    try:
        with open(idx, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return
    except OSError as e:
        report.findings.append(Finding(NOTE, "index", rel, f"cannot be read ({e.strerror}): the broker reads "
                                       "the segment instead"))
        return
    decoded = fmt.decode_index(raw)
    if decoded is None:
        report.findings.append(Finding(NOTE, "index", rel, "not a valid index (its checksum or layout is wrong): "
                                       "the broker ignores it and reads the segment"))
        return
    size, count, record_bytes, first, end, first_ts, last_ts, entries = decoded
    if size != len(data):
        report.findings.append(Finding(NOTE, "index", rel, f"stale: made for {size} bytes of segment, which has "
                                       f"{len(data)}: the broker ignores it and reads the segment"))
        return
    if result is None:
        report.findings.append(Finding(NOTE, "index", rel, "an index next to a segment of release 0.1.0: the "
                                       "upgrade makes it stale"))
        return
    summary, valid_entries, first_pos = _summary(result.batches, report.base)
    wrong = []
    if (count, record_bytes, first, end, first_ts, last_ts) != summary:
        wrong.append(f"it says {count} messages, offsets {first} to {end - 1}; the segment holds "
                     f"{summary[0]} valid ones")
    elif (any(tuple(e) not in valid_entries for e in entries)
          or (count and (not entries or entries[0][1] != first_pos))):
        wrong.append("its entries do not point at the segment's batches")
    if wrong:
        report.findings.append(Finding(NOTE, "index", rel,
                                       f"does not match the segment ({wrong[0]}); the broker trusts it (its size "
                                       "matches), so it finds any damage only when reading those batches"))


def _summary(batches: List[fmt.Batch], base: Optional[int]):
    """
    What the broker's index of these batches says: C{(count, record bytes,
    first, end, first timestamp, last timestamp)}, the entries it may hold,
    and where the first batch with messages starts (its first entry's).
    """
    count = record_bytes = first_ts = last_ts = 0
    first = first_pos = None
    end = base or 0
    entries = set()
    for batch in batches:
        if batch.is_reservation:
            continue
        if not batch.count:
            end = max(end, batch.first)
            if batch.is_passed:
                last_ts = batch.last_ts
            continue
        if first is None:
            first, first_ts, first_pos = batch.first, batch.first_ts, batch.pos
        entries.add((batch.first, batch.pos, batch.first_ts, count, record_bytes))
        count += batch.count
        record_bytes += batch.record_bytes
        end = batch.first + batch.count
        last_ts = batch.last_ts
    return (count, record_bytes, first, end, first_ts, last_ts), entries, first_pos


# -- commits.log --------------------------------------------------------------------------


def _check_commits(data_dir: str, report: Report) -> None:
    path = os.path.join(data_dir, "commits.log")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return
    except OSError as e:
        report.commit_findings.append(Finding(ERROR, "unreadable", "commits.log", f"cannot be read: {e.strerror}"))
        return
    lines = raw.split(b"\n")
    last_torn = lines[-1] != b""
    if not last_torn:
        lines.pop()
    report.commit_lines = len(lines)
    at = 0
    for number, line in enumerate(lines, 1):
        problem = _commit_problem(line)
        if problem is not None:
            torn = last_torn and number == len(lines)
            shown = line[:80] + (b"..." if len(line) > 80 else b"")
            if torn:
                report.commit_findings.append(Finding(
                    WARNING, "commits-torn", "commits.log",
                    f"line {number}, the last, is cut short ({shown!r}): what a crash leaves; the broker skips it",
                    at=at, length=len(line)))
            else:
                report.commit_findings.append(Finding(
                    DAMAGE, "commits", "commits.log",
                    f"line {number} is not a commit line ({problem}): {shown!r}",
                    at=at, length=len(line) + 1))
        at += len(line) + 1


def _commit_problem(line: bytes) -> Optional[str]:
    """
    What is wrong with a commits.log line, or None: the broker writes
    C{[client_id, topic, offset, ms]} (0.1.0 wrote C{[client_id, topic,
    offset]}), C{[client_id, null]} for a client it forgot, and
    C{["group", topic, group, offset, ms]} for a consumer group's position.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8; the broker skips it"
    try:
        value = json.loads(text)
    except ValueError:
        return "not JSON; the broker skips it"
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        return "not a list starting with a client_id; the broker skips it"
    if len(value) == 2 and value[1] is None:
        return None
    if len(value) in (3, 4):
        topic, offset = value[1], value[2]
        when_ok = len(value) == 3 or type(value[3]) is int
        if isinstance(topic, str) and type(offset) is int and offset >= 0 and when_ok:
            return None
        return "wrong types; the broker skips it"
    if len(value) == 5 and value[0] == "group":
        topic, group, offset, when = value[1:]
        if isinstance(topic, str) and isinstance(group, str) and type(offset) is int and offset >= 0 \
                and type(when) is int:
            return None
        return "wrong types in a group position; the broker skips it"
    return "not [client_id, topic, offset, ms]; the broker skips it"


# -- showing a report ------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """C{1536} -> C{'1.5 KiB'}."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


_LABELS = {DAMAGE: "DAMAGE", ERROR: "ERROR", WARNING: "warning", NOTE: "note"}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary_line(report: Report) -> str:
    s = report.summary
    parts = [_plural(s["topics"], "topic"), _plural(s["segments"], "segment"),
             f"{_plural(s['messages'], 'message')} ({human_bytes(s['bytes'])})",
             _plural(s["damaged_ranges"], "damaged range")
             + (f" ({_plural(s['offsets_lost'], 'offset')} lost)" if s["offsets_lost"] else ""),
             _plural(s["torn_tails"], "torn tail")]
    if s["other_problems"]:
        parts.append(_plural(s["other_problems"], "other problem"))
    verdict = {"damaged": "DAMAGED (exit 1)", "warnings": "no damage; warnings above (exit 0)",
               "ok": "no damage (exit 0)"}[report.status]
    return "summary: " + ", ".join(parts) + ": " + verdict


def render_text(report: Report, quiet: bool = False) -> str:
    """
    The report for people: each topic and segment with what was found.
    C{quiet}: only damage (and errors) and the summary line.
    """
    out: List[str] = []
    if quiet:
        for f in report.all_findings():
            if f.severity in (DAMAGE, ERROR):
                out.append(f"{_LABELS[f.severity]}: {f.path}: {f.message}")
        out.append(summary_line(report))
        return "\n".join(out) + "\n"

    def show(findings: List[Finding], indent: str, context: str) -> None:
        for f in findings:
            where = "" if f.path == context else f"{f.path}: "
            out.append(f"{indent}{_LABELS[f.severity]}: {where}{f.message}")

    format_name = "no FORMAT file" if report.format is None else f"format {report.format}"
    out.append(f"data dir {report.data_dir} ({format_name})")
    show(report.findings, "  ", "")
    for topic in report.topics:
        name = json.dumps(topic.name) if topic.name is not None else "(name unknown)"
        settings = ""
        if topic.settings is not None:
            settings = (f", retention {units.format_duration(topic.settings['retention_ttl'])}, compaction "
                        f"window {units.format_duration(topic.settings['compaction_window'])}")
        out.append(f"topic {name} ({topic.path}{settings}): {_plural(len(topic.segments), 'segment')}, "
                   f"{_plural(topic.messages, 'message')}, {human_bytes(topic.bytes)}, next offset "
                   f"{topic.next_offset}")
        show(topic.findings, "  ", topic.path)
        for s in topic.segments:
            kind = " (release 0.1.0's format)" if s.format == 1 else ""
            held = (f"{_plural(s.messages, 'message')}, offsets {s.first_offset}..{s.last_offset}"
                    if s.messages and s.first_offset is not None else _plural(s.messages, "message"))
            if s.not_kept:
                held += f" ({s.not_kept:,} more not kept: the topic retains nothing)"
            out.append(f"  {os.path.basename(s.path)}{kind}: {held}, {_plural(s.bytes, 'byte')}")
            show(s.findings, "    ", s.path)
    if report.commit_lines is not None:
        out.append(f"commits.log: {_plural(report.commit_lines, 'line')}")
    show(report.commit_findings, "  ", "commits.log")
    out.append(summary_line(report))
    return "\n".join(out) + "\n"


class ProgressBar:
    """
    C{"\\r[#####     ] 52% 1.4 GiB/2.7 GiB"} on C{stream}, redrawn at most
    every C{interval} seconds (and at 100%).  Call it as a L{Progress}.
    """

    def __init__(self, stream, width: int = 30, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.width = width
        self.interval = interval
        self.clock = clock
        self._last: Optional[float] = None
        self._shown = 0
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done < total and self._last is not None and now - self._last < self.interval:
            return
        if done >= total and self._finished:
            return
        self._last = now
        self._finished = done >= total
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        filled = int(fraction * self.width)
        line = (f"[{'#' * filled}{' ' * (self.width - filled)}] {int(fraction * 100):3d}% "
                f"{human_bytes(done)}/{human_bytes(total)}")
        pad = " " * max(self._shown - len(line), 0)
        self._shown = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self._last is not None:
            self.stream.write("\n")
            self.stream.flush()
