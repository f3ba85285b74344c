/*
 * zaichik._speedups: the broker's innermost loops in C, optional.
 *
 * Each function here has a pure-Python twin that is the specification
 * (zaichik/codec.py: parse_publish, message_frame; zaichik/storage/segment.py:
 * encode_batch) and tests/test_speedups.py checks that both give the same
 * result, or raise the same exception type, for any input (hypothesis).  The
 * module is built by `pip install` when a C compiler is present
 * (setup.py: an optional Extension); without it, or with ZAICHIK_PURE=1 in
 * the environment, the Python twins are used.
 *
 * Why C: per published message the broker parses one PUBLISH frame and
 * encodes one MESSAGE frame; in Python each is a dozen bytecode-level
 * operations (struct calls, slices, a join) costing ~0.3 us, as much as the
 * whole of a bare Twisted forwarder's per-frame work.  Here each is one call
 * that allocates only its results.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *struct_error;   /* struct.error: what the Python twins raise */
static PyObject *zlib_crc32;     /* zlib.crc32, or what use_crc32 gave (speedups.crc32) */

/* -- big-endian helpers ---------------------------------------------------- */

static inline unsigned long long be_read(const unsigned char *p, int n)
{
    unsigned long long v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static inline void be_write(unsigned char *p, unsigned long long v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xFF);
        v >>= 8;
    }
}

/* A u64 from a Python int, raising struct.error (as struct.pack does) when
 * it does not fit. */
static int as_u64(PyObject *o, unsigned long long *out)
{
    if (!PyLong_Check(o)) {
        PyErr_SetString(struct_error, "required argument is not an integer");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(struct_error, "argument out of range");
        return -1;
    }
    *out = v;
    return 0;
}

static int wrong_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
    return 1;
}

/* -- parse_publish ----------------------------------------------------------- */

/* The topic of the last PUBLISH parsed, raw and decoded: a connection
 * publishes to the same topic again and again, and reusing the str object
 * skips both the UTF-8 decode and the hash the topics dict would compute. */
#define TOPIC_CACHE 256
static char last_topic_raw[TOPIC_CACHE];
static Py_ssize_t last_topic_len = -1;
static PyObject *last_topic;

/* The topic of a PUBLISH or PUBLISH_BATCH as a str (a new reference), None
 * (borrowed) when it is not UTF-8, NULL on another error. */
static PyObject *decode_topic(const unsigned char *raw, Py_ssize_t n)
{
    PyObject *topic;
    if (n <= TOPIC_CACHE && n == last_topic_len && memcmp(last_topic_raw, raw, n) == 0) {
        Py_INCREF(last_topic);
        return last_topic;
    }
    topic = PyUnicode_DecodeUTF8((const char *)raw, n, "strict");
    if (topic == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return NULL;
        PyErr_Clear();
        return Py_None;
    }
    if (n <= TOPIC_CACHE) {
        memcpy(last_topic_raw, raw, n);
        last_topic_len = n;
        Py_INCREF(topic);
        Py_XSETREF(last_topic, topic);
    }
    return topic;
}

/* The head both publish frames share: opcode, u32 rid, u16 topic length,
 * topic.  Needs `after` more bytes past it.  1 and the topic (a new
 * reference) in *topic; 0 for a body not perfectly formed; -1 on error. */
static int read_head(const unsigned char *b, Py_ssize_t len, Py_ssize_t after, unsigned long *rid,
                     Py_ssize_t *at, PyObject **topic)
{
    if (len < 7)
        return 0;
    *rid = (unsigned long)be_read(b + 1, 4);
    Py_ssize_t n = (Py_ssize_t)be_read(b + 5, 2);
    *at = 7 + n;
    if (*at + after > len)
        return 0;
    *topic = decode_topic(b + 7, n);
    if (*topic == NULL)
        return -1;
    if (*topic == Py_None) {
        *topic = NULL;
        return 0;
    }
    return 1;
}

/* One (key, value) entry at *at: u16 key length, key, u32 value length,
 * value.  1 with new references (key None when empty); 0 for one that does
 * not fit; -1 on error. */
static int read_entry(const unsigned char *b, Py_ssize_t len, Py_ssize_t *at, PyObject **key, PyObject **value)
{
    if (*at + 2 > len)
        return 0;
    Py_ssize_t key_at = *at + 2, key_len = (Py_ssize_t)be_read(b + *at, 2);
    Py_ssize_t pos = key_at + key_len;
    if (pos + 4 > len)
        return 0;
    Py_ssize_t n = (Py_ssize_t)be_read(b + pos, 4);
    pos += 4;
    if (pos + n > len)
        return 0;
    if (key_len) {
        *key = PyBytes_FromStringAndSize((const char *)b + key_at, key_len);
        if (*key == NULL)
            return -1;
    } else {
        *key = Py_None;
        Py_INCREF(*key);
    }
    *value = PyBytes_FromStringAndSize((const char *)b + pos, n);
    if (*value == NULL) {
        Py_CLEAR(*key);
        return -1;
    }
    *at = pos + n;
    return 1;
}

static PyObject *parse_publish(PyObject *self, PyObject *body)
{
    Py_buffer view;
    PyObject *topic = NULL, *key = NULL, *value = NULL, *result = NULL;
    Py_ssize_t at;
    unsigned long rid;
    int ok;
    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    ok = read_head(view.buf, view.len, 2, &rid, &at, &topic);
    if (ok > 0)
        ok = read_entry(view.buf, view.len, &at, &key, &value);
    if (ok > 0 && at == view.len) {
        result = Py_BuildValue("(kNNN)", rid, topic, key, value);
        topic = key = value = NULL;
    } else if (ok >= 0) {
        result = Py_None;
        Py_INCREF(result);
    }
    Py_XDECREF(topic);
    Py_XDECREF(key);
    Py_XDECREF(value);
    PyBuffer_Release(&view);
    return result;
}

/* -- parse_publish_batch ------------------------------------------------------- */

