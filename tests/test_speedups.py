"""
The compiled accelerator (C{zaichik/_speedups.c}) agrees with the pure-Python
functions that specify it: the same result, or the same exception type, for
any input (hypothesis), including every truncation and corruption of a
well-formed frame.  Skipped where the accelerator is not built; the rest of
the suite runs on whichever path is chosen (CI runs it both ways, the second
time with C{ZAICHIK_PURE=1}).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from typing import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec, speedups
from zaichik.edge import websocket
from zaichik.storage import redis, segment

try:
    from zaichik import _speedups
except ImportError:  # not built here: nothing to compare
    _speedups = None  # type: ignore[assignment]

SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

topics = st.text(min_size=0, max_size=300)
keys = st.one_of(st.none(), st.binary(max_size=40))
values = st.binary(max_size=300)
u64s = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
any_ints = st.one_of(u64s, st.integers(-(2**70), 2**70))


def outcome(f: Callable, *args):
    """What C{f(*args)} gives: its result, or the type of what it raised."""
    try:
        return f(*args)
    except Exception as e:
        return type(e)


def as_lists(result):
    """A parse_publish_run result with each topic's entries as a list (the compiled one's are Entries)."""
    if isinstance(result, tuple):
        groups, count, at = result
        return {topic: list(entries) for topic, entries in groups.items()}, count, at
    return result


@st.composite
def publish_bodies(draw):
    """A PUBLISH body: well-formed, or truncated, extended or with a byte changed."""
    body = codec.Publish(draw(st.integers(0, 2**32 - 1)), draw(topics), draw(values), draw(keys)).encode()
    return draw(damaged(body))


@st.composite
def batch_bodies(draw):
    """A PUBLISH_BATCH body: well-formed, or truncated, extended or with a byte changed."""
    entries = draw(st.lists(st.tuples(keys, values), min_size=0, max_size=5))
    body = codec.PublishBatch(draw(st.integers(0, 2**32 - 1)), draw(topics), entries).encode()
    return draw(damaged(body))


@st.composite
def damaged(draw, body: bytes):
    how = draw(st.sampled_from(["as is", "cut", "extend", "flip", "raw"]))
    if how == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif how == "extend":
        body += draw(st.binary(min_size=1, max_size=8))
    elif how == "flip":
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    elif how == "raw":
        body = draw(st.binary(max_size=64))
    return body


class AgreeTests(SynchronousTestCase):
    def setUp(self) -> None:
        if _speedups is None:
            raise self.skipTest("the accelerator is not built here (no C compiler at install time)")

    @SETTINGS
    @given(st.lists(publish_bodies(), min_size=1, max_size=4))
    def test_parse_publish(self, bodies):
        # Several in a row: the compiled one remembers the last topic.
        for body in bodies:
            self.assertEqual(outcome(_speedups.parse_publish, body), outcome(codec.parse_publish_py, body))

    @SETTINGS
    @given(st.lists(st.one_of(publish_bodies(), batch_bodies()), min_size=1, max_size=4))
    def test_parse_publish_batch(self, bodies):
        for body in bodies:
            self.assertEqual(outcome(_speedups.parse_publish_batch, body),
                             outcome(codec.parse_publish_batch_py, body))
            self.assertEqual(outcome(_speedups.parse_publish, body), outcome(codec.parse_publish_py, body))

    @SETTINGS
    @given(st.lists(st.one_of(publish_bodies(), batch_bodies()), max_size=6), st.integers(0, 8),
           st.integers(0, 12), st.sampled_from([0, 5, 40, 1 << 20]))
    def test_parse_publish_run(self, bodies, at, cut, limit):
        # Frames (mostly PUBLISH, some damaged), the run read from C{at},
        # the read cut C{cut} bytes short of its end.
        data = b"".join(codec.frame(body) for body in bodies)
        end = max(0, len(data) - cut)
        self.assertEqual(as_lists(outcome(_speedups.parse_publish_run, data, at, end, limit)),
                         outcome(codec.parse_publish_run_py, data, at, end, limit))
        # From a bytearray (not a framer's read): lists, the same.
        self.assertEqual(outcome(_speedups.parse_publish_run, bytearray(data), at, end, limit),
                         outcome(codec.parse_publish_run_py, data, at, end, limit))

    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(["a", "b", "\u00e9"]), st.one_of(st.none(), st.just(b"k"), keys),
                              values), min_size=1, max_size=8),
           u64s, u64s, st.sampled_from([0, 30, 60, 120, 400]), st.integers(-10, 10))
    def test_entries(self, messages, first, timestamp, max_body, index):
        """Entries read as their (key, value) list, and plain_message_block makes from them what it makes of that."""
        data = b"".join(codec.frame(codec.Publish(0, t, v, k).encode()) for t, k, v in messages)
        groups, count, _ = _speedups.parse_publish_run(data, 0, len(data), 1 << 20)
        self.assertEqual(count, len(messages))
        for topic, entries in groups.items():
            self.assertIsInstance(entries, _speedups.Entries)
            listed = [(k or None, v) for t, k, v in messages if t == topic]
            self.assertEqual(list(entries), listed)
            self.assertEqual(len(entries), len(listed))
            self.assertEqual(outcome(entries.__getitem__, index), outcome(listed.__getitem__, index))
            prefix = codec.topic_prefix(topic)
            self.assertEqual(outcome(_speedups.plain_message_block, prefix, first, timestamp, entries, max_body),
                             outcome(codec.plain_message_block_py, prefix, first, timestamp, listed, max_body))

    @SETTINGS
    @given(st.binary(max_size=10), any_ints, any_ints,
           st.lists(st.one_of(st.tuples(st.one_of(keys, st.binary(min_size=65535, max_size=65537)), values),
                              st.lists(values, min_size=1, max_size=3)), max_size=4))
    def test_message_frames(self, prefix, first, timestamp, entries):
        self.assertEqual(outcome(_speedups.message_frames, prefix, first, timestamp, entries),
                         outcome(codec.message_frames_py, prefix, first, timestamp, entries))

    @SETTINGS
    @given(st.binary(max_size=10), any_ints, any_ints,
           st.lists(st.one_of(st.tuples(st.one_of(keys, st.just(b""), st.binary(min_size=65535, max_size=65537)),
                                        values),
                              st.tuples(st.none(), values), st.lists(values, min_size=1, max_size=3)), max_size=5),
           st.integers(0, 400))
    def test_plain_message_frames(self, prefix, first, timestamp, entries, max_body):
        # (Unkeyed entries drawn often: the result is then the frames, or
        # None when one is over max_body.)
        self.assertEqual(outcome(_speedups.plain_message_frames, prefix, first, timestamp, entries, max_body),
                         outcome(codec.plain_message_frames_py, prefix, first, timestamp, entries, max_body))

    @SETTINGS
    @given(st.binary(max_size=10), any_ints, any_ints,
           st.lists(st.one_of(st.tuples(st.one_of(st.none(), st.just(b"")), values), st.tuples(keys, values),
                              st.tuples(st.none(), st.one_of(values, st.text(max_size=3))),
                              st.lists(values, min_size=2, max_size=2)), max_size=5),
           st.integers(0, 400))
    def test_plain_message_block(self, prefix, first, timestamp, entries, max_body):
        # (Unkeyed bytes entries drawn often: the result is then the joined
        # frames, or None when one is over max_body; anything else, None.)
        self.assertEqual(outcome(_speedups.plain_message_block, prefix, first, timestamp, entries, max_body),
                         outcome(codec.plain_message_block_py, prefix, first, timestamp, entries, max_body))

    @SETTINGS
    @given(st.binary(max_size=40), st.lists(st.tuples(st.sampled_from(["a", "", "\u00e9"]),
                                                        st.sampled_from([None, b"", b"k"]),
                                                        st.binary(max_size=50)), min_size=1, max_size=6))
    def test_run_from_an_offset(self, junk, messages):
        # A run read from past another frame (the framer's case): Entries'
        # positions are in the whole read.  (From a review.)
        head = codec.frame(junk)
        data = head + b"".join(codec.frame(codec.Publish(0, t, v, k).encode()) for t, k, v in messages)
        compiled = _speedups.parse_publish_run(data, len(head), len(data), 1 << 20)
        pure = codec.parse_publish_run_py(data, len(head), len(data), 1 << 20)
        self.assertEqual(as_lists(compiled), pure)
        for topic, entries in compiled[0].items():
            listed = pure[0][topic]
            self.assertEqual(_speedups.plain_message_block(b"\x82\x00\x01t", 5, 6, entries, 1 << 20),
                             codec.plain_message_block_py(b"\x82\x00\x01t", 5, 6, listed, 1 << 20))
            self.assertEqual([entries[i] for i in range(-len(entries), len(entries))],
                             [listed[i] for i in range(-len(entries), len(entries))])

    def test_non_utf8_topic_ends_the_run(self):
        ok = codec.frame(codec.Publish(0, "a", b"v").encode())
        bad = bytearray(codec.Publish(0, "ab", b"v").encode())
        bad[7] = 0xFF
        data = ok + codec.frame(bytes(bad)) + ok
        self.assertEqual(as_lists(_speedups.parse_publish_run(data, 0, len(data), 1 << 20)),
                         codec.parse_publish_run_py(data, 0, len(data), 1 << 20))

    def test_block_prefix_not_bytes(self):
        """A prefix that is not bytes-like is refused by both, whatever the entries."""
        for entries in ([], [(b"k", b"v")], [(None, b"v")]):
            self.assertIs(outcome(_speedups.plain_message_block, None, 0, 0, entries, 100), TypeError)
            self.assertIs(outcome(codec.plain_message_block_py, None, 0, 0, entries, 100), TypeError)

    @SETTINGS
    @given(st.lists(st.tuples(u64s, u64s, keys, values), max_size=6), st.integers(0, 12), st.integers(0, 255),
           st.booleans())
    def test_split_frames(self, messages, cut, byte, damage):
        # Whole frames, cut short, or with a byte changed (a length, maybe).
        block = b"".join(codec.message_frame_py(b"\x82\x00\x01t", o, t, k, v) for o, t, k, v in messages)
        block = block[: max(0, len(block) - cut)]
        if damage and block:
            i = byte % len(block)
            block = block[:i] + bytes((byte,)) + block[i + 1 :]
        self.assertEqual(outcome(_speedups.split_frames, block), outcome(codec.split_frames_py, block))

    @SETTINGS
    @given(st.binary(max_size=10), any_ints, any_ints, st.one_of(keys, st.binary(min_size=65530, max_size=65540)),
           values)
    def test_message_frame(self, prefix, offset, timestamp, key, value):
        self.assertEqual(outcome(_speedups.message_frame, prefix, offset, timestamp, key, value),
                         outcome(codec.message_frame_py, prefix, offset, timestamp, key, value))

    @SETTINGS
    @given(u64s, topics.filter(lambda t: len(t.encode()) < 250),
           st.lists(st.tuples(u64s, u64s, keys, values), max_size=20), st.integers(0, 40))
    def test_encode_batch(self, first, topic, messages, skip):
        prefix = codec.topic_prefix(topic)
        frames = [codec.message_frame_py(prefix, o, t, k, v) for o, t, k, v in messages]
        if skip > 30:
            skip = 4 + len(prefix)  # what the disk log leaves out
        self.assertEqual(outcome(_speedups.encode_batch, first, frames, skip),
                         outcome(segment.encode_batch_py, first, frames, skip))
        # The same frames as a block (codec.FrameBlock's data): the same batch, both ways.
        block = b"".join(frames)
        self.assertEqual(outcome(_speedups.encode_batch, first, block, skip),
                         outcome(segment.encode_batch_py, first, frames, skip))
        self.assertEqual(outcome(segment.encode_batch_py, first, block, skip),
                         outcome(segment.encode_batch_py, first, frames, skip))

    @SETTINGS
    @given(u64s, st.lists(st.tuples(u64s, u64s, keys, values), max_size=5), st.integers(0, 12), st.integers(0, 255),
           st.booleans(), st.one_of(st.integers(0, 40), st.just(2**62)))
    def test_encode_batch_of_any_block(self, first, messages, cut, byte, damage, skip):
        # A block cut short or with a byte changed (a length, maybe): both
        # the same batch, or the same exception type.  (From a review.)
        block = b"".join(codec.message_frame_py(b"\x82\x00\x01t", o, t, k, v) for o, t, k, v in messages)
        block = block[: max(0, len(block) - cut)]
        if damage and block:
            i = byte % len(block)
            block = block[:i] + bytes((byte,)) + block[i + 1 :]
        self.assertEqual(outcome(_speedups.encode_batch, first, block, skip),
                         outcome(segment.encode_batch_py, first, block, skip))

    @SETTINGS
    @given(st.lists(st.tuples(st.one_of(publish_bodies(), batch_bodies()), st.binary(min_size=4, max_size=4),
                              st.sampled_from([0x82, 0x82, 0x82, 0x02, 0x81, 0x88])), max_size=6),
           st.integers(0, 8), st.integers(0, 12), st.sampled_from([0, 5, 40, 1 << 20]), st.booleans())
    def test_parse_ws_publish_run(self, messages, at, cut, limit, damage):
        # WebSocket messages (mostly final binary PUBLISHes, some not final,
        # text or control), masked; the read cut short; a byte changed.
        data = b"".join(bytes((first,)) + websocket.encode_frame(2, body, mask)[1:]
                        for body, mask, first in messages)
        end = max(0, len(data) - cut)
        if damage and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
        self.assertEqual(as_lists(outcome(_speedups.parse_ws_publish_run, data, at, end, limit)),
                         outcome(websocket.parse_ws_publish_run_py, data, at, end, limit))

    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(["a", "b", ""]), st.sampled_from([None, b"", b"k"]), values,
                              st.binary(min_size=4, max_size=4)), min_size=1, max_size=6))
    def test_ws_run_entries(self, messages):
        """A WebSocket run's entries (Entries, in the unmasked bodies) read as the Python twin's lists."""
        data = b"".join(websocket.encode_frame(2, codec.Publish(0, t, v, k).encode(), mask)
                        for t, k, v, mask in messages)
        compiled = _speedups.parse_ws_publish_run(data, 0, len(data), 1 << 20)
        self.assertEqual(compiled[1], len(messages))
        for entries in compiled[0].values():
            self.assertIsInstance(entries, _speedups.Entries)
        self.assertEqual(as_lists(compiled), websocket.parse_ws_publish_run_py(data, 0, len(data), 1 << 20))
        for topic, entries in compiled[0].items():
            prefix = codec.topic_prefix(topic)
            self.assertEqual(_speedups.plain_message_block(prefix, 3, 4, entries, 1 << 20),
                             codec.plain_message_block_py(prefix, 3, 4, list(entries), 1 << 20))

    @SETTINGS
    @given(st.lists(st.binary(max_size=300), max_size=5), st.sampled_from([0, 0, 1, 3, 70_000]),
           st.integers(0, 6))
    def test_ws_frames(self, bodies, big, cut):
        # Frames as a subscription writes them (a large one too), or cut.
        data = b"".join(codec.frame(body) for body in bodies + ([b"z" * big] if big else []))
        data = data[: len(data) - cut] if cut < len(data) else data
        self.assertEqual(outcome(_speedups.ws_frames, data), outcome(websocket.ws_frames_py, data))

    def test_parse_publish_run_many_topics(self):
        # More topics than the compiled twin's table of a run's topics
        # holds (128), in turn, with names that differ in one byte.
        names = [f"t.{i}" for i in range(300)] + ["t.\u00e9", "t.\u00e8"]
        data = b"".join(codec.frame(codec.Publish(0, names[i % len(names)], b"%d" % i).encode())
                        for i in range(3 * len(names)))
        result = as_lists(_speedups.parse_publish_run(data, 0, len(data), 1 << 20))
        self.assertEqual(result, codec.parse_publish_run_py(data, 0, len(data), 1 << 20))
        self.assertEqual((len(result[0]), result[1]), (len(names), 3 * len(names)))

    @SETTINGS
    @given(st.lists(st.tuples(keys, values), max_size=8))
    def test_encode_records(self, entries):
        self.assertEqual(_speedups.encode_records(entries), redis.encode_records_py(entries))

    @SETTINGS
    @given(st.binary(max_size=10), u64s, u64s, st.lists(st.tuples(keys, values), max_size=6),
           st.integers(0, 20), st.binary(max_size=12))
    def test_decode_records(self, prefix, first, timestamp, entries, cut, tail):
        # Records as the script stores them (keys too), cut short or with
        # bytes after: both the same, frames or struct.error.
        whole = b"".join(struct.pack(">II", len(k or b""), len(v)) + (k or b"") + v for k, v in entries)
        for blob in (whole, whole[: max(0, len(whole) - cut)], whole + tail):
            self.assertEqual(outcome(_speedups.decode_records, prefix, first, timestamp, blob),
                             outcome(redis.decode_records_py, prefix, first, timestamp, blob))

    @SETTINGS
    @given(st.binary(max_size=5000), st.integers(0, 2**32 - 1))
    def test_crc32(self, data, start):
        """The storage's CRC (zlib-ng's where installed) is zlib's."""
        self.assertEqual(speedups.crc32(data, start), zlib.crc32(data, start))

    def test_encode_batch_uses_the_chosen_crc(self):
        """encode_batch's CRC is speedups.crc32's (use_crc32), the same as the Python twin's."""
        calls = []

        def crc32(data, start=0):
            calls.append(len(data))
            return zlib.crc32(data, start)

        frames = [codec.message_frame_py(b"\x00\x01t", i, 7, None, b"v" * i) for i in range(3)]
        _speedups.use_crc32(crc32)
        try:
            self.assertEqual(_speedups.encode_batch(5, frames, 7), segment.encode_batch_py(5, frames, 7))
        finally:
            _speedups.use_crc32(speedups.crc32)
        self.assertEqual(len(calls), 1)

    def test_short_frames(self):
        """Frames too short for a timestamp: both refuse with struct.error, as a list or a block."""
        for frames in ([b"abc"], [b"x" * 40, b"y"]):
            self.assertIs(outcome(_speedups.encode_batch, 0, frames, 4), struct.error)
            self.assertIs(outcome(segment.encode_batch_py, 0, frames, 4), struct.error)
        for block in (b"\x00\x00\x00\x03abc", b"\x00\x00\x00\x28" + b"x" * 40 + b"\x00\x00\x00\x01y"):
            self.assertIs(outcome(_speedups.encode_batch, 0, block, 4), struct.error)
            self.assertIs(outcome(segment.encode_batch_py, 0, block, 4), struct.error)

    def test_block_not_whole_frames(self):
        """A block that does not end with a whole frame, or is empty: both refuse alike."""
        for block in (b"\x00\x00\x00\x20" + b"x" * 20, b"\x00\x00", b""):
            self.assertIs(outcome(_speedups.encode_batch, 0, block, 4), outcome(segment.encode_batch_py, 0, block, 4))
            self.assertIn(outcome(_speedups.encode_batch, 0, block, 4), (ValueError, IndexError))


