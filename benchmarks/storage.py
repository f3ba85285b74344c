"""
Storage figures for the "retained messages live on disk, not in RAM" work,
printed beside the issue's targets.  It measures; it never fails on speed.

1. Retention at scale: a broker with ``--data-dir --fsync never
   --default-retention 1d`` is loaded with N retained 100-byte messages in
   one topic (PUBLISH_BATCH of 1,000, several batches in flight); its RSS is
   read; it is stopped (SIGTERM) and started again on the same directory;
   then: the time from spawning the new process to a subscriber's first
   MESSAGE (SUBSCRIBE start=EARLIEST, connecting every few ms), the RSS while
   and after that subscriber reads all N back, and its rate.
2. Publish throughput, in memory against on disk, interleaved and repeated:
   fire-and-forget PUBLISH 1 -> 1 (retention 0, counted at the subscriber)
   in memory and with ``--fsync never``; acknowledged PUBLISH with 1,000 in
   flight in memory and with ``--fsync always``.

    python benchmarks/storage.py                        # 20,000,000 retained; 3 runs of 5 s
    python benchmarks/storage.py --quick                # CI: 200,000 retained, 1 run of 1 s
    python benchmarks/storage.py --messages 2000000 --part retention
    python benchmarks/storage.py --broker-args='--cache-size 33554432'

Brokers are real ``twistd -n zaichik`` processes on 127.0.0.1, started with
this interpreter; ``PYTHONPATH`` (if set) comes before this checkout, so
``PYTHONPATH=/other/checkout python benchmarks/storage.py`` measures other
code.  The clients are raw sockets with their own few lines of the wire
protocol (no zaichik import): they send pre-encoded frames and count frames
of a known size by bytes, checking the length, opcode, topic and offset of
one frame in every read, so a lost, repeated or foreign frame shows.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VALUE = bytes(range(100))  # every message's value: 100 bytes
DAY_MS = 86_400_000
BATCH = 1000  # messages per PUBLISH_BATCH while loading
ACK_WINDOW = 1000  # acknowledged publishes in flight
RECV_BUFFER = 4 << 20

TARGET_RSS_MB = 150
TARGET_FIRST_BYTE_S = 2.0
TARGET_SUBSCRIBER_RATE = 500_000
TARGET_NEVER_RATIO = 0.9
TARGET_ALWAYS_RATIO = 0.6

OP_CREATE_TOPIC, OP_SUBSCRIBE, OP_PUBLISH, OP_PING, OP_PUBLISH_BATCH = 0x02, 0x03, 0x05, 0x08, 0x0A
OP_OK, OP_ERROR, OP_MESSAGE, OP_PUBLISHED, OP_PUBLISHED_BATCH = 0x80, 0x81, 0x82, 0x83, 0x85
START_EARLIEST, START_LATEST = 3, 1
ERROR_NAMES = {1: "BAD_FRAME", 2: "UNKNOWN_OPCODE", 3: "FRAME_TOO_LARGE", 4: "BAD_TOPIC",
               5: "TOPIC_EXISTS", 6: "NOT_SUBSCRIBED", 7: "BAD_OFFSET", 8: "UNSUPPORTED_VERSION",
               9: "NOT_AUTHORIZED", 10: "ALREADY_SUBSCRIBED", 11: "LIMIT", 12: "PROTOCOL",
               13: "INTERNAL"}

_u32 = struct.Struct(">I")
_u64 = struct.Struct(">Q")


class BenchError(Exception):
    """Something went wrong that is not slowness: the run cannot go on."""


# --- the wire protocol: just the frames used here (protocol-v1.md) -------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def frame(body: bytes) -> bytes:
    return _u32.pack(len(body)) + body


def create_topic(rid: int, topic: str, retention_ttl: int, compaction_window: int = 0) -> bytes:
    return frame(struct.pack(">BI", OP_CREATE_TOPIC, rid) + _string(topic)
                 + struct.pack(">QQ", retention_ttl, compaction_window))


def subscribe(rid: int, topic: str, start: int, offset: int = 0, max_inflight: int = 0) -> bytes:
    return frame(struct.pack(">BI", OP_SUBSCRIBE, rid) + _string(topic)
                 + struct.pack(">BQI", start, offset, max_inflight))


def publish(rid: int, topic: str, value: bytes) -> bytes:
    return frame(struct.pack(">BI", OP_PUBLISH, rid) + _string(topic) + b"\0\0" + _u32.pack(len(value)) + value)


def publish_batch(rid: int, topic: str, values: List[bytes]) -> bytes:
    entries = b"".join(b"\0\0" + _u32.pack(len(v)) + v for v in values)
    return frame(struct.pack(">BI", OP_PUBLISH_BATCH, rid) + _string(topic) + _u32.pack(len(values)) + entries)


def ping(rid: int) -> bytes:
    return frame(struct.pack(">BI", OP_PING, rid))


def describe_reply(body: bytes) -> str:
    """A reply body in words (for what came instead of what was expected)."""
    if not body:
        return "an empty frame"
    op = body[0]
    if op == OP_ERROR and len(body) >= 9:
        rid, code, n = struct.unpack_from(">IHH", body, 1)
        message = body[9:9 + n].decode(errors="replace")
        return f"ERROR(rid {rid}, {ERROR_NAMES.get(code, code)}, {message!r})"
    if op == OP_OK and len(body) >= 5:
        return f"OK(rid {_u32.unpack_from(body, 1)[0]})"
    return f"a frame with opcode 0x{op:02x} ({len(body)} bytes)"


def message_layout(topic: str) -> Tuple[int, bytes]:
    """
    Size of a MESSAGE frame of C{topic} (no key, a 100-byte value) and its
    constant first bytes (length, opcode, topic); the offset follows them.
    """
    t = topic.encode()
    head = _u32.pack(1 + 2 + len(t) + 8 + 8 + 2 + 4 + len(VALUE)) + bytes([OP_MESSAGE]) + struct.pack(">H", len(t)) + t
    return _u32.unpack_from(head)[0] + 4, head


class FixedFrames:
    """
    Counts a stream of frames that are all C{size} bytes long and begin
    with C{head}, by bytes.  In every chunk it checks one whole frame (the
    first that starts in it) and it keeps the stream's last bytes to check
    the last frame at the end: each checked frame must start with C{head}
    and carry the u64 at C{seq_at} equal to C{first + index * step}.  A
    missing, repeated or foreign frame makes a later check fail.
    """

    def __init__(self, size: int, head: bytes, seq_at: Optional[int] = None, first: int = 0, step: int = 1):
        self.size, self.head, self.seq_at, self.first, self.step = size, head, seq_at, first, step
        self.check_len = max(len(head), (seq_at or 0) + 8 if seq_at is not None else 0)
        self.pos = 0  # bytes of the stream so far
        self.tail = b""  # its last 2 * size bytes
        self.error = ""
        self.checked = 0

    @property
    def count(self) -> int:
        return self.pos // self.size

    def _check(self, buf, at: int, index: int) -> bool:
        if bytes(buf[at:at + len(self.head)]) != self.head:
            found = bytes(buf[at:at + 4 + _u32.unpack_from(buf, at)[0]]) if len(buf) - at >= 4 else b""
            body = found[4:]
            got = describe_reply(body) if body else bytes(buf[at:at + 16]).hex()
            self.error = f"frame {index:,}: expected {self.size}-byte frames starting {self.head[:16].hex()}, got {got}"
            return False
        if self.seq_at is not None:
            got = _u64.unpack_from(buf, at + self.seq_at)[0]
            want = self.first + index * self.step
            if got != want:
                self.error = f"frame {index:,}: offset {got:,}, expected {want:,}"
                return False
        self.checked += 1
        return True

    def feed(self, buf, n: int) -> bool:
        """Account for C{buf[:n]}; False once the stream is not what was expected."""
        if self.error:
            return False
        size, p0 = self.size, self.pos
        self.pos = p0 + n
        k = (-p0) % size
        if k + self.check_len <= n and not self._check(buf, k, (p0 + k) // size):
            return False
        if n >= 2 * size:
            self.tail = bytes(buf[n - 2 * size:n])
        else:
            self.tail = (self.tail + bytes(buf[:n]))[-2 * size:]
        return True

    def check_last(self) -> bool:
        """Check the last whole frame received (when the stream ends on a frame boundary)."""
        if self.error or not self.count or self.pos % self.size or len(self.tail) < self.size:
            return not self.error
        return self._check(self.tail, len(self.tail) - self.size, self.count - 1)


# --- broker processes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), ROOT]))
    return env


def status_mb(pid: int, field: str) -> float:
    """A size from /proc/PID/status (VmRSS:, VmHWM:) in MB (2**20 bytes)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def dir_bytes(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(d, name))
            except OSError:
                pass
    return total