static PyObject *parse_publish_batch(PyObject *self, PyObject *body)
{
    Py_buffer view;
    PyObject *topic = NULL, *entries = NULL, *result = NULL;
    Py_ssize_t at, count, i;
    unsigned long rid;
    int ok;
    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *b = view.buf;
    ok = read_head(b, view.len, 4, &rid, &at, &topic);
    if (ok > 0) {
        count = (Py_ssize_t)be_read(b + at, 4);
        at += 4;
        if (!count || count * 6 > view.len - at)
            ok = 0;
    }
    if (ok > 0) {
        entries = PyList_New(count);
        if (entries == NULL)
            ok = -1;
        for (i = 0; ok > 0 && i < count; i++) {
            PyObject *key, *value, *pair;
            ok = read_entry(b, view.len, &at, &key, &value);
            if (ok <= 0)
                break;
            pair = PyTuple_Pack(2, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
            if (pair == NULL)
                ok = -1;
            else
                PyList_SET_ITEM(entries, i, pair);
        }
    }
    if (ok > 0 && at == view.len) {
        result = Py_BuildValue("(kNN)", rid, topic, entries);
        topic = entries = NULL;
    } else if (ok >= 0) {
        result = Py_None;
        Py_INCREF(result);
    }
    Py_XDECREF(topic);
    Py_XDECREF(entries);
    PyBuffer_Release(&view);
    return result;
}

/* -- parse_publish_run --------------------------------------------------------- */

/* Entries: a run's (key, value) entries of one topic, kept as positions in
 * the read they were parsed from (which it keeps alive), 4 bytes an entry.
 * It reads as a sequence of (key or None, value) tuples, each made when
 * asked for; plain_message_block makes a topic's block from it straight
 * from the read.  Why: a tuple and a value object a message, made by the
 * parse and read once by the block, were a third of the broker's time per
 * message with 100 topics (parse 55 vs 42 ns/msg with one topic). */
typedef struct {
    PyObject_HEAD
    PyObject *data;            /* the bytes the entries are in */
    Py_ssize_t n, cap;
    uint32_t *at;              /* each entry's position: its u16 key length */
} EntriesObject;

static PyTypeObject EntriesType;

static EntriesObject *entries_new(PyObject *data)
{
    EntriesObject *e = PyObject_New(EntriesObject, &EntriesType);
    if (e == NULL)
        return NULL;
    Py_INCREF(data);
    e->data = data;
    e->n = e->cap = 0;
    e->at = NULL;
    return e;
}

static int entries_add(EntriesObject *e, Py_ssize_t at)
{
    if (e->n == e->cap) {
        Py_ssize_t cap = e->cap ? e->cap * 2 : 16;
        uint32_t *grown = PyMem_Realloc(e->at, cap * sizeof(uint32_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        e->at = grown;
        e->cap = cap;
    }
    e->at[e->n++] = (uint32_t)at;
    return 0;
}

static void entries_dealloc(EntriesObject *e)
{
    PyMem_Free(e->at);
    Py_DECREF(e->data);
    PyObject_Free(e);
}

static Py_ssize_t entries_len(EntriesObject *e)
{
    return e->n;
}

/* The entry at i as the (key or None, value) tuple parse_publish_run_py gives. */
static PyObject *entries_item(EntriesObject *e, Py_ssize_t i)
{
    if (i < 0 || i >= e->n) {
        PyErr_SetString(PyExc_IndexError, "entries index out of range");
        return NULL;
    }
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(e->data) + e->at[i];
    Py_ssize_t key_len = (Py_ssize_t)be_read(b, 2);
    Py_ssize_t n = (Py_ssize_t)be_read(b + 2 + key_len, 4);
    PyObject *key, *value;
    if (key_len) {
        key = PyBytes_FromStringAndSize((const char *)b + 2, key_len);
        if (key == NULL)
            return NULL;
    } else {
        key = Py_None;
        Py_INCREF(key);
    }
    value = PyBytes_FromStringAndSize((const char *)b + 6 + key_len, n);
    if (value == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return pair;
}

static PySequenceMethods entries_as_sequence = {
    .sq_length = (lenfunc)entries_len,
    .sq_item = (ssizeargfunc)entries_item,
};

static PyTypeObject EntriesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "zaichik._speedups.Entries",
    .tp_basicsize = sizeof(EntriesObject),
    .tp_dealloc = (destructor)entries_dealloc,
    .tp_as_sequence = &entries_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A run's (key, value) entries of one topic, as positions in the read (see parse_publish_run).",
};

#define OP_PUBLISH 0x05

/* A run's topics by their raw names (which stay in the read buffer for the
 * whole call), so that a run alternating between topics decodes each name
 * and hashes the str once, not once a message (the one-topic cache of
 * decode_topic misses every time then: 100 topics, parse 3.7x slower). */
#define RUN_SLOTS 256
struct run_slot {
    const unsigned char *raw;
    Py_ssize_t len;
    PyObject *entries; /* borrowed: the groups dict holds it */
};

static PyObject *run_entries(PyObject *groups, struct run_slot *table, Py_ssize_t *used,
                             const unsigned char *raw, Py_ssize_t n, PyObject *data)
{
    unsigned long h = 2166136261UL;
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        h = (h ^ raw[i]) * 16777619UL;
    struct run_slot *slot = &table[h % RUN_SLOTS];
    for (i = 0; i < RUN_SLOTS && slot->raw != NULL; i++) {
        if (slot->len == n && memcmp(slot->raw, raw, n) == 0)
            return slot->entries;
        slot = slot == &table[RUN_SLOTS - 1] ? table : slot + 1;
    }
    PyObject *topic = decode_topic(raw, n), *entries;
    if (topic == NULL || topic == Py_None)
        return topic; /* (error, or not UTF-8: Py_None borrowed) */
    entries = PyDict_GetItemWithError(groups, topic);
    if (entries == NULL && !PyErr_Occurred()) {
        entries = data != NULL ? (PyObject *)entries_new(data) : PyList_New(0);
        if (entries != NULL) {
            if (PyDict_SetItem(groups, topic, entries) < 0)
                Py_CLEAR(entries);
            else
                Py_DECREF(entries); /* (the dict holds it) */
        }
    }
    Py_DECREF(topic);
    if (entries != NULL && *used < RUN_SLOTS / 2) { /* (a table at most half full: short probes) */
        slot->raw = raw;
        slot->len = n;
        slot->entries = entries;
        (*used)++;
    }
    return entries;
}

/* One rid-0 PUBLISH body (as parse_publish reads it) into its topic's
 * entries: 1, 0 when it is not one (the run ends there), -1 on error.  The
 * body must stay where it is until the run is read (the table points into it). */
static int run_add(PyObject *groups, struct run_slot *table, Py_ssize_t *used, const unsigned char *body,
                   Py_ssize_t length, PyObject *data)
{
    PyObject *key = NULL, *value = NULL, *entries, *pair;
    Py_ssize_t n, pos;
    int ok;
    if (length < 7 || body[0] != OP_PUBLISH)
        return 0;
    /* The head as read_head reads it (rid 0 only), the topic looked up only
     * once the entry is known whole. */
    n = (Py_ssize_t)be_read(body + 5, 2);
    pos = 7 + n;
    if (be_read(body + 1, 4) != 0 || pos + 2 > length)
        return 0;
    if (data != NULL) {
        /* Entries: the entry's position, once it is known whole. */
        Py_ssize_t key_len = (Py_ssize_t)be_read(body + pos, 2), entry = pos;
        if (pos + 6 + key_len > length
                || be_read(body + pos + 2 + key_len, 4) != (unsigned long long)(length - pos - 6 - key_len))
            return 0;
        entries = run_entries(groups, table, used, body + 7, n, data);
        if (entries == NULL || entries == Py_None)
            return entries == NULL ? -1 : 0;
        return entries_add((EntriesObject *)entries, body + entry - (const unsigned char *)PyBytes_AS_STRING(data))
            < 0 ? -1 : 1;
    }
    ok = read_entry(body, length, &pos, &key, &value);
    if (ok > 0 && pos != length)
        ok = 0;
    if (ok <= 0) {
        Py_XDECREF(key);
        Py_XDECREF(value);
        return ok;
    }
    entries = run_entries(groups, table, used, body + 7, n, NULL);
    if (entries == NULL || entries == Py_None) {
        Py_DECREF(key);
        Py_DECREF(value);
        return entries == NULL ? -1 : 0;
    }
    pair = PyTuple_Pack(2, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    if (pair == NULL)
        return -1;
    ok = PyList_Append(entries, pair);
    Py_DECREF(pair);
    return ok < 0 ? -1 : 1;
}

/* The arguments both run readers take: (data, at, end, limit). */
static int run_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_buffer *view, Py_ssize_t *at,
                    Py_ssize_t *end, Py_ssize_t *limit)
{
    if (wrong_nargs(name, nargs, 4))
        return -1;
    *at = PyLong_AsSsize_t(args[1]);
    *end = PyLong_AsSsize_t(args[2]);
    *limit = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0)
        return -1;
    if (*end > view->len)
        *end = view->len;
    if (*at < 0)
        *at = 0;
    return 0;
}

/* The run of fire-and-forget PUBLISH frames at the start of data[at:end]:
 * (entries by topic, count, where the run ends).  The specification is
 * zaichik.codec.parse_publish_run_py. */
static PyObject *parse_publish_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t at, end, limit, count = 0, used = 0;
    PyObject *groups;
    struct run_slot table[RUN_SLOTS];
    if (run_args(args, nargs, "parse_publish_run", &view, &at, &end, &limit) < 0)
        return NULL;
    memset(table, 0, sizeof(table));
    groups = PyDict_New();
    if (groups == NULL)
        goto error;
    const unsigned char *b = view.buf;
    /* Entries for a bytes read (as the framer's are), else lists. */
    PyObject *lazy = PyBytes_CheckExact(args[0]) && view.len <= 0xFFFFFFFFLL ? args[0] : NULL;
    while (end - at >= 4) {
        Py_ssize_t length = (Py_ssize_t)be_read(b + at, 4);
        if (length > limit || length > end - at - 4)
            break;
        int ok = run_add(groups, table, &used, b + at + 4, length, lazy);
        if (ok < 0)
            goto error;
        if (ok == 0)
            break;
        at += 4 + length;
        count++;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nnn)", groups, count, at);
error:
    Py_XDECREF(groups);
    PyBuffer_Release(&view);
    return NULL;
}

/* The same for WebSocket messages from a client: whole, final, masked
 * binary frames (0x82) of at most limit bytes, each a rid-0 PUBLISH body.
 * The specification is zaichik.edge.websocket.parse_ws_publish_run_py. */
static PyObject *parse_ws_publish_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t at, end, limit, count = 0, used = 0, filled = 0;
    PyObject *groups = NULL, *unmasked = NULL;
    unsigned char *plain;
    struct run_slot table[RUN_SLOTS];
    if (run_args(args, nargs, "parse_ws_publish_run", &view, &at, &end, &limit) < 0)
        return NULL;
    memset(table, 0, sizeof(table));
    groups = PyDict_New();
    /* The unmasked bodies, one after another, in a bytes object that the
     * run's Entries point into (and keep), as parse_publish_run's point
     * into the read. */
    unmasked = PyBytes_FromStringAndSize(NULL, end > at ? end - at : 0);
    if (groups == NULL || unmasked == NULL)
        goto error;
    plain = (unsigned char *)PyBytes_AS_STRING(unmasked);
    PyObject *lazy = PyBytes_GET_SIZE(unmasked) <= 0xFFFFFFFFLL ? unmasked : NULL;
    const unsigned char *b = view.buf;
    while (end - at >= 2) {
        unsigned char first = b[at], second = b[at + 1];
        unsigned long long n = second & 0x7F;
        Py_ssize_t start = at + 6, i;
        if (first != 0x82 || !(second & 0x80))
            break;
        if (n == 126) {
            if (end - at < 4)
                break;
            n = be_read(b + at + 2, 2);
            start = at + 8;
        } else if (n == 127) {
            if (end - at < 10)
                break;
            n = be_read(b + at + 2, 8);
            start = at + 14;
        }
        if (n > (unsigned long long)limit || start > end || (Py_ssize_t)n > end - start)
            break;
        const unsigned char *src = b + start, *mask = b + start - 4;
        unsigned char *body = plain + filled;
        unsigned long long m8;
        memcpy(&m8, mask, 4);
        memcpy((unsigned char *)&m8 + 4, mask, 4);
        for (i = 0; i + 8 <= (Py_ssize_t)n; i += 8) {
            unsigned long long w;
            memcpy(&w, src + i, 8);
            w ^= m8;
            memcpy(body + i, &w, 8);
        }
        for (; i < (Py_ssize_t)n; i++)
            body[i] = src[i] ^ mask[i & 3];
        int ok = run_add(groups, table, &used, body, (Py_ssize_t)n, lazy);
        if (ok < 0)
            goto error;
        if (ok == 0)
            break;
        filled += (Py_ssize_t)n;
        at = start + (Py_ssize_t)n;
        count++;
    }
    Py_DECREF(unmasked); /* (the Entries hold it where they need it) */
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nnn)", groups, count, at);
error:
    Py_XDECREF(unmasked);
    Py_XDECREF(groups);
    PyBuffer_Release(&view);
    return NULL;
}