class ChoiceTests(SynchronousTestCase):
    def test_chosen_automatically(self):
        """The compiled functions are used when built, unless ZAICHIK_PURE is set."""
        if speedups.compiled is None:
            self.assertIs(codec.parse_publish, codec.parse_publish_py)
            self.assertIs(codec.message_frame, codec.message_frame_py)
            self.assertIs(codec.message_frames, codec.message_frames_py)
            self.assertIs(codec.plain_message_frames, codec.plain_message_frames_py)
            self.assertIs(codec.plain_message_block, codec.plain_message_block_py)
            self.assertIs(codec.split_frames, codec.split_frames_py)
            self.assertIs(codec.parse_publish_batch, codec.parse_publish_batch_py)
            self.assertIs(segment.encode_batch, segment.encode_batch_py)
        else:
            self.assertIs(codec.parse_publish, speedups.compiled.parse_publish)
            self.assertIs(codec.message_frame, speedups.compiled.message_frame)
            self.assertIs(codec.message_frames, speedups.compiled.message_frames)
            self.assertIs(codec.plain_message_frames, speedups.compiled.plain_message_frames)
            self.assertIs(codec.plain_message_block, speedups.compiled.plain_message_block)
            self.assertIs(codec.split_frames, speedups.compiled.split_frames)
            self.assertIs(codec.parse_publish_batch, speedups.compiled.parse_publish_batch)
            self.assertIs(segment.encode_batch, speedups.compiled.encode_batch)

    def test_stale_build_not_used(self):
        """A compiled module from an older _speedups.c (a name missing): the pure-Python path, not a failure."""
        if _speedups is None:
            self.skipTest("the accelerator is not built here")
        import types

        stale = types.ModuleType("zaichik._speedups")
        for name in speedups._NAMES[:-1]:
            setattr(stale, name, getattr(_speedups, name))
        import zaichik

        self.patch(zaichik, "_speedups", stale)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "ZAICHIK_PURE"})
        saved = sys.modules["zaichik._speedups"]
        sys.modules["zaichik._speedups"] = stale
        try:
            self.assertIsNone(speedups._load())
            stale.Entries = _speedups.Entries  # type: ignore[attr-defined]
            self.assertIs(speedups._load(), stale)
        finally:
            sys.modules["zaichik._speedups"] = saved

    def test_pure_forced(self):
        """ZAICHIK_PURE=1 makes a new interpreter use the Python functions."""
        env = dict(os.environ, ZAICHIK_PURE="1")
        code = ("from zaichik import codec, speedups; from zaichik.storage import segment; "
                "print(speedups.compiled is None, codec.parse_publish is codec.parse_publish_py, "
                "segment.encode_batch is segment.encode_batch_py)")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.split(), ["True", "True", "True"])