class Broker:
    """One C{twistd -n zaichik} process on 127.0.0.1 (this interpreter, no shell between)."""

    running: List["Broker"] = []

    def __init__(self, label: str, options: List[str], workdir: str) -> None:
        self.label = label
        self.options = options
        self.workdir = workdir
        self.port = 0
        self.process: Optional[subprocess.Popen] = None
        self.log_path = ""
        self.spawned_at = 0.0
        self.port_tries = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    # free_port() holds nothing: another listener, or a connection's local
    # end, may take the port before the broker binds it.  The broker then
    # exits saying so, and is spawned again on another port (see L{alive}).
    PORT_TRIES = 5

    def spawn(self) -> "Broker":
        """Start the process and return at once (see L{wait_ready})."""
        self.port_tries = 1
        return self._spawn()

    def _spawn(self) -> "Broker":
        self.port = free_port()
        fd, self.log_path = tempfile.mkstemp(prefix=f"broker-{self.label}-", suffix=".log", dir=self.workdir)
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "zaichik", "--port", f"tcp:{self.port}:interface=127.0.0.1"] + self.options
        self.spawned_at = time.monotonic()
        self.process = subprocess.Popen(argv, cwd=self.workdir, env=broker_env(), stdout=fd,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.close(fd)
        Broker.running.append(self)
        return self

    def start(self, timeout: float = 60.0) -> "Broker":
        return self.spawn().wait_ready(timeout)

    def alive(self) -> None:
        """
        Raises if the broker exited, unless its port was taken: then it is
        spawned again on another (C{spawned_at} and C{port} change).
        """
        if self.process.poll() is not None:
            # twistd zaichik's line: "cannot listen on --port tcp:PORT:...: Address already in use"
            said = f"--port tcp:{self.port}:interface=127.0.0.1: {os.strerror(errno.EADDRINUSE)}"
            if self.port_tries < self.PORT_TRIES and said in self.log_tail():
                self.port_tries += 1
                Broker.running.remove(self)
                self._spawn()
                return
            raise BenchError(f"broker {self.label} exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> "Broker":
        """Until it answers a PING (the reactor runs), checking it is still alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(ping(1))
                    read_frame(s)
                    return self
            except (OSError, BenchError):
                time.sleep(0.02)
        raise BenchError(f"broker {self.label} did not answer a PING within {timeout:.0f} s:\n{self.log_tail()}")

    def check_is_twistd(self) -> None:
        """The pid measured must be the broker's own (no wrapper process)."""
        with open(f"/proc/{self.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"twistd" not in cmdline or b"zaichik" not in cmdline:
            raise BenchError(f"pid {self.pid} is not the broker: {cmdline!r}")

    def rss_mb(self) -> float:
        return status_mb(self.pid, "VmRSS:")

    def peak_rss_mb(self) -> float:
        return status_mb(self.pid, "VmHWM:")

    def rss_split(self) -> str:
        """RSS as anonymous memory and mapped files (page cache that mmap maps counts in RSS)."""
        return (f"anon {status_mb(self.pid, 'RssAnon:'):,.0f} MB, "
                f"file {status_mb(self.pid, 'RssFile:'):,.0f} MB")

    def stop(self, timeout: float = 120.0) -> float:
        """SIGTERM and wait (SIGKILL after C{timeout}); the seconds it took to exit."""
        if self.process is None:
            return 0.0
        t0 = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  (broker {self.label} still running {timeout:.0f} s after SIGTERM: killed)", flush=True)
                self.process.kill()
                self.process.wait()
        if self in Broker.running:
            Broker.running.remove(self)
        return time.monotonic() - t0

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    @classmethod
    def kill_all(cls) -> None:
        for broker in list(cls.running):
            if broker.process.poll() is None:
                broker.process.kill()
                broker.process.wait()
            cls.running.remove(broker)


# --- client helpers -----------------------------------------------------------------------


def connect(port: int, timeout: float = 60.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise BenchError("the broker closed the connection")
        data += chunk
    return data


def read_frame(s: socket.socket) -> bytes:
    """One frame's body (blocking, bounded by the socket's timeout)."""
    return recv_exact(s, _u32.unpack(recv_exact(s, 4))[0])


def request(s: socket.socket, data: bytes, what: str) -> None:
    """Send a request and insist on OK."""
    s.sendall(data)
    body = read_frame(s)
    if body[:1] != bytes([OP_OK]):
        raise BenchError(f"{what}: {describe_reply(body)}")


def stall_limit(n: int) -> float:
    """A bound for a phase that moves C{n} messages: generous, but a bound."""
    return 60.0 + n / 10_000


# --- 1. retention at scale -------------------------------------------------------------------


def load(broker: Broker, topic: str, count: int, window: int, stall: float) -> float:
    """
    Publish C{count} (a multiple of L{BATCH}) retained messages to C{topic}
    in PUBLISH_BATCH frames, C{window} batches in flight; the seconds it took.
    """
    s = connect(broker.port, timeout=stall)
    try:
        request(s, create_topic(1, topic, DAY_MS), f"CREATE_TOPIC {topic}")
        batch = publish_batch(7, topic, [VALUE] * BATCH)
        batches = count // BATCH
        reply_size = 4 + 1 + 4 + 4 + 9 * BATCH
        replies = FixedFrames(reply_size, _u32.pack(reply_size - 4) + bytes([OP_PUBLISHED_BATCH])
                              + _u32.pack(7) + _u32.pack(BATCH), seq_at=13, first=0, step=BATCH)
        buf = bytearray(RECV_BUFFER)
        t0 = time.monotonic()
        deadline = t0 + stall_limit(count)
        sent = min(window, batches)
        s.sendall(batch * sent)
        last_report = t0
        while replies.count < batches:
            try:
                n = s.recv_into(buf)
            except socket.timeout:
                broker.alive()
                raise BenchError(f"no reply for {stall:.0f} s while loading ({replies.count * BATCH:,} stored)")
            if not n:
                broker.alive()
                raise BenchError(f"the broker closed the connection while loading ({replies.count * BATCH:,} stored)")
            before = replies.count
            if not replies.feed(buf, n):
                raise BenchError(f"loading: {replies.error}")
            more = min(replies.count - before, batches - sent)
            if more > 0:
                s.sendall(batch * more)
                sent += more
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"loading took over {stall_limit(count):.0f} s ({replies.count * BATCH:,} stored)")
            if now - last_report >= 10:
                last_report = now
                print(f"  ... {replies.count * BATCH:,} stored, RSS {broker.rss_mb():,.0f} MB", flush=True)
        if not replies.check_last():
            raise BenchError(f"loading: {replies.error}")
        return time.monotonic() - t0
    finally:
        s.close()


def restart_and_read(broker: Broker, topic: str, count: int, stall: float, start_timeout: float) -> Dict:
    """
    Spawn C{broker} (on its existing data dir); connect every 5 ms until it
    accepts, SUBSCRIBE start=EARLIEST, and time the first MESSAGE from the
    spawn; then read all C{count} messages, sampling the RSS every 0.5 s.
    """
    broker.spawn()
    deadline = broker.spawned_at + start_timeout
    s = None
    while s is None:
        broker.alive()  # (spawned again if its port was taken)
        try:
            s = connect(broker.port, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"the restarted broker did not accept a connection within {start_timeout:.0f} s:\n"
                                 f"{broker.log_tail()}")
            time.sleep(0.005)
    t_connected = time.monotonic()
    t_spawn = broker.spawned_at  # the spawn that listened
    result: Dict = {"connect_s": t_connected - t_spawn}
    try:
        broker.check_is_twistd()
        s.settimeout(max(1.0, deadline - time.monotonic()))
        s.sendall(subscribe(1, topic, START_EARLIEST))
        try:
            body = read_frame(s)
        except socket.timeout:
            raise BenchError(f"no answer to SUBSCRIBE within {start_timeout:.0f} s of the spawn:\n{broker.log_tail()}")
        if body[:1] != bytes([OP_OK]):
            raise BenchError(f"SUBSCRIBE {topic}: {describe_reply(body)}")
        size, head = message_layout(topic)
        messages = FixedFrames(size, head, seq_at=len(head), first=0)
        buf = bytearray(RECV_BUFFER)
        t_first = None
        samples: List[Tuple[float, float]] = []
        next_sample = time.monotonic()
        rss_half = None
        read_deadline = None
        while messages.count < count:
            try:
                n = s.recv_into(buf)
            except socket.timeout:
                broker.alive()
                raise BenchError(f"the subscriber got nothing for {s.gettimeout():.0f} s "
                                 f"({messages.count:,} of {count:,} received)")
            if not n:
                broker.alive()
                raise BenchError(f"the broker closed the subscriber's connection ({messages.count:,} of "
                                 f"{count:,} received)")
            now = time.monotonic()
            if not messages.feed(buf, n):
                raise BenchError(f"subscriber: {messages.error}")
            if t_first is None and messages.count:
                t_first = now
                result["first_byte_s"] = t_first - t_spawn
                result["rss_first"] = broker.rss_mb()
                read_deadline = now + stall_limit(count)
                s.settimeout(stall)
            if now >= next_sample:
                samples.append((now, broker.rss_mb()))
                next_sample = now + 0.5
            if rss_half is None and messages.count >= count // 2:
                rss_half = broker.rss_mb()
            if read_deadline and now > read_deadline:
                raise BenchError(f"reading back took over {stall_limit(count):.0f} s "
                                 f"({messages.count:,} of {count:,} received)")
        t_last = time.monotonic()
        samples.append((t_last, broker.rss_mb()))
        if not messages.check_last():
            raise BenchError(f"subscriber: {messages.error}")
        # Anything more than N is a repeated or extra message.
        s.settimeout(0.2)
        try:
            extra = s.recv(1 << 16)
        except socket.timeout:
            extra = b""
        if extra:
            raise BenchError(f"{len(extra)} bytes after the {count:,}th message: {extra[:32].hex()}")
        result.update(
            received=messages.count, checked=messages.checked, last_offset=count - 1,
            read_s=t_last - t_first, rate=(count - 1) / (t_last - t_first) if t_last > t_first else float("inf"),
            rate_from_subscribe=count / (t_last - t_connected),
            rss_half=rss_half if rss_half is not None else samples[-1][1],
            rss_end=broker.rss_mb(), split_end=broker.rss_split(),
            rss_peak_sampled=max(r for _, r in samples), samples=len(samples),
            hwm=broker.peak_rss_mb(),
        )
        time.sleep(1.0)
        result["rss_end_idle"] = broker.rss_mb()
        return result
    finally:
        s.close()


def run_retention(args, workdir: str, extra: List[str]) -> Tuple[List[str], bool]:
    count = -(-args.messages // BATCH) * BATCH
    data_dir = os.path.join(workdir, "retained")
    os.makedirs(data_dir)
    options = ["--data-dir", data_dir, "--fsync", "never", "--default-retention", "1d"] + extra
    topic = "retained"
    print(f"[1] retention: {count:,} retained 100-byte messages in one topic; broker options: "
          f"{' '.join(options)}", flush=True)
    if count != args.messages:
        print(f"  (--messages rounded up to a multiple of {BATCH:,})")
    broker = Broker("retained", options, workdir).start()
    broker.check_is_twistd()
    rss_idle = broker.rss_mb()
    print(f"  loading ({args.window} batches of {BATCH:,} in flight) ...", flush=True)
    load_s = load(broker, topic, count, args.window, args.stall)
    rss_loaded = broker.rss_mb()
    hwm_loaded = broker.peak_rss_mb()
    time.sleep(1.0)
    rss_loaded_1s = broker.rss_mb()
    split_loaded = broker.rss_split()
    stop_s = broker.stop()
    code = broker.process.returncode
    clean = "clean shutdown logged" if "Main loop terminated" in broker.log_tail(100) else "no clean shutdown logged"
    disk = dir_bytes(data_dir)
    print(f"  loaded in {load_s:.1f} s; stopped by SIGTERM in {stop_s:.2f} s (exit status {code}, {clean}); "
          f"{disk / 2**20:,.0f} MiB on disk; restarting ...", flush=True)
    broker = Broker("restarted", options, workdir)
    r = restart_and_read(broker, topic, count, args.stall, args.start_timeout)
    broker.stop()

    def rss(mb: float) -> str:
        return f"{mb:,.0f} MB"

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    rows = [
        ("load rate (PUBLISH_BATCH x1,000)", f"{count / load_s:,.0f} msgs/s", "", ""),
        ("RSS idle, before loading", rss(rss_idle), "", ""),
        ("RSS after loading", rss(rss_loaded), f"<= {TARGET_RSS_MB} MB", verdict(rss_loaded <= TARGET_RSS_MB)),
        ("RSS 1 s after loading", rss(rss_loaded_1s), f"<= {TARGET_RSS_MB} MB",
         verdict(rss_loaded_1s <= TARGET_RSS_MB)),
        ("  anonymous, mapped files", split_loaded, "", ""),
        ("peak RSS while loading (VmHWM)", rss(hwm_loaded), "", ""),
        ("data dir on disk", f"{disk / 2**20:,.0f} MiB", "", ""),
        ("restart: spawn to accepting a connection", f"{r['connect_s']:.3f} s", "", ""),
        ("restart to first byte served", f"{r['first_byte_s']:.3f} s", f"<= {TARGET_FIRST_BYTE_S:g} s",
         verdict(r["first_byte_s"] <= TARGET_FIRST_BYTE_S)),
        ("RSS at the first message", rss(r["rss_first"]), "", ""),
        ("RSS after restart, subscriber half way", rss(r["rss_half"]), f"<= {TARGET_RSS_MB} MB",
         verdict(r["rss_half"] <= TARGET_RSS_MB)),
        ("RSS after restart, all read", rss(r["rss_end"]), f"<= {TARGET_RSS_MB} MB",
         verdict(r["rss_end"] <= TARGET_RSS_MB)),
        ("  anonymous, mapped files", r["split_end"], "", ""),
        ("RSS after restart, 1 s later", rss(r["rss_end_idle"]), f"<= {TARGET_RSS_MB} MB",
         verdict(r["rss_end_idle"] <= TARGET_RSS_MB)),
        (f"peak RSS while reading ({r['samples']} samples, 0.5 s)", rss(r["rss_peak_sampled"]),
         f"<= {TARGET_RSS_MB} MB", verdict(r["rss_peak_sampled"] <= TARGET_RSS_MB)),
        ("peak RSS since restart (VmHWM)", rss(r["hwm"]), "", ""),
        ("subscriber from EARLIEST, first to last", f"{r['rate']:,.0f} msgs/s",
         f">= {TARGET_SUBSCRIBER_RATE:,}", verdict(r["rate"] >= TARGET_SUBSCRIBER_RATE)),
        ("  all read in", f"{r['read_s']:.2f} s", "", ""),
        ("  counted from SUBSCRIBE sent", f"{r['rate_from_subscribe']:,.0f} msgs/s", "", ""),
    ]
    lines = [f"{name:44} {value:>18}  {target:>14}  {mark}".rstrip() if target or len(value) <= 18
             else f"{name:44} {value}" for name, value, target, mark in rows]
    lines.append(f"  checked: {r['received']:,} messages, offsets 0..{r['last_offset']:,} in order "
                 f"({r['checked']:,} frames checked), nothing after the last")
    return lines, True


# --- 2. publish throughput ---------------------------------------------------------------------


def fire_and_forget(broker: Broker, topic: str, duration: float, warmup: float) -> Dict:
    """
    One publisher (PUBLISH rid 0, pre-encoded, in large writes) and one
    subscriber on C{topic} (retention 0), driven by one non-blocking loop
    that always reads first; msgs/s counted at the subscriber over
    C{duration} after C{warmup}.
    """
    pub = connect(broker.port)
    sub = connect(broker.port)
    try:
        request(pub, create_topic(1, topic, 0), f"CREATE_TOPIC {topic}")
        request(sub, subscribe(1, topic, START_LATEST), f"SUBSCRIBE {topic}")
        one = publish(0, topic, VALUE)
        chunk = memoryview(one * (256 * 1024 // len(one)))
        size, head = message_layout(topic)
        messages = FixedFrames(size, head, seq_at=len(head), first=0)
        buf = bytearray(RECV_BUFFER)
        pub.setblocking(False)
        sub.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(sub, selectors.EVENT_READ, "sub")
        sel.register(pub, selectors.EVENT_READ | selectors.EVENT_WRITE, "pub")
        sent_bytes = 0
        at = 0
        t_start = time.monotonic()
        t_warm = t_start + warmup
        t_end = t_warm + duration
        c0 = None
        cpu0 = 0.0
        errors = []
        publishing = True
        drain_until = None
        m0 = m1 = 0.0
        c1 = 0
        while True:
            now = time.monotonic()
            if c0 is None and now >= t_warm:
                c0, m0, cpu0 = messages.count, now, cpu_seconds(broker.pid)
            if publishing and now >= t_end:
                c1, m1 = messages.count, now
                cpu = cpu_seconds(broker.pid) - cpu0
                publishing = False
                # Finish the frame under way, then stop writing.
                pub.setblocking(True)
                pub.settimeout(10)
                rest = (-sent_bytes) % len(one)
                pub.sendall(chunk[at:at + rest])
                sent_bytes += rest
                pub.setblocking(False)
                sel.modify(pub, selectors.EVENT_READ, "pub")
                drain_until = now + 5.0
            if not publishing and (messages.count >= sent_bytes // len(one) or now > drain_until):
                break
            for key, events in sel.select(0.1):
                if key.data == "sub":
                    try:
                        n = sub.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if not n:
                        broker.alive()
                        raise BenchError(f"{broker.label}: the subscriber's connection was closed")
                    if not messages.feed(buf, n):
                        raise BenchError(f"{broker.label} subscriber: {messages.error}")
                    if not publishing:
                        drain_until = time.monotonic() + 2.0
                elif events & selectors.EVENT_READ:
                    try:
                        data = pub.recv(1 << 16)
                    except BlockingIOError:
                        data = None
                    if data == b"":
                        raise BenchError(f"{broker.label}: the publisher's connection was closed")
                    if data:
                        errors.append(describe_reply(data[4:]))
                        raise BenchError(f"{broker.label}: the publisher got {errors[0]}")
                elif publishing and events & selectors.EVENT_WRITE:
                    try:
                        n = pub.send(chunk[at:])
                    except BlockingIOError:
                        continue
                    sent_bytes += n
                    at = (at + n) % len(chunk)
        sent = sent_bytes // len(one)
        span = max(m1 - m0, 1e-9)
        return {"rate": (c1 - c0) / span, "cpu": cpu / span, "sent": sent,
                "lost": sent - messages.count}
    finally:
        pub.close()
        sub.close()


def acknowledged(broker: Broker, topic: str, duration: float, warmup: float, stall: float) -> Dict:
    """PUBLISH with rid 1, C{ACK_WINDOW} in flight (one more per PUBLISHED); acks/s over C{duration}."""
    s = connect(broker.port, timeout=stall)
    try:
        request(s, create_topic(1, topic, 0), f"CREATE_TOPIC {topic}")
        one = publish(1, topic, VALUE)
        window = memoryview(one * ACK_WINDOW)
        replies = FixedFrames(18, _u32.pack(14) + bytes([OP_PUBLISHED]) + _u32.pack(1), seq_at=9, first=0)
        buf = bytearray(RECV_BUFFER)
        t_start = time.monotonic()
        t_warm = t_start + warmup
        t_end = t_warm + duration
        c0 = None
        m0 = cpu0 = 0.0
        s.sendall(window)
        sent = ACK_WINDOW
        publishing = True
        c1, m1, cpu = 0, 0.0, 0.0
        while replies.count < sent:
            try:
                n = s.recv_into(buf)
            except socket.timeout:
                broker.alive()
                raise BenchError(f"{broker.label}: no PUBLISHED for {stall:.0f} s")
            if not n:
                broker.alive()
                raise BenchError(f"{broker.label}: the publisher's connection was closed")
            before = replies.count
            if not replies.feed(buf, n):
                raise BenchError(f"{broker.label}: {replies.error}")
            now = time.monotonic()
            if c0 is None and now >= t_warm:
                c0, m0, cpu0 = replies.count, now, cpu_seconds(broker.pid)
            if publishing and now >= t_end:
                c1, m1, cpu = replies.count, now, cpu_seconds(broker.pid) - cpu0
                publishing = False
            if publishing:
                more = replies.count - before
                if more:
                    s.sendall(window[:more * len(one)])
                    sent += more
        span = max(m1 - m0, 1e-9)
        return {"rate": (c1 - c0) / span, "cpu": cpu / span, "sent": sent, "lost": 0}
    finally:
        s.close()


def run_publish(args, workdir: str, extra: List[str]) -> Tuple[List[str], bool]:
    duration, warmup = args.duration, min(0.5, args.duration / 4)
    # (scenario, configuration, options or None for memory)
    pairs = [
        ("fire", [("in memory", None), ("--fsync never", "never")]),
        ("acked", [("in memory", None), ("--fsync always", "always")]),
    ]
    results: Dict[Tuple[str, str], List[Dict]] = {}
    print(f"[2] publish throughput: 100-byte values, topic retention 0, {duration:g} s each after "
          f"{warmup:g} s warm-up, {args.runs} run(s), configurations interleaved", flush=True)
    for run in range(args.runs):
        for scenario, configs in pairs:
            order = configs if run % 2 == 0 else configs[::-1]  # ABBA: drift cancels in the medians
            for label, fsync in order:
                if fsync is None:
                    options, data_dir = [], None
                else:
                    data_dir = os.path.join(workdir, f"{scenario}-{fsync}-{run}")
                    os.makedirs(data_dir)
                    options = ["--data-dir", data_dir, "--fsync", fsync] + extra
                broker = Broker(f"{scenario}-{fsync or 'memory'}-{run}", options, workdir).start()
                try:
                    topic = f"bench-{scenario}-{run}"
                    if scenario == "fire":
                        r = fire_and_forget(broker, topic, duration, warmup)
                    else:
                        r = acknowledged(broker, topic, duration, warmup, args.stall)
                    r["rss"] = broker.peak_rss_mb()
                finally:
                    broker.stop()
                if data_dir and not args.keep_dir:
                    shutil.rmtree(data_dir, True)
                results.setdefault((scenario, label), []).append(r)
                lost = f", {r['lost']:,} of {r['sent']:,} not received" if r["lost"] else ""
                print(f"  run {run + 1}: {scenario:5} {label:15} {r['rate']:>11,.0f} msgs/s  "
                      f"broker cpu {r['cpu'] * 100:3.0f}%{lost}", flush=True)

    names = {"fire": "PUBLISH rid 0, 1 -> 1, at the subscriber", "acked": f"PUBLISH acked, {ACK_WINDOW:,} in flight"}
    targets = {"fire": TARGET_NEVER_RATIO, "acked": TARGET_ALWAYS_RATIO}
    header = f"{'scenario':42} {'broker':16} {'median msgs/s':>13} {'cpu':>5} {'peak MB':>8}  each run"
    lines = [header, "-" * len(header)]
    ok = True
    for scenario, configs in pairs:
        medians = {}
        for label, _ in configs:
            rs = results[(scenario, label)]
            medians[label] = statistics.median(r["rate"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            rss = max(r["rss"] for r in rs)
            each = " ".join(f"{r['rate']:,.0f}" for r in rs)
            lost = sum(r["lost"] for r in rs)
            lines.append(f"{names[scenario] if label == configs[0][0] else '':42} {label:16} "
                         f"{medians[label]:>13,.0f} {cpu * 100:>4.0f}% {rss:>8.1f}  {each}"
                         + (f"  ({lost:,} not received)" if lost else ""))
            ok = ok and not lost
        base, disk = configs[0][0], configs[1][0]
        ratio = medians[disk] / medians[base] if medians[base] else float("nan")
        per_run = " ".join(f"{d['rate'] / b['rate']:.2f}" for b, d in zip(results[(scenario, base)],
                                                                           results[(scenario, disk)]))
        target = targets[scenario]
        lines.append(f"{'':42} {'ratio':16} {ratio:>13.2f}  target >= {target}: "
                     f"{'met' if ratio >= target else 'MISSED'}   each run: {per_run}")
    return lines, ok


# --- main ------------------------------------------------------------------------------------


def which_zaichik() -> str:
    """Where the brokers' zaichik comes from (PYTHONPATH first, then this checkout)."""
    out = subprocess.run([sys.executable, "-c", "import zaichik, os; print(os.path.dirname(zaichik.__file__))"],
                         env=broker_env(), cwd="/", capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or f"(import failed: {out.stderr.strip()[-200:]})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--quick", action="store_true",
                        help="short run for CI: 200,000 messages, 1 s measurements, 1 run (flags given "
                             "explicitly still win)")
    parser.add_argument("--messages", type=int, help="retained messages to load (default 20,000,000)")
    parser.add_argument("--duration", type=float, help="seconds per throughput measurement (default 5)")
    parser.add_argument("--runs", type=int, help="throughput runs, interleaved (default 3)")
    parser.add_argument("--part", choices=("all", "retention", "publish"), default="all")
    parser.add_argument("--window", type=int, default=8, help="PUBLISH_BATCH frames in flight while loading")
    parser.add_argument("--broker-args", default="",
                        help="extra twistd zaichik options for every --data-dir broker, one string: "
                             "--broker-args='--cache-size 33554432'")
    parser.add_argument("--dir", help="make the work directory (data dirs, broker logs) under this one "
                                      "(default: /tmp)")
    parser.add_argument("--keep-dir", action="store_true", help="leave the work directory in place")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="give up when the broker sends nothing for this many seconds")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="give up on the restarted broker's first message after this many seconds")
    args = parser.parse_args(argv)
    quick = {"messages": 200_000, "duration": 1.0, "runs": 1}
    full = {"messages": 20_000_000, "duration": 5.0, "runs": 3}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.messages < 1 or args.duration <= 0 or args.runs < 1 or args.window < 1:
        parser.error("--messages, --duration, --runs and --window must be positive")
    extra = shlex.split(args.broker_args)

    def on_term(signum, frame_):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    workdir = tempfile.mkdtemp(prefix="zaichik-storage-bench-", dir=args.dir or "/tmp")
    print(f"zaichik storage benchmark: brokers run {which_zaichik()}; work dir {workdir}; "
          f"{os.cpu_count()} CPUs", flush=True)
    output: List[str] = []
    ok = True
    t0 = time.monotonic()
    try:
        if args.part in ("all", "retention"):
            lines, good = run_retention(args, workdir, extra)
            output += [f"retention on disk: {-(-args.messages // BATCH) * BATCH:,} retained 100-byte messages, "
                       f"one topic, --fsync never", ""] + lines + [""]
            ok = ok and good
        if args.part in ("all", "publish"):
            lines, good = run_publish(args, workdir, extra)
            output += [f"publish throughput, 100-byte values, {args.duration:g} s x {args.runs} run(s) "
                       f"(median; cpu: the broker's, during the measurement)", ""] + lines + [""]
            ok = ok and good
    except BenchError as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        ok = False
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        ok = False
    except SystemExit as e:
        print(f"\nstopped by signal {e.code - 128}: brokers killed", file=sys.stderr)
        raise
    finally:
        Broker.kill_all()
        if args.keep_dir:
            print(f"(work directory kept: {workdir})")
        else:
            shutil.rmtree(workdir, True)
    if output:
        print()
        print("\n".join(output).rstrip())
    extra_note = f"; data-dir brokers also got: {' '.join(extra)}" if extra else ""
    print(f"\n(total {time.monotonic() - t0:.0f} s{extra_note})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