/* Length-prefixed frames as WebSocket binary messages from the server (not
 * masked), one after another.  The specification is
 * zaichik.edge.websocket.ws_frames_py (which raises struct.error for a cut
 * length and slices short a cut frame). */
static PyObject *ws_frames(PyObject *self, PyObject *data)
{
    Py_buffer view;
    PyObject *out = NULL;
    Py_ssize_t at = 0, size = 0, n;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *b = view.buf;
    n = view.len;
    for (int pass = 0; pass < 2; pass++) {
        unsigned char *p = pass ? (unsigned char *)PyBytes_AS_STRING(out) : NULL;
        at = 0;
        while (at < n) {
            if (n - at < 4) {
                PyErr_Format(struct_error, "unpack_from requires a buffer of at least %zd bytes for unpacking 4 "
                             "bytes at offset %zd (actual buffer size is %zd)", at + 4, at, n);
                goto done;
            }
            unsigned long long length = be_read(b + at, 4);
            Py_ssize_t start = at + 4, take = (Py_ssize_t)length < n - start ? (Py_ssize_t)length : n - start;
            int head = length < 126 ? 2 : length < 65536 ? 4 : 10;
            if (pass) {
                p[0] = 0x82;
                if (head == 2) {
                    p[1] = (unsigned char)length;
                } else if (head == 4) {
                    p[1] = 126;
                    be_write(p + 2, length, 2);
                } else {
                    p[1] = 127;
                    be_write(p + 2, length, 8);
                }
                memcpy(p + head, b + start, take);
                p += head + take;
            } else {
                size += head + take;
            }
            at = start + (Py_ssize_t)length;
        }
        if (!pass) {
            out = PyBytes_FromStringAndSize(NULL, size);
            if (out == NULL)
                goto done;
        }
    }
done:
    if (PyErr_Occurred())
        Py_CLEAR(out);
    PyBuffer_Release(&view);
    return out;
}