class TuneGCTests(SynchronousTestCase):
    """L{speedups.tune_gc}, in a new interpreter each time (it sets the process's collector)."""

    def tuned(self, **env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if k != "ZAICHIK_GC_THRESHOLD"}
        code = "import gc; from zaichik import speedups; speedups.tune_gc(); print(gc.get_threshold())"
        return subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), capture_output=True, text=True)

    def test_thresholds(self):
        self.assertEqual(self.tuned().stdout.strip(), str(speedups.GC_THRESHOLD))
        self.assertNotEqual(speedups.GC_THRESHOLD, (700, 10, 10))

    def test_operator_wins(self):
        self.assertEqual(self.tuned(ZAICHIK_GC_THRESHOLD="700,10,10").stdout.strip(), "(700, 10, 10)")

    def test_not_three_numbers(self):
        """Refused with the variable's name, at the command line too (an option error, exit 1)."""
        self.assertIn("ZAICHIK_GC_THRESHOLD is three whole numbers", self.tuned(ZAICHIK_GC_THRESHOLD="700").stderr)
        from twisted.python import usage

        from zaichik.tap import Options

        os.environ["ZAICHIK_GC_THRESHOLD"] = "a,b,c"
        self.addCleanup(os.environ.pop, "ZAICHIK_GC_THRESHOLD")
        with self.assertRaises((usage.UsageError, SystemExit)) as caught:
            Options().parseOptions([])
        self.assertIn("ZAICHIK_GC_THRESHOLD", str(caught.exception))


class TuneMallocTests(SynchronousTestCase):
    """L{speedups.tune_malloc}, in a new interpreter each time (it sets the process's malloc)."""

    def tuned(self, **env: str) -> str:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        code = "from zaichik import speedups; print(speedups.tune_malloc())"
        out = subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()

    def test_sets_thresholds_on_glibc(self):
        if not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")):
            raise self.skipTest("glibc only")
        self.assertEqual(self.tuned(), "True")

    def test_operator_wins(self):
        """A threshold set in the environment is left as the operator set it."""
        self.assertEqual(self.tuned(MALLOC_MMAP_THRESHOLD_="131072"), "False")
        self.assertEqual(self.tuned(MALLOC_TRIM_THRESHOLD_="131072"), "False")