/* -- message_frame ----------------------------------------------------------- */

/* One MESSAGE frame (a new bytes), or NULL with struct.error set, as
 * message_frame_py raises it. */
static PyObject *make_frame(const Py_buffer *prefix, unsigned long long offset, unsigned long long timestamp,
                            PyObject *key_obj, PyObject *value_obj)
{
    Py_buffer key, value;
    PyObject *out = NULL;
    int have_key = 0;

    if (PyObject_GetBuffer(value_obj, &value, PyBUF_SIMPLE) < 0)
        return NULL;
    if (key_obj != Py_None) {
        if (PyObject_GetBuffer(key_obj, &key, PyBUF_SIMPLE) < 0)
            goto done;
        have_key = 1;
    }
    Py_ssize_t key_len = have_key ? key.len : 0;
    if (key_len > 0xFFFF) {
        PyErr_SetString(struct_error, "'H' format requires 0 <= number <= 65535");
        goto done;
    }
    Py_ssize_t size = prefix->len + 22 + key_len + value.len;
    if (size > 0xFFFFFFFFLL || value.len > 0xFFFFFFFFLL) {
        PyErr_SetString(struct_error, "'I' format requires 0 <= number <= 4294967295");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, 4 + size);
    if (out == NULL)
        goto done;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    be_write(p, (unsigned long long)size, 4);
    p += 4;
    memcpy(p, prefix->buf, prefix->len);
    p += prefix->len;
    be_write(p, offset, 8);
    be_write(p + 8, timestamp, 8);
    be_write(p + 16, (unsigned long long)key_len, 2);
    p += 18;
    if (key_len) {
        memcpy(p, key.buf, key_len);
        p += key_len;
    }
    be_write(p, (unsigned long long)value.len, 4);
    memcpy(p + 4, value.buf, value.len);
done:
    if (have_key)
        PyBuffer_Release(&key);
    PyBuffer_Release(&value);
    return out;
}

static PyObject *message_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("message_frame", nargs, 5))
        return NULL;
    unsigned long long offset, timestamp;
    Py_buffer prefix;
    PyObject *out = NULL;
    if (PyObject_GetBuffer(args[0], &prefix, PyBUF_SIMPLE) < 0)
        return NULL;
    if (as_u64(args[1], &offset) == 0 && as_u64(args[2], &timestamp) == 0)
        out = make_frame(&prefix, offset, timestamp, args[3], args[4]);
    PyBuffer_Release(&prefix);
    return out;
}

/* -- message_frames ------------------------------------------------------------ */

static PyObject *message_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("message_frames", nargs, 4))
        return NULL;
    unsigned long long first, timestamp;
    Py_buffer prefix;
    PyObject *entries = args[3], *out = NULL;
    if (!PyList_Check(entries)) {
        PyErr_SetString(PyExc_TypeError, "entries must be a list");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &prefix, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(entries), i;
    out = PyList_New(count);
    if (out == NULL)
        goto done;
    for (i = 0; i < count; i++) {
        PyObject *entry = PySequence_Fast(PyList_GET_ITEM(entries, i), "entries must be (key, value) pairs"), *frame;
        if (entry == NULL || PySequence_Fast_GET_SIZE(entry) != 2) {
            if (entry != NULL)
                PyErr_SetString(PyExc_ValueError, "entries must be (key, value) pairs");
            Py_XDECREF(entry);
            Py_CLEAR(out);
            goto done;
        }
        /* The numbers are checked after the first pair is, as the Python
         * twin does (which checks none for no entries). */
        if (i == 0 && (as_u64(args[1], &first) < 0 || as_u64(args[2], &timestamp) < 0)) {
            Py_DECREF(entry);
            Py_CLEAR(out);
            goto done;
        }
        if (first + (unsigned long long)i < first) {
            PyErr_SetString(struct_error, "argument out of range");
            Py_DECREF(entry);
            Py_CLEAR(out);
            goto done;
        }
        frame = make_frame(&prefix, first + (unsigned long long)i, timestamp,
                           PySequence_Fast_GET_ITEM(entry, 0), PySequence_Fast_GET_ITEM(entry, 1));
        Py_DECREF(entry);
        if (frame == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, frame);
    }
done:
    PyBuffer_Release(&prefix);
    return out;
}

/* plain_message_frames(prefix, first, timestamp, entries, max_body):
 * message_frames' result when no entry has a key and no frame's body is
 * over max_body; else None (the caller then takes the careful path, which
 * checks keys and sizes and says what is wrong).  One call where the
 * broker made three passes over each topic's share of a read (keys,
 * frames, largest frame): with 100 topics a read, those passes cost a
 * quarter of the broker's time per topic.  The specification is
 * zaichik.codec.plain_message_frames_py. */
static PyObject *plain_message_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("plain_message_frames", nargs, 5))
        return NULL;
    PyObject *entries = args[3];
    if (!PyList_Check(entries)) {
        PyErr_SetString(PyExc_TypeError, "entries must be a list");
        return NULL;
    }
    Py_ssize_t max_body = PyLong_AsSsize_t(args[4]);
    if (max_body == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(entries), i;
    for (i = 0; i < count; i++) {
        PyObject *entry = PyList_GET_ITEM(entries, i), *key;
        int keyed;
        if (PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 2) {
            key = PyTuple_GET_ITEM(entry, 0);
            keyed = key == Py_None ? 0 : PyObject_IsTrue(key);
        } else {
            /* Anything else as the twin's "for key, _ in entries" takes it. */
            PyObject *pair = PySequence_Fast(entry, "cannot unpack an entry");
            if (pair == NULL)
                return NULL;
            if (PySequence_Fast_GET_SIZE(pair) != 2) {
                Py_DECREF(pair);
                PyErr_SetString(PyExc_ValueError, "entries must be (key, value) pairs");
                return NULL;
            }
            keyed = PyObject_IsTrue(PySequence_Fast_GET_ITEM(pair, 0));
            Py_DECREF(pair);
        }
        if (keyed < 0)
            return NULL;
        if (keyed)
            Py_RETURN_NONE;
    }
    PyObject *frames = message_frames(self, args, 4);
    if (frames == NULL)
        return NULL;
    /* (Its own length: a key's __bool__ above could have changed the entries.) */
    for (i = 0; i < PyList_GET_SIZE(frames); i++) {
        if (PyBytes_GET_SIZE(PyList_GET_ITEM(frames, i)) - 4 > max_body) {
            Py_DECREF(frames);
            Py_RETURN_NONE;
        }
    }
    return frames;
}

/* A value to frame: where its bytes are, how many. */
struct value {
    const char *p;
    Py_ssize_t n;
};

/* The block of count unkeyed values (args as plain_message_block's), or None
 * when a frame's body would be over max_body. */
static PyObject *block_of(const Py_buffer *prefix, PyObject *const *args, const struct value *values,
                          Py_ssize_t count)
{
    unsigned long long first, timestamp;
    Py_ssize_t i, total = 0;
    PyObject *out = NULL;
    /* (Checked in the order message_frames_py meets them.) */
    if (as_u64(args[1], &first) < 0 || as_u64(args[2], &timestamp) < 0)
        goto done;
    if (first + (unsigned long long)(count - 1) < first) {
        PyErr_SetString(struct_error, "argument out of range");
        goto done;
    }
    Py_ssize_t max_body = PyLong_AsSsize_t(args[4]);
    if (max_body == -1 && PyErr_Occurred())
        goto done;
    int over = 0;
    for (i = 0; i < count; i++) {
        Py_ssize_t body = prefix->len + 22 + values[i].n;
        if (body > 0xFFFFFFFFLL) {
            PyErr_SetString(struct_error, "'I' format requires 0 <= number <= 4294967295");
            goto done;
        }
        over |= body > max_body;
        total += 4 + body;
    }
    if (over) {
        out = Py_None;
        Py_INCREF(out);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        goto done;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    for (i = 0; i < count; i++) {
        Py_ssize_t n = values[i].n;
        be_write(p, (unsigned long long)(prefix->len + 22 + n), 4);
        p += 4;
        memcpy(p, prefix->buf, prefix->len);
        p += prefix->len;
        be_write(p, first + (unsigned long long)i, 8);
        be_write(p + 8, timestamp, 8);
        be_write(p + 16, 0, 2);
        be_write(p + 18, (unsigned long long)n, 4);
        memcpy(p + 22, values[i].p, n);
        p += 22 + n;
    }
done:
    return out;
}

/* The values of a list of (None or b"", bytes) tuples, or of Entries
 * without keys (straight from the read), into a new array (*values, to
 * PyMem_Free); 0 if an entry is anything else, -1 on error. */
static int plain_values(PyObject *entries, struct value **values, Py_ssize_t *count)
{
    Py_ssize_t n, i;
    if (Py_TYPE(entries) == &EntriesType) {
        EntriesObject *e = (EntriesObject *)entries;
        const char *b = PyBytes_AS_STRING(e->data);
        n = e->n;
        for (i = 0; i < n; i++) {
            if (b[e->at[i]] | b[e->at[i] + 1])
                return 0; /* a key */
        }
        if ((*values = PyMem_Malloc((n ? n : 1) * sizeof(struct value))) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (i = 0; i < n; i++) {
            const unsigned char *entry = (const unsigned char *)b + e->at[i];
            (*values)[i].n = (Py_ssize_t)be_read(entry + 2, 4);
            (*values)[i].p = (const char *)entry + 6;
        }
        *count = n;
        return 1;
    }
    if (!PyList_Check(entries)) {
        PyErr_SetString(PyExc_TypeError, "entries must be a list");
        return -1;
    }
    n = PyList_GET_SIZE(entries);
    for (i = 0; i < n; i++) {
        PyObject *entry = PyList_GET_ITEM(entries, i), *key;
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2)
            return 0;
        key = PyTuple_GET_ITEM(entry, 0);
        if (!(key == Py_None || (PyBytes_CheckExact(key) && PyBytes_GET_SIZE(key) == 0))
                || !PyBytes_CheckExact(PyTuple_GET_ITEM(entry, 1)))
            return 0;
    }
    if ((*values = PyMem_Malloc((n ? n : 1) * sizeof(struct value))) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(PyList_GET_ITEM(entries, i), 1);
        (*values)[i].p = PyBytes_AS_STRING(value);
        (*values)[i].n = PyBytes_GET_SIZE(value);
    }
    *count = n;
    return 1;
}

/* plain_message_block(prefix, first, timestamp, entries, max_body): the
 * frames plain_message_frames would give, one after another in one bytes
 * object (a block), or None unless every entry is a (None or b"", bytes)
 * tuple (or a key-less Entries), there is at least one, and no frame's body is over max_body.
 * With many topics a read, each topic's frames lived as objects of their
 * own until the unit of work ended (up to eight reads: several MB of
 * small objects), fell out of the caches and were read again for the join
 * that sent them; a block is written once, in order, and sent as it is.
 * The specification is zaichik.codec.plain_message_block_py. */
static PyObject *plain_message_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("plain_message_block", nargs, 5))
        return NULL;
    /* The prefix's buffer first: asking for it could run Python code (a
     * __buffer__), which must not change the entries once they are read.
     * From there on no Python code runs, and Entries cannot change. */
    Py_buffer prefix;
    if (PyObject_GetBuffer(args[0], &prefix, PyBUF_SIMPLE) < 0)
        return NULL;
    struct value *values = NULL;
    Py_ssize_t count = 0;
    PyObject *out = NULL;
    int ok = plain_values(args[3], &values, &count);
    if (ok > 0 && count > 0)
        out = block_of(&prefix, args, values, count);
    else if (ok >= 0) {
        out = Py_None;
        Py_INCREF(out);
    }
    PyMem_Free(values);
    PyBuffer_Release(&prefix);
    return out;
}

/* The size (prefix included) of the whole length-prefixed frame at b[at:end],
 * or -1 if it is not whole there (compared unsigned: no length wraps). */
static Py_ssize_t whole_frame_at(const unsigned char *b, Py_ssize_t at, Py_ssize_t end)
{
    if (end - at < 4)
        return -1;
    unsigned long long n = be_read(b + at, 4);
    return n > (unsigned long long)(end - at - 4) ? -1 : 4 + (Py_ssize_t)n;
}

/* The length-prefixed frames of a block, each with its prefix, as a list of
 * bytes; ValueError if the block does not end with a whole frame.  The
 * specification is zaichik.codec.split_frames_py. */
static PyObject *split_frames(PyObject *self, PyObject *arg)
{
    Py_buffer block;
    if (PyObject_GetBuffer(arg, &block, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *b = block.buf;
    Py_ssize_t at = 0, end = block.len;
    PyObject *out = PyList_New(0);
    while (out != NULL && at < end) {
        Py_ssize_t size;
        if ((size = whole_frame_at(b, at, end)) < 0) {
            PyErr_SetString(PyExc_ValueError, "not whole frames");
            Py_CLEAR(out);
            break;
        }
        PyObject *frame = PyBytes_FromStringAndSize((const char *)b + at, size);
        if (frame == NULL || PyList_Append(out, frame) < 0)
            Py_CLEAR(out);
        Py_XDECREF(frame);
        at += size;
    }
    PyBuffer_Release(&block);
    return out;
}

/* -- Redis stream records ------------------------------------------------------- */

/* The records of unkeyed entries: >II (0, value length), value each.  The
 * specification is zaichik.storage.redis.encode_records_py. */
static PyObject *encode_records(PyObject *self, PyObject *entries)
{
    Py_ssize_t count, i, total = 0;
    PyObject *out;
    if (!PyList_Check(entries)) {
        PyErr_SetString(PyExc_TypeError, "entries must be a list");
        return NULL;
    }
    count = PyList_GET_SIZE(entries);
    for (i = 0; i < count; i++) {
        PyObject *entry = PyList_GET_ITEM(entries, i), *value;
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(entry, 1))) {
            PyErr_SetString(PyExc_TypeError, "entries must be (key, bytes) tuples");
            return NULL;
        }
        value = PyTuple_GET_ITEM(entry, 1);
        if (PyBytes_GET_SIZE(value) > 0xFFFFFFFFLL) {
            PyErr_SetString(struct_error, "'I' format requires 0 <= number <= 4294967295");
            return NULL;
        }
        total += 8 + PyBytes_GET_SIZE(value);
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    for (i = 0; i < count; i++) {
        PyObject *value = PyTuple_GET_ITEM(PyList_GET_ITEM(entries, i), 1);
        Py_ssize_t n = PyBytes_GET_SIZE(value);
        be_write(p, 0, 4);
        be_write(p + 4, (unsigned long long)n, 4);
        memcpy(p + 8, PyBytes_AS_STRING(value), n);
        p += 8 + n;
    }
    return out;
}

/* The MESSAGE frames of a stream entry's records, offsets from first.  The
 * specification is zaichik.storage.redis.decode_records_py (which slices
 * short what a short blob cuts, and raises struct.error for a cut head). */
static PyObject *decode_records(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("decode_records", nargs, 4))
        return NULL;
    unsigned long long first, timestamp;
    Py_buffer prefix, blob;
    PyObject *out = NULL;
    if (as_u64(args[1], &first) < 0 || as_u64(args[2], &timestamp) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &prefix, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &blob, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&prefix);
        return NULL;
    }
    const unsigned char *b = blob.buf;
    Py_ssize_t at = 0, end = blob.len, i = 0;
    out = PyList_New(0);
    while (out != NULL && at < end) {
        PyObject *key = Py_None, *value, *frame;
        if (end - at < 8) {
            PyErr_Format(struct_error, "unpack_from requires a buffer of at least %zd bytes for unpacking 8 "
                         "bytes at offset %zd (actual buffer size is %zd)", at + 8, at, end);
            Py_CLEAR(out);
            break;
        }
        Py_ssize_t klen = (Py_ssize_t)be_read(b + at, 4), vlen = (Py_ssize_t)be_read(b + at + 4, 4);
        at += 8;
        Py_ssize_t kn = klen < end - at ? klen : end - at;
        if (klen) {
            key = PyBytes_FromStringAndSize((const char *)b + at, kn);
            if (key == NULL) {
                Py_CLEAR(out);
                break;
            }
        } else {
            Py_INCREF(key);
        }
        at += klen;
        Py_ssize_t vstart = at < end ? at : end;
        Py_ssize_t vn = vlen < end - vstart ? vlen : end - vstart;
        value = PyBytes_FromStringAndSize((const char *)b + vstart, vn);
        at += vlen;
        if (value == NULL || first + (unsigned long long)i < first) {
            if (value != NULL)
                PyErr_SetString(struct_error, "argument out of range");
            Py_DECREF(key);
            Py_XDECREF(value);
            Py_CLEAR(out);
            break;
        }
        frame = make_frame(&prefix, first + (unsigned long long)i, timestamp, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (frame == NULL || PyList_Append(out, frame) < 0) {
            Py_XDECREF(frame);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(frame);
        i++;
    }
    PyBuffer_Release(&blob);
    PyBuffer_Release(&prefix);
    return out;
}

/* -- encode_batch ------------------------------------------------------------ */

#define BATCH_MAGIC "ZKB2"
#define CRC_FROM 12
#define REST 28  /* u64 first, u32 count, u64 first ts, u64 last ts */

static PyObject *with_crc(PyObject *out, unsigned char *p, Py_ssize_t length);

/* A batch of count records of total bytes, its header written but for the
 * CRC; *p is where the CRC starts (the sizes follow the REST bytes). */
static PyObject *new_batch(unsigned long long first, Py_ssize_t count, Py_ssize_t total,
                           unsigned long long first_ts, unsigned long long last_ts, unsigned char **p)
{
    Py_ssize_t length = REST + 4 * count + total;
    if (length > 0xFFFFFFFFLL) {
        PyErr_SetString(struct_error, "'I' format requires 0 <= number <= 4294967295");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, CRC_FROM + length);
    if (out == NULL)
        return NULL;
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out);
    memcpy(base, BATCH_MAGIC, 4);
    be_write(base + 4, (unsigned long long)length, 4);
    *p = base + CRC_FROM;
    be_write(*p, first, 8);
    be_write(*p + 8, (unsigned long long)count, 4);
    be_write(*p + 12, first_ts, 8);
    be_write(*p + 20, last_ts, 8);
    return out;
}

/* encode_batch of a block (plain_message_block's frames one after another):
 * the same batch as of its frames as a list. */
static PyObject *encode_block(PyObject *first_obj, PyObject *block, PyObject *skip_obj)
{
    unsigned long long first;
    if (as_u64(first_obj, &first) < 0)
        return NULL;
    Py_ssize_t skip = PyLong_AsSsize_t(skip_obj);
    if (skip == -1 && PyErr_Occurred())
        return NULL;
    if (skip < 0) {
        PyErr_SetString(PyExc_ValueError, "skip must not be negative");
        return NULL;
    }
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(block);
    Py_ssize_t end = PyBytes_GET_SIZE(block), at = 0, count = 0, total = 0, last = 0;
    while (at < end) {
        Py_ssize_t size;
        if ((size = whole_frame_at(b, at, end)) < 0) {
            PyErr_SetString(PyExc_ValueError, "not whole frames");
            return NULL;
        }
        last = at;
        total += size > skip ? size - skip : 0;
        count++;
        at += size;
    }
    if (count == 0) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return NULL;
    }
    /* (As encode_batch reads the first and last frames' timestamps.) */
    if (4 + (Py_ssize_t)be_read(b, 4) < skip + 16 || end - last < skip + 16) {
        PyErr_SetString(struct_error, "unpack_from requires a buffer of at least 16 bytes");
        return NULL;
    }
    if (count > 0xFFFFFFFFLL) {
        PyErr_SetString(struct_error, "too many frames");
        return NULL;
    }
    unsigned char *p;
    PyObject *out = new_batch(first, count, total, be_read(b + skip + 8, 8), be_read(b + last + skip + 8, 8), &p);
    if (out == NULL)
        return NULL;
    Py_ssize_t length = REST + 4 * count + total;
    unsigned char *sizes = p + REST, *records = sizes + 4 * count;
    for (at = 0; at < end;) {
        Py_ssize_t size = 4 + (Py_ssize_t)be_read(b + at, 4), n = size > skip ? size - skip : 0;
        be_write(sizes, (unsigned long long)n, 4);
        sizes += 4;
        memcpy(records, b + at + skip, n);
        records += n;
        at += size;
    }
    return with_crc(out, p, length);
}

static PyObject *encode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (wrong_nargs("encode_batch", nargs, 3))
        return NULL;
    PyObject *frames = args[1];
    unsigned long long first;
    if (PyBytes_Check(frames))
        return encode_block(args[0], frames, args[2]);
    if (!PyList_Check(frames)) {
        PyErr_SetString(PyExc_TypeError, "frames must be a list or a block");
        return NULL;
    }
    if (as_u64(args[0], &first) < 0)
        return NULL;
    Py_ssize_t skip = PyLong_AsSsize_t(args[2]);
    if (skip == -1 && PyErr_Occurred())
        return NULL;
    if (skip < 0) {
        PyErr_SetString(PyExc_ValueError, "skip must not be negative");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(frames), total = 0, i;
    if (count == 0) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return NULL;
    }
    if (count > 0xFFFFFFFFLL) {
        PyErr_SetString(struct_error, "too many frames");
        return NULL;
    }
    for (i = 0; i < count; i++) {
        PyObject *f = PyList_GET_ITEM(frames, i);
        if (!PyBytes_Check(f)) {
            PyErr_SetString(PyExc_TypeError, "frames must be bytes");
            return NULL;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(f) - skip;
        total += n > 0 ? n : 0;
    }
    unsigned long long ts[2];
    for (i = 0; i < 2; i++) {
        PyObject *f = PyList_GET_ITEM(frames, i ? count - 1 : 0);
        if (PyBytes_GET_SIZE(f) < skip + 16) {
            PyErr_SetString(struct_error, "unpack_from requires a buffer of at least 16 bytes");
            return NULL;
        }
        ts[i] = be_read((const unsigned char *)PyBytes_AS_STRING(f) + skip + 8, 8);
    }
    unsigned char *p;
    PyObject *out = new_batch(first, count, total, ts[0], ts[1], &p);
    if (out == NULL)
        return NULL;
    Py_ssize_t length = REST + 4 * count + total;
    unsigned char *sizes = p + REST, *records = sizes + 4 * count;
    for (i = 0; i < count; i++) {
        PyObject *f = PyList_GET_ITEM(frames, i);
        Py_ssize_t n = PyBytes_GET_SIZE(f) - skip;
        if (n < 0)
            n = 0;
        be_write(sizes + 4 * i, (unsigned long long)n, 4);
        memcpy(records, PyBytes_AS_STRING(f) + skip, n);
        records += n;
    }
    return with_crc(out, p, length);
}

/* The batch's CRC into its header: by a Python crc32 (zlib's or zlib-ng's,
 * see speedups.crc32), called on a view of the unfinished bytes, which
 * nobody else can see yet (no zlib to link against).  Steals out. */
static PyObject *with_crc(PyObject *out, unsigned char *p, Py_ssize_t length)
{
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out);
    PyObject *view = PyMemoryView_FromMemory((char *)p, length, PyBUF_READ);
    if (view == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *crc = PyObject_CallOneArg(zlib_crc32, view);
    Py_DECREF(view);
    if (crc == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    unsigned long c = PyLong_AsUnsignedLong(crc);
    Py_DECREF(crc);
    if (c == (unsigned long)-1 && PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    be_write(base + 8, c & 0xFFFFFFFFUL, 4);
    return out;
}

/* use_crc32(f): encode_batch's CRC by f (speedups.crc32) rather than zlib.crc32. */
static PyObject *use_crc32(PyObject *self, PyObject *f)
{
    if (!PyCallable_Check(f)) {
        PyErr_SetString(PyExc_TypeError, "crc32 must be callable");
        return NULL;
    }
    Py_INCREF(f);
    Py_SETREF(zlib_crc32, f);
    Py_RETURN_NONE;
}

/* -- module ------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"parse_publish", (PyCFunction)parse_publish, METH_O,
     "A PUBLISH body as (rid, topic, key, value), or None: see zaichik.codec.parse_publish."},
    {"parse_publish_batch", (PyCFunction)parse_publish_batch, METH_O,
     "A PUBLISH_BATCH body as (rid, topic, entries), or None: see zaichik.codec.parse_publish_batch_py."},
    {"parse_publish_run", (PyCFunction)(void (*)(void))parse_publish_run, METH_FASTCALL,
     "The run of rid-0 PUBLISH frames at data[at:end]: see zaichik.codec.parse_publish_run_py."},
    {"parse_ws_publish_run", (PyCFunction)(void (*)(void))parse_ws_publish_run, METH_FASTCALL,
     "The run of rid-0 PUBLISH WebSocket messages at data[at:end]: see zaichik.edge.websocket."},
    {"ws_frames", (PyCFunction)ws_frames, METH_O,
     "Length-prefixed frames as WebSocket binary messages: see zaichik.edge.websocket.ws_frames_py."},
    {"message_frames", (PyCFunction)(void (*)(void))message_frames, METH_FASTCALL,
     "MESSAGE frames for (key, value) entries from one offset on: see zaichik.codec.message_frames_py."},
    {"plain_message_frames", (PyCFunction)(void (*)(void))plain_message_frames, METH_FASTCALL,
     "message_frames of unkeyed entries, none too large, else None: see zaichik.codec.plain_message_frames_py."},
    {"plain_message_block", (PyCFunction)(void (*)(void))plain_message_block, METH_FASTCALL,
     "plain_message_frames joined in one bytes, else None: see zaichik.codec.plain_message_block_py."},
    {"split_frames", (PyCFunction)split_frames, METH_O,
     "The length-prefixed frames of a block, as a list: see zaichik.codec.split_frames_py."},
    {"message_frame", (PyCFunction)(void (*)(void))message_frame, METH_FASTCALL,
     "A whole MESSAGE frame: see zaichik.codec.message_frame."},
    {"encode_records", (PyCFunction)encode_records, METH_O,
     "A Redis stream entry's records: see zaichik.storage.redis.encode_records_py."},
    {"decode_records", (PyCFunction)(void (*)(void))decode_records, METH_FASTCALL,
     "The MESSAGE frames of a Redis stream entry's records: see zaichik.storage.redis.decode_records_py."},
    {"encode_batch", (PyCFunction)(void (*)(void))encode_batch, METH_FASTCALL,
     "A segment batch of MESSAGE frames: see zaichik.storage.segment.encode_batch."},
    {"use_crc32", (PyCFunction)use_crc32, METH_O,
     "encode_batch's CRC by the given crc32(data) (zaichik.speedups.crc32)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zaichik._speedups",
    "The broker's innermost loops in C (optional; see zaichik/_speedups.c).", -1, methods,
};

static PyObject *import_attr(const char *module_name, const char *name)
{
    PyObject *mod = PyImport_ImportModule(module_name), *attr;
    if (mod == NULL)
        return NULL;
    attr = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    return attr;
}

PyMODINIT_FUNC PyInit__speedups(void)
{
    struct_error = import_attr("struct", "error");
    if (struct_error == NULL)
        return NULL;
    if (PyType_Ready(&EntriesType) < 0)
        return NULL;
    zlib_crc32 = import_attr("zlib", "crc32");
    if (zlib_crc32 == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EntriesType);
    if (PyModule_AddObject(m, "Entries", (PyObject *)&EntriesType) < 0) {
        Py_DECREF(&EntriesType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
