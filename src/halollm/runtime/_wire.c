/* The data plane's per-datagram work in C: sealing and sending every fragment of a message
 * to every target in one sendmmsg, and receiving, parsing and opening a batch of datagrams
 * in one recvmmsg. The same wire format as protocol.py (which stays the reference: the
 * tests check that both produce and accept the same bytes); the AEAD is OpenSSL's
 * ChaCha20-Poly1305, the same cipher as the `cryptography` package's. recv_open leaves
 * replay windows and reassembly to Python (transport.py); a decode round's own partials are
 * taken in whole here (Gather, below: window, reassembly, checks, the float32 sum).
 *
 * Why: on a quarter-core coordinator a round's cost is per-datagram Python (building the
 * header, sealing, one sendto each; receiving, parsing, opening), not compute
 * (docs/results/hotpath.md, docs/results/native-wire.md). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "../half_float.h"

#define PREFIX_SIZE 28 /* magic .. phase, pad: every fragment of a message shares it */
#define HEADER_SIZE 44 /* prefix + fragment index, count, body length, counter */
#define TAG_SIZE 16
#define KEY_SIZE 32
#define MAX_DATAGRAM 65536
#define BATCH 64 /* datagrams per sendmmsg / recvmmsg call */
#define MAX_BODY (64u << 20)
#define WIRE_VERSION 3 /* protocol.VERSION: transport.py uses this module only if they agree */

static EVP_CIPHER_CTX *seal_ctx, *open_ctx;

static void put16(uint8_t *p, uint32_t v) { p[0] = v >> 8; p[1] = v; }
static void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)(v >> 32)); put32(p + 4, (uint32_t)v); }
static uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static void nonce(uint8_t out[12], uint32_t direction, uint64_t counter) {
    put32(out, direction);
    put64(out + 4, counter);
}

/* ChaCha20-Poly1305 of `n` bytes at `in` into `out` (ciphertext then tag), `aad` authenticated. */
static int seal(const uint8_t *key, const uint8_t iv[12], const uint8_t *aad, int aad_len,
                const uint8_t *in, int n, uint8_t *out) {
    int len;
    if (EVP_EncryptInit_ex(seal_ctx, NULL, NULL, key, iv) != 1) return -1;
    if (EVP_EncryptUpdate(seal_ctx, NULL, &len, aad, aad_len) != 1) return -1;
    if (n > 0 && EVP_EncryptUpdate(seal_ctx, out, &len, in, n) != 1) return -1;
    if (EVP_EncryptFinal_ex(seal_ctx, out + n, &len) != 1) return -1;
    return EVP_CIPHER_CTX_ctrl(seal_ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, out + n) == 1 ? 0 : -1;
}

/* The plaintext of `n` sealed bytes (ciphertext then tag) into `out`; -1 if forged. */
static int open_sealed(const uint8_t *key, const uint8_t iv[12], const uint8_t *aad, int aad_len,
                       const uint8_t *in, int n, uint8_t *out) {
    int len, m = n - TAG_SIZE;
    if (m < 0) return -1;
    if (EVP_DecryptInit_ex(open_ctx, NULL, NULL, key, iv) != 1) return -1;
    if (EVP_DecryptUpdate(open_ctx, NULL, &len, aad, aad_len) != 1) return -1;
    if (m > 0 && EVP_DecryptUpdate(open_ctx, out, &len, in, m) != 1) return -1;
    if (EVP_CIPHER_CTX_ctrl(open_ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, (void *)(in + m)) != 1)
        return -1;
    return EVP_DecryptFinal_ex(open_ctx, out + m, &len) == 1 ? 0 : -1;
}

/* Send `count` messages of the vector, retrying past a failing one; returns how many went. */
static int send_all(int fd, struct mmsghdr *msgs, int count, Py_ssize_t *errors) {
    int done = 0;
    while (done < count) {
        int chunk = count - done < BATCH ? count - done : BATCH;
        int r = sendmmsg(fd, msgs + done, chunk, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            (*errors)++; /* this datagram is lost, as the network would lose it */
            done++;
            continue;
        }
        done += r;
    }
    return done;
}

PyDoc_STRVAR(seal_send_doc,
"seal_send(fd, prefix, body, payload, targets) -> (sent, errors)\n\n"
"Seal every fragment of `body` (at most `payload` bytes each) for each target and send them\n"
"all with sendmmsg. `prefix`: the 28 header bytes every fragment shares; `targets`: a\n"
"sequence of (sockaddr, channel) -- a packed sockaddr_in from sockaddr() and the link's\n"
"Channel, whose 32-byte `key` and `direction` seal, and whose counter `sent` is advanced\n"
"here by the fragment count (fragment i is sealed with sent + 1 + i: a nonce is never\n"
"reused). A datagram the kernel refuses is counted in errors and lost, like on the network.");

/* A channel's (key, direction, counter), the counter advanced by `count` at once: even if
 * what follows fails, no counter is ever used twice. 0, or -1 with a Python error. */
static int take_counters(PyObject *ch, Py_buffer *key, unsigned int *direction,
                         uint64_t *counter, Py_ssize_t count) {
    PyObject *k = PyObject_GetAttrString(ch, "key");
    PyObject *d = k == NULL ? NULL : PyObject_GetAttrString(ch, "direction");
    PyObject *c = d == NULL ? NULL : PyObject_GetAttrString(ch, "sent");
    int rc = -1;
    if (c != NULL) {
        unsigned long dv = PyLong_AsUnsignedLong(d);
        unsigned long long cv = PyLong_AsUnsignedLongLong(c);
        if (!PyErr_Occurred()) {
            PyObject *next = PyLong_FromUnsignedLongLong(cv + (unsigned long long)count);
            if (next != NULL && PyObject_SetAttrString(ch, "sent", next) == 0 &&
                PyObject_GetBuffer(k, key, PyBUF_SIMPLE) == 0) {
                *direction = (unsigned int)dv;
                *counter = (uint64_t)cv;
                rc = 0;
            }
            Py_XDECREF(next);
        }
    }
    Py_XDECREF(k);
    Py_XDECREF(d);
    Py_XDECREF(c);
    return rc;
}

/* seal_send's work: 0, or -1 with a Python error. */
static int seal_send_to(int fd, const uint8_t *prefix, const uint8_t *body, Py_ssize_t n,
                        Py_ssize_t payload, PyObject *targets, Py_ssize_t *sent,
                        Py_ssize_t *errors) {
    PyObject *seq = NULL;
    uint8_t *buf = NULL;
    struct mmsghdr *msgs = NULL;
    struct iovec *iov = NULL;
    int rc = -1;
    if (payload < 1 || n > (Py_ssize_t)MAX_BODY) {
        PyErr_SetString(PyExc_ValueError, "bad payload size or body length");
        return -1;
    }
    seq = PySequence_Fast(targets, "targets must be a sequence");
    if (seq == NULL) return -1;
    Py_ssize_t nt = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t count = n == 0 ? 1 : (n + payload - 1) / payload;
    if (count > 65535) {
        PyErr_SetString(PyExc_ValueError, "too many fragments");
        goto done;
    }
    Py_ssize_t stride = HEADER_SIZE + payload + TAG_SIZE, total = nt * count;
    buf = PyMem_Malloc(total * stride + 1);
    msgs = PyMem_Calloc(total + 1, sizeof(struct mmsghdr));
    iov = PyMem_Calloc(total + 1, sizeof(struct iovec));
    if (buf == NULL || msgs == NULL || iov == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t t = 0; t < nt; t++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, t), *addr, *ch;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "a target is (sockaddr, channel)");
            goto done;
        }
        addr = PyTuple_GET_ITEM(item, 0);
        ch = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_Check(addr) || PyBytes_GET_SIZE(addr) != sizeof(struct sockaddr_in)) {
            PyErr_SetString(PyExc_ValueError, "bad sockaddr");
            goto done;
        }
        Py_buffer key;
        unsigned int direction;
        uint64_t counter;
        if (take_counters(ch, &key, &direction, &counter, count) != 0) goto done;
        int bad = key.len != KEY_SIZE;
        for (Py_ssize_t i = 0; !bad && i < count; i++, k++) {
            uint8_t *d = buf + k * stride, iv[12];
            Py_ssize_t off = i * payload, len = n - off < payload ? n - off : payload;
            uint64_t c = counter + 1 + (uint64_t)i;
            memcpy(d, prefix, PREFIX_SIZE);
            put16(d + 28, (uint32_t)i);
            put16(d + 30, (uint32_t)count);
            put32(d + 32, (uint32_t)n);
            put64(d + 36, c);
            nonce(iv, direction, c);
            if (seal(key.buf, iv, d, HEADER_SIZE, body + off, (int)len, d + HEADER_SIZE) != 0) {
                bad = 2;
                break;
            }
            iov[k].iov_base = d;
            iov[k].iov_len = HEADER_SIZE + len + TAG_SIZE;
            /* the sockaddr bytes belong to the targets, which outlive this call */
            msgs[k].msg_hdr.msg_name = PyBytes_AS_STRING(addr);
            msgs[k].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
            msgs[k].msg_hdr.msg_iov = &iov[k];
            msgs[k].msg_hdr.msg_iovlen = 1;
        }
        PyBuffer_Release(&key);
        if (bad) {
            PyErr_SetString(bad == 2 ? PyExc_RuntimeError : PyExc_ValueError,
                            bad == 2 ? "sealing failed" : "a channel's key must be 32 bytes");
            goto done;
        }
    }
    *errors = 0;
    *sent = send_all(fd, msgs, (int)total, errors) - *errors;
    rc = 0;
done:
    PyMem_Free(buf);
    PyMem_Free(msgs);
    PyMem_Free(iov);
    Py_XDECREF(seq);
    return rc;
}

static PyObject *seal_send(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    Py_ssize_t payload, sent, errors;
    Py_buffer prefix, body;
    PyObject *targets, *result = NULL;
    if (!PyArg_ParseTuple(args, "iy*y*nO", &fd, &prefix, &body, &payload, &targets)) return NULL;
    if (prefix.len != PREFIX_SIZE)
        PyErr_SetString(PyExc_ValueError, "bad prefix");
    else if (seal_send_to(fd, prefix.buf, body.buf, body.len, payload, targets, &sent,
                          &errors) == 0)
        result = Py_BuildValue("nn", sent, errors);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&body);
    return result;
}

PyDoc_STRVAR(recv_open_doc,
"recv_open(fd, limit, channel_for, kinds, phases) -> list\n\n"
"Receive up to `limit` datagrams waiting on the non-blocking socket `fd` (recvmmsg), check\n"
"and open each. Each item is either a str (why it was rejected: 'malformed',\n"
"'unknown_sender', 'unauthenticated', 'receive_error') or a tuple (channel, counter, kind,\n"
"sender, wire, (session, epoch, request, pos, ntok, layer, phase), index, count, body_len,\n"
"payload, (host, port)); consecutive fragments of a round share one tag tuple object (and of\n"
"a sender one address tuple). `channel_for(sender, session)` names the link (an object with\n"
"`key` and `direction`) or None. The caller checks each counter against its link's replay\n"
"window, then reassembles. `kinds`, `phases`: bit masks of the message kinds and round\n"
"phases a datagram may carry.");

static PyObject *reject(PyObject *out, const char *why) {
    PyObject *s = PyUnicode_InternFromString(why);
    if (s == NULL) return NULL;
    int r = PyList_Append(out, s);
    Py_DECREF(s);
    return r == 0 ? out : NULL;
}

/* The tag and address tuples of the last datagram opened, handed out again while the next
 * ones carry the same values (a round's datagrams all share its tag, a worker's fragments its
 * address): fewer objects built per datagram. Held under the GIL, like everything here. */
static uint32_t last_tag[7];
static PyObject *last_tag_obj;
static struct sockaddr_in last_from;
static PyObject *last_from_obj;

static PyObject *tag_tuple(const uint32_t v[7]) {
    if (last_tag_obj == NULL || memcmp(v, last_tag, sizeof last_tag) != 0) {
        PyObject *t = PyTuple_New(7);
        if (t == NULL) return NULL;
        for (int i = 0; i < 7; i++) {
            PyObject *x = PyLong_FromUnsignedLong(v[i]);
            if (x == NULL) {
                Py_DECREF(t);
                return NULL;
            }
            PyTuple_SET_ITEM(t, i, x);
        }
        Py_XSETREF(last_tag_obj, t);
        memcpy(last_tag, v, sizeof last_tag);
    }
    Py_INCREF(last_tag_obj);
    return last_tag_obj;
}

static PyObject *addr_tuple(const struct sockaddr_in *from) {
    if (last_from_obj == NULL || from->sin_addr.s_addr != last_from.sin_addr.s_addr ||
        from->sin_port != last_from.sin_port) {
        char host[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &from->sin_addr, host, sizeof host);
        PyObject *a = Py_BuildValue("(si)", host, (int)ntohs(from->sin_port));
        if (a == NULL) return NULL;
        Py_XSETREF(last_from_obj, a);
        last_from = *from;
    }
    Py_INCREF(last_from_obj);
    return last_from_obj;
}

/* A datagram's clear header, parsed. */
typedef struct {
    uint32_t kind, sender, wire, tag[7], index, count, body_len; /* tag: RoundTag's order */
    uint64_t counter;
} Header;

/* Parse and check a datagram's header as protocol.decode does before opening it: NULL, or
 * why it is refused. `kinds`, `phases`: bit masks of the message kinds and round phases a
 * datagram may carry. */
static const char *parse_header(const uint8_t *d, Py_ssize_t n, unsigned long kinds,
                                unsigned long phases, Header *h) {
    if (n < HEADER_SIZE + TAG_SIZE) return "malformed";
    if (d[0] != 'H' || d[1] != 'L' || d[2] != WIRE_VERSION) return "malformed";
    h->kind = d[3];
    h->sender = d[4];
    h->wire = d[5];
    h->tag[0] = get32(d + 6);  /* session */
    h->tag[1] = get32(d + 10); /* epoch */
    h->tag[2] = get32(d + 14); /* request */
    h->tag[3] = get32(d + 18); /* pos */
    h->tag[4] = get16(d + 22); /* ntok */
    h->tag[5] = get16(d + 24); /* layer */
    h->tag[6] = d[26];         /* phase */
    h->index = get16(d + 28);
    h->count = get16(d + 30);
    h->body_len = get32(d + 32);
    h->counter = get64(d + 36);
    if (h->kind >= 32 || h->tag[6] >= 32 || !(kinds >> h->kind & 1) ||
        !(phases >> h->tag[6] & 1))
        return "malformed";
    if (h->count == 0 || h->index >= h->count || h->body_len > MAX_BODY) return "malformed";
    return NULL;
}

/* One received datagram with a sound header: opened with the channel `channel_for` names
 * and appended to `out` as a fragment, or as the reason it was refused; NULL on a Python
 * error. */
static PyObject *open_one(PyObject *out, const uint8_t *d, Py_ssize_t n, const Header *h,
                          const struct sockaddr_in *from, PyObject *channel_for,
                          uint8_t *plain) {
    uint32_t kind = h->kind, sender = h->sender, wire = h->wire, session = h->tag[0];
    uint32_t index = h->index, count = h->count, body_len = h->body_len;
    uint64_t counter = h->counter;
    PyObject *channel = PyObject_CallFunction(channel_for, "kk", (unsigned long)sender,
                                              (unsigned long)session);
    if (channel == NULL) return NULL;
    if (channel == Py_None) {
        Py_DECREF(channel);
        return reject(out, "unknown_sender");
    }
    PyObject *key = PyObject_GetAttrString(channel, "key");
    PyObject *dir = key == NULL ? NULL : PyObject_GetAttrString(channel, "direction");
    if (dir == NULL || !PyBytes_Check(key) || PyBytes_GET_SIZE(key) != KEY_SIZE) {
        Py_XDECREF(key);
        Py_XDECREF(dir);
        Py_DECREF(channel);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a channel needs a 32-byte key");
        return NULL;
    }
    long direction = PyLong_AsLong(dir);
    Py_DECREF(dir);
    uint8_t iv[12];
    nonce(iv, (uint32_t)(1 - direction), counter);
    Py_ssize_t m = n - HEADER_SIZE - TAG_SIZE;
    int forged = open_sealed((const uint8_t *)PyBytes_AS_STRING(key), iv, d, HEADER_SIZE,
                             d + HEADER_SIZE, (int)(n - HEADER_SIZE), plain);
    Py_DECREF(key);
    if (forged) {
        Py_DECREF(channel);
        return reject(out, "unauthenticated");
    }
    if ((uint64_t)m > body_len) {
        Py_DECREF(channel);
        return reject(out, "malformed");
    }
    PyObject *tag = tag_tuple(h->tag), *addr = tag == NULL ? NULL : addr_tuple(from);
    PyObject *item = addr == NULL ? NULL : PyTuple_New(11);
    if (item == NULL) {
        Py_XDECREF(tag);
        Py_XDECREF(addr);
        Py_DECREF(channel);
        return NULL;
    }
    PyTuple_SET_ITEM(item, 0, channel);
    PyTuple_SET_ITEM(item, 1, PyLong_FromUnsignedLongLong(counter));
    PyTuple_SET_ITEM(item, 2, PyLong_FromUnsignedLong(kind));
    PyTuple_SET_ITEM(item, 3, PyLong_FromUnsignedLong(sender));
    PyTuple_SET_ITEM(item, 4, PyLong_FromUnsignedLong(wire));
    PyTuple_SET_ITEM(item, 5, tag);
    PyTuple_SET_ITEM(item, 6, PyLong_FromUnsignedLong(index));
    PyTuple_SET_ITEM(item, 7, PyLong_FromUnsignedLong(count));
    PyTuple_SET_ITEM(item, 8, PyLong_FromUnsignedLong(body_len));
    PyTuple_SET_ITEM(item, 9, PyBytes_FromStringAndSize((const char *)plain, m));
    PyTuple_SET_ITEM(item, 10, addr);
    for (int i = 1; i < 10; i++)
        if (PyTuple_GET_ITEM(item, i) == NULL) {
            Py_DECREF(item);
            return NULL;
        }
    int r = PyList_Append(out, item);
    Py_DECREF(item);
    return r == 0 ? out : NULL;
}

/* What becomes of one received datagram with a sound header: appended to `out` (as
 * open_one does), or taken in by `ctx` (a Gather); NULL on a Python error. */
typedef PyObject *(*datagram_fn)(void *ctx, PyObject *out, const uint8_t *d, Py_ssize_t n,
                                 const Header *h, const struct sockaddr_in *from,
                                 PyObject *channel_for, uint8_t *plain);

static PyObject *open_into(void *ctx, PyObject *out, const uint8_t *d, Py_ssize_t n,
                           const Header *h, const struct sockaddr_in *from,
                           PyObject *channel_for, uint8_t *plain) {
    (void)ctx;
    return open_one(out, d, n, h, from, channel_for, plain);
}

/* What a receive is asked: recv_open's, Gather.pump's and Gather.wait's arguments. */
typedef struct {
    int fd, limit;
    PyObject *channel_for;
    unsigned long kinds, phases;
} Receive;

/* `timeout`, `coalesce`: NULL, or where Gather.wait's extra arguments go (coalesce is
 * optional: left as it is when not given). */
static int receive_args(PyObject *args, Receive *r, double *timeout, double *coalesce) {
    if (timeout == NULL)
        return PyArg_ParseTuple(args, "iiOkk", &r->fd, &r->limit, &r->channel_for, &r->kinds,
                                &r->phases);
    return PyArg_ParseTuple(args, "iiOkkd|d", &r->fd, &r->limit, &r->channel_for, &r->kinds,
                            &r->phases, timeout, coalesce);
}

/* recv_open's and Gather's loop: up to `limit` datagrams waiting on `fd`, read with
 * recvmmsg, each to `fn`, whose items are appended to `out`. 0, or -1 on a Python error. */
static int receive_batch(const Receive *r, datagram_fn fn, void *ctx, PyObject *out) {
    int fd = r->fd, limit = r->limit;
    PyObject *channel_for = r->channel_for;
    unsigned long kinds = r->kinds, phases = r->phases;
    /* one receive at a time per process: channel_for runs Python, during which another
     * thread could enter here and overwrite these buffers; that is refused, not shared */
    static uint8_t bufs[BATCH][MAX_DATAGRAM], plain[MAX_DATAGRAM];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    static struct sockaddr_in from[BATCH];
    static int busy;
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "a receive is already running in another thread");
        return -1;
    }
    busy = 1;
    while (limit > 0) {
        int want = limit < BATCH ? limit : BATCH;
        for (int i = 0; i < want; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = MAX_DATAGRAM;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int got = recvmmsg(fd, msgs, want, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (reject(out, "receive_error") == NULL) goto fail; /* e.g. ICMP unreachable */
            limit--;
            continue;
        }
        for (int i = 0; i < got; i++) {
            Header h;
            const char *why = parse_header(bufs[i], (Py_ssize_t)msgs[i].msg_len, kinds,
                                           phases, &h);
            if ((why != NULL ? reject(out, why)
                             : fn(ctx, out, bufs[i], (Py_ssize_t)msgs[i].msg_len, &h,
                                  &from[i], channel_for, plain)) == NULL)
                goto fail;
        }
        limit -= got;
        if (got < want) break;
    }
    busy = 0;
    return 0;
fail:
    busy = 0;
    return -1;
}

static PyObject *recv_open(PyObject *self, PyObject *args) {
    (void)self;
    Receive r;
    if (!receive_args(args, &r, NULL, NULL)) return NULL;
    PyObject *out = PyList_New(0);
    if (out != NULL && receive_batch(&r, open_into, NULL, out) != 0) Py_CLEAR(out);
    return out;
}


/* ---------------------------------------------------------------------------------------
 * Window: a link's replay window (channel.py's ReplayWindow, the same rules) that this file
 * can check and advance without calling Python: Channel uses it where this module is built.
 * Bit i of the bitmap: counter `highest - i` was accepted. */

typedef struct {
    PyObject_HEAD
    uint64_t highest;
    Py_ssize_t size, words;
    uint64_t *bits;
} Window;

static int window_init(Window *w, PyObject *args, PyObject *kw) {
    Py_ssize_t size = 1024;
    static char *names[] = {"size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n", names, &size)) return -1;
    if (size < 1 || size > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "window size must be 1..1048576");
        return -1;
    }
    PyMem_Free(w->bits);
    w->size = size;
    w->words = (size + 63) / 64;
    w->bits = PyMem_Calloc((size_t)w->words, sizeof(uint64_t));
    w->highest = 0;
    if (w->bits == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void window_dealloc(Window *w) {
    PyMem_Free(w->bits);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

/* NULL if counter may be accepted, else why not */
static const char *window_check(const Window *w, uint64_t counter) {
    if (counter == 0) return "too_old";
    if (counter > w->highest) return NULL;
    uint64_t behind = w->highest - counter;
    if (behind >= (uint64_t)w->size) return "too_old";
    return (w->bits[behind / 64] >> (behind % 64) & 1) ? "replayed" : NULL;
}

static void window_take(Window *w, uint64_t counter) {
    if (counter > w->highest) {
        uint64_t shift = counter - w->highest;
        if (shift >= (uint64_t)w->size) {
            memset(w->bits, 0, (size_t)w->words * sizeof(uint64_t));
        } else {
            Py_ssize_t ws = (Py_ssize_t)(shift / 64);
            unsigned bs = (unsigned)(shift % 64);
            for (Py_ssize_t i = w->words - 1; i >= 0; i--) {
                uint64_t hi = i - ws >= 0 ? w->bits[i - ws] : 0;
                uint64_t lo = i - ws - 1 >= 0 ? w->bits[i - ws - 1] : 0;
                w->bits[i] = bs ? (hi << bs | lo >> (64 - bs)) : hi;
            }
            Py_ssize_t extra = w->words * 64 - w->size; /* bits beyond the window: cleared */
            if (extra) w->bits[w->words - 1] &= ~(uint64_t)0 >> extra;
        }
        w->bits[0] |= 1;
        w->highest = counter;
    } else {
        uint64_t behind = w->highest - counter;
        w->bits[behind / 64] |= (uint64_t)1 << (behind % 64);
    }
}

static int counter_arg(PyObject *arg, uint64_t *counter) {
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) return -1;
    *counter = v < 0 ? 0 : (uint64_t)v;
    return 0;
}

static PyObject *window_fresh(Window *w, PyObject *arg) {
    uint64_t counter;
    if (counter_arg(arg, &counter) != 0) return NULL;
    const char *why = window_check(w, counter);
    if (why == NULL) Py_RETURN_NONE;
    return PyUnicode_InternFromString(why);
}

static PyObject *window_accept(Window *w, PyObject *arg) {
    uint64_t counter;
    if (counter_arg(arg, &counter) != 0) return NULL;
    if (counter > 0) window_take(w, counter);
    Py_RETURN_NONE;
}

static PyObject *window_highest(Window *w, void *closure) {
    return PyLong_FromUnsignedLongLong(w->highest);
}

static PyMethodDef window_methods[] = {
    {"fresh", (PyCFunction)window_fresh, METH_O,
     "fresh(counter) -> None if counter may be accepted, else 'replayed' or 'too_old'"},
    {"accept", (PyCFunction)window_accept, METH_O, "accept(counter): record it (after opening)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef window_getset[] = {
    {"highest", (getter)window_highest, NULL, "the highest counter accepted", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WindowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "halollm.runtime._wire.Window",
    .tp_basicsize = sizeof(Window),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Window(size=1024): a replay window (channel.ReplayWindow's rules) in C",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)window_init,
    .tp_dealloc = (destructor)window_dealloc,
    .tp_methods = window_methods,
    .tp_getset = window_getset,
};

/* ---------------------------------------------------------------------------------------
 * Gather: a decode round's partials, taken in here. The datagrams of this round from its
 * workers are opened, checked against their link's replay window, reassembled, checked (the
 * body's size, finite values) and added into one float32 output (a sum, or each sender at
 * its own span: a concatenation); everything else (other
 * rounds' late partials, strangers, what is rejected) is handed back as recv_open would,
 * for the Python path. transport.py and rounds.py use it; protocol.py and tensor_codec.py
 * are the reference it must agree with (tests/test_native_wire.py). */

#define MAX_SLOTS 255
#define MAX_FRAGS 32
#define PARTIAL_KIND 2
#define WIRE_FP32 0
#define WIRE_FP16 1
#define WIRE_BF16 2
#define WIRE_INT8 3
#define Q8_BLOCK 32

typedef struct {
    int sender, done;
    uint32_t offset, length; /* where its values go in the output, and how many */
    PyObject *channel;   /* its link's data channel */
    const uint8_t *key;  /* the channel's key bytes (held by `channel`) */
    int direction;
    Window *window;
    uint32_t count, body_len, have, held;
    uint8_t *frag[MAX_FRAGS];
    uint32_t flen[MAX_FRAGS];
    double arrived_at;
} Slot;

typedef struct {
    PyObject_HEAD
    uint32_t tag[7];
    int wire, dim, nslots, narrived, nreported;
    Py_ssize_t taken; /* datagrams taken in by the current pump */
    Slot *slots;
    float *sum;
    int order[MAX_SLOTS];  /* slots in the order their partials completed */
} Gather;

static void slot_reset(Slot *s) {
    for (uint32_t i = 0; i < MAX_FRAGS; i++) {
        PyMem_Free(s->frag[i]);
        s->frag[i] = NULL;
        s->flen[i] = 0;
    }
    s->count = s->body_len = s->have = s->held = 0;
}

static void gather_dealloc(Gather *g) {
    for (int i = 0; g->slots != NULL && i < g->nslots; i++) {
        slot_reset(&g->slots[i]);
        Py_XDECREF(g->slots[i].channel);
        Py_XDECREF((PyObject *)g->slots[i].window);
    }
    PyMem_Free(g->slots);
    PyMem_Free(g->sum);
    Py_TYPE(g)->tp_free((PyObject *)g);
}

/* A slot's span: (offset, length) from `spans` (None: the whole output, a sum) */
static int slot_span(Slot *s, PyObject *spans, int i, int dim) {
    if (spans == Py_None) {
        s->offset = 0;
        s->length = (uint32_t)dim;
        return 0;
    }
    long offset, length;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(spans, i), "ll", &offset, &length)) return -1;
    if (offset < 0 || length < 1 || offset + length > dim) {
        PyErr_SetString(PyExc_ValueError, "a span must lie inside the output");
        return -1;
    }
    s->offset = (uint32_t)offset;
    s->length = (uint32_t)length;
    return 0;
}

static int gather_init(Gather *g, PyObject *args, PyObject *kw) {
    PyObject *tag, *senders, *channels, *spans = Py_None;
    if (!PyArg_ParseTuple(args, "OOOii|O", &tag, &senders, &channels, &g->wire, &g->dim,
                          &spans))
        return -1;
    if (!PyTuple_Check(tag) || PyTuple_GET_SIZE(tag) != 7 || !PyList_Check(senders) ||
        !PyList_Check(channels) || PyList_GET_SIZE(senders) != PyList_GET_SIZE(channels) ||
        PyList_GET_SIZE(senders) > MAX_SLOTS || g->wire < 0 || g->wire > 3 || g->dim < 1 ||
        (spans != Py_None &&
         (!PyList_Check(spans) || PyList_GET_SIZE(spans) != PyList_GET_SIZE(senders))) ||
        g->slots != NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "Gather(tag 7-tuple, senders, channels, wire, dim[, spans])");
        return -1;
    }
    for (int i = 0; i < 7; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(tag, i));
        if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
        g->tag[i] = (uint32_t)v;
    }
    if (g->tag[4] != 1) {
        PyErr_SetString(PyExc_ValueError, "Gather takes decode rounds (one token)");
        return -1;
    }
    g->nslots = (int)PyList_GET_SIZE(senders);
    g->slots = PyMem_Calloc((size_t)g->nslots + 1, sizeof(Slot));
    g->sum = PyMem_Calloc((size_t)g->dim, sizeof(float));
    if (g->slots == NULL || g->sum == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < g->nslots; i++) {
        Slot *s = &g->slots[i];
        PyObject *ch = PyList_GET_ITEM(channels, i);
        long sender = PyLong_AsLong(PyList_GET_ITEM(senders, i));
        if (sender == -1 && PyErr_Occurred()) return -1;
        PyObject *key = PyObject_GetAttrString(ch, "key");
        PyObject *dir = key == NULL ? NULL : PyObject_GetAttrString(ch, "direction");
        PyObject *win = dir == NULL ? NULL : PyObject_GetAttrString(ch, "window");
        int ok = win != NULL && PyBytes_Check(key) && PyBytes_GET_SIZE(key) == KEY_SIZE &&
                 Py_TYPE(win) == &WindowType;
        long direction = ok ? PyLong_AsLong(dir) : 0;
        Py_XDECREF(key); /* the channel holds its key: the pointer stays valid */
        Py_XDECREF(dir);
        if (!ok) {
            Py_XDECREF(win);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError,
                                "a channel needs a 32-byte key and a _wire.Window");
            return -1;
        }
        Py_INCREF(ch);
        s->channel = ch;
        s->key = (const uint8_t *)PyBytes_AS_STRING(key);
        s->direction = (int)direction;
        s->window = (Window *)win;
        s->sender = (int)sender;
        if (slot_span(s, spans, i, g->dim) != 0) return -1;
    }
    return 0;
}

static int blocks(int dim) { return (dim + Q8_BLOCK - 1) / Q8_BLOCK; }

/* Where the values of body b (n bytes) start if it holds its groups and ntok x dim finite
 * values in `wire` (tensor_codec.check_body's rules), else -1 and *why says what is wrong */
static Py_ssize_t body_check(int wire, const uint8_t *b, Py_ssize_t n, long ntok, long dim,
                             const char **why) {
    if (n < 2) {
        *why = "body too short";
        return -1;
    }
    Py_ssize_t off = 2 + 2 * (Py_ssize_t)get16(b), count = (Py_ssize_t)ntok * dim;
    Py_ssize_t nb = (Py_ssize_t)ntok * blocks((int)dim);
    Py_ssize_t need = wire == WIRE_INT8 ? nb * (2 + Q8_BLOCK) : count * (wire == WIRE_FP32 ? 4 : 2);
    if (n != off + need) {
        *why = "body does not hold its groups and values";
        return -1;
    }
    const uint8_t *v = b + off;
    int finite = 1;
    if (wire == WIRE_FP32) {
        for (Py_ssize_t i = 0; i < count && finite; i++) { /* little-endian float32 */
            uint32_t bits = (uint32_t)v[4 * i + 2] << 16 | (uint32_t)v[4 * i + 3] << 24;
            finite = (bits & 0x7f800000u) != 0x7f800000u;
        }
    } else { /* 16-bit values, or int8's float16 scales */
        uint16_t mask = wire == WIRE_BF16 ? 0x7F80 : 0x7C00;
        Py_ssize_t k = wire == WIRE_INT8 ? nb : count;
        for (Py_ssize_t i = 0; i < k && finite; i++)
            finite = ((uint16_t)(v[2 * i] | v[2 * i + 1] << 8) & mask) != mask;
    }
    if (!finite) {
        *why = "non-finite values";
        return -1;
    }
    return off;
}

/* A complete body of slot `s`: checked (body_check) and added into the output at the slot's
 * span; 0 if added, else the reason it was refused (nothing is added then) */
static const char *take_body(Gather *g, const Slot *s, const uint8_t *b, uint32_t n) {
    const char *why;
    uint32_t dim = s->length;
    Py_ssize_t off = body_check(g->wire, b, n, 1, dim, &why);
    if (off < 0) return "malformed";
    const uint8_t *v = b + off;
    float *sum = g->sum + s->offset;
    if (g->wire == WIRE_BF16 || g->wire == WIRE_FP16) {
        for (uint32_t i = 0; i < dim; i++) {
            uint16_t h = (uint16_t)(v[2 * i] | v[2 * i + 1] << 8);
            sum[i] += g->wire == WIRE_BF16 ? bfloat16_to_float(h) : half_to_float(h);
        }
    } else if (g->wire == WIRE_FP32) {
        for (uint32_t i = 0; i < dim; i++) {
            uint32_t bits = (uint32_t)v[4 * i] | (uint32_t)v[4 * i + 1] << 8 |
                            (uint32_t)v[4 * i + 2] << 16 | (uint32_t)v[4 * i + 3] << 24;
            float f;
            memcpy(&f, &bits, sizeof f);
            sum[i] += f;
        }
    } else { /* int8: the float16 scales, then 32 int8 values per block */
        int nb = blocks((int)dim);
        const int8_t *q = (const int8_t *)(v + 2 * nb);
        for (uint32_t i = 0; i < dim; i++) {
            uint32_t k = i / Q8_BLOCK;
            float scale = half_to_float((uint16_t)(v[2 * k] | v[2 * k + 1] << 8));
            sum[i] += (float)q[i] * scale;
        }
    }
    return NULL;
}

PyDoc_STRVAR(body_values_doc,
             "body_values(body, wire, ntok, dim) -> (groups, bytearray): a message body's "
             "groups and its ntok x dim values, checked as tensor_codec.check_body checks them "
             "(ValueError says what is wrong): the wire's own 16- or 32-bit values, or float32 "
             "for int8 (each value times its block's scale, as tensor_codec does it).");

static PyObject *body_values(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int wire;
    long ntok, dim;
    if (!PyArg_ParseTuple(args, "y*ill", &buf, &wire, &ntok, &dim)) return NULL;
    PyObject *groups = NULL, *out = NULL;
    const uint8_t *b = buf.buf;
    const char *why = NULL;
    if (wire < WIRE_FP32 || wire > WIRE_INT8 || ntok < 1 || dim < 1 || ntok > (1L << 20) ||
        dim > (1L << 24)) {
        PyErr_SetString(PyExc_ValueError, "unknown wire format or shape");
        goto done;
    }
    Py_ssize_t off = body_check(wire, b, buf.len, ntok, dim, &why);
    if (off < 0) {
        PyErr_SetString(PyExc_ValueError, why);
        goto done;
    }
    Py_ssize_t ng = (off - 2) / 2, count = (Py_ssize_t)ntok * dim;
    groups = PyTuple_New(ng);
    if (groups == NULL) goto done;
    for (Py_ssize_t i = 0; i < ng; i++) {
        PyObject *g = PyLong_FromUnsignedLong(get16(b + 2 + 2 * i));
        if (g == NULL) goto done;
        PyTuple_SET_ITEM(groups, i, g);
    }
    const uint8_t *v = b + off;
    if (wire != WIRE_INT8) {
        out = PyByteArray_FromStringAndSize((const char *)v, buf.len - off);
    } else {
        out = PyByteArray_FromStringAndSize(NULL, count * 4);
        if (out == NULL) goto done;
        float *f = (float *)PyByteArray_AS_STRING(out);
        Py_ssize_t nb = blocks((int)dim); /* blocks per row: each row padded to whole blocks */
        const int8_t *q = (const int8_t *)(v + 2 * nb * ntok);
        for (long r = 0; r < ntok; r++)
            for (long i = 0; i < dim; i++) {
                Py_ssize_t k = r * nb + i / Q8_BLOCK;
                float scale = half_to_float((uint16_t)(v[2 * k] | v[2 * k + 1] << 8));
                f[r * dim + i] = (float)q[r * nb * Q8_BLOCK + i] * scale;
            }
    }
done:
    PyBuffer_Release(&buf);
    if (out == NULL) {
        Py_XDECREF(groups);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, groups, out);
    Py_DECREF(groups);
    Py_DECREF(out);
    return pair;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* A datagram of this round from one of its workers, opened: into its slot. NULL, or the
 * reason it was refused. */
static const char *take_fragment(Gather *g, Slot *s, uint32_t index, uint32_t count,
                                 uint32_t body_len, const uint8_t *p, uint32_t m) {
    if (count == 1) {
        if (m != body_len) return "malformed";
        const char *why = take_body(g, s, p, m);
        if (why != NULL) return why;
    } else {
        if (s->count == 0) {
            s->count = count;
            s->body_len = body_len;
        }
        if (count != s->count || body_len != s->body_len) return "malformed";
        if (s->have >> index & 1) return "duplicate";
        if (s->held + m > body_len) {
            slot_reset(s);
            return "malformed";
        }
        s->frag[index] = PyMem_Malloc(m ? m : 1);
        if (s->frag[index] == NULL) return "malformed";
        memcpy(s->frag[index], p, m);
        s->flen[index] = m;
        s->have |= (uint32_t)1 << index;
        s->held += m;
        if (s->have != (count == 32 ? 0xffffffffu : ((uint32_t)1 << count) - 1)) return NULL;
        uint8_t *body = PyMem_Malloc(body_len ? body_len : 1);
        const char *why = NULL;
        if (body == NULL || s->held != body_len) {
            why = "malformed";
        } else {
            uint32_t at = 0;
            for (uint32_t i = 0; i < count; i++) {
                memcpy(body + at, s->frag[i], s->flen[i]);
                at += s->flen[i];
            }
            why = take_body(g, s, body, body_len);
        }
        PyMem_Free(body);
        slot_reset(s);
        if (why != NULL) return why;
    }
    s->done = 1;
    s->arrived_at = now_s();
    g->order[g->narrived++] = (int)(s - g->slots);
    return NULL;
}

/* One received datagram: taken if it is this round's partial from one of its workers and
 * opens with that link's key and window; otherwise handed to open_one (the Python path's
 * items). *taken is set when it was taken (or refused) here. */
static PyObject *gather_one(void *ctx, PyObject *out, const uint8_t *d, Py_ssize_t n,
                            const Header *h, const struct sockaddr_in *from,
                            PyObject *channel_for, uint8_t *plain) {
    Gather *g = ctx;
    Slot *s = NULL;
    if (h->kind == PARTIAL_KIND && h->wire == (uint32_t)g->wire)
        for (int i = 0; i < g->nslots; i++)
            if (g->slots[i].sender == (int)h->sender) s = &g->slots[i];
    if (s == NULL || s->done || memcmp(h->tag, g->tag, sizeof g->tag) != 0 ||
        h->count > MAX_FRAGS)
        return open_one(out, d, n, h, from, channel_for, plain);
    const char *why = window_check(s->window, h->counter);
    if (why == NULL) {
        uint8_t iv[12];
        nonce(iv, (uint32_t)(1 - s->direction), h->counter);
        if (open_sealed(s->key, iv, d, HEADER_SIZE, d + HEADER_SIZE, (int)(n - HEADER_SIZE),
                        plain) != 0) {
            why = "unauthenticated";
        } else {
            window_take(s->window, h->counter);
            uint32_t m = (uint32_t)(n - HEADER_SIZE - TAG_SIZE);
            why = m > h->body_len
                      ? "malformed"
                      : take_fragment(g, s, h->index, h->count, h->body_len, plain, m);
        }
    }
    if (why != NULL) return reject(out, why);
    g->taken++;
    return out;
}

static PyObject *gather_pump(Gather *g, PyObject *args) {
    Receive r;
    if (!receive_args(args, &r, NULL, NULL)) return NULL;
    g->taken = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL || receive_batch(&r, gather_one, g, out) != 0) {
        Py_XDECREF(out);
        return NULL;
    }
    return Py_BuildValue("(Nn)", out, g->taken);
}

static int gather_pending(const Gather *g) {
    int n = 0;
    for (int i = 0; i < g->nslots; i++) n += !g->slots[i].done;
    return n;
}

/* pump, waiting up to `timeout` seconds (the GIL released while it sleeps) until every
 * sender's partial is in, or something arrived for the Python path: a round's wake-ups in
 * one call, not one Python pass each. */
static PyObject *gather_wait(Gather *g, PyObject *args) {
    Receive r;
    double timeout, slept = 0.0, coalesce = 0.0;
    long wakeups = 0;
    if (!receive_args(args, &r, &timeout, &coalesce)) return NULL;
    double end = now_s() + (timeout > 0.0 ? timeout : 0.0);
    g->taken = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (;;) {
        if (receive_batch(&r, gather_one, g, out) != 0) {
            Py_DECREF(out);
            return NULL;
        }
        double left = end - now_s();
        if (PyList_GET_SIZE(out) > 0 || gather_pending(g) == 0 || left <= 0.0) break;
        struct pollfd p = {.fd = r.fd, .events = POLLIN};
        struct timespec ts = {.tv_sec = (time_t)left,
                              .tv_nsec = (long)((left - (double)(time_t)left) * 1e9)};
        int ready;
        double t0 = now_s();
        Py_BEGIN_ALLOW_THREADS
        ready = ppoll(&p, 1, &ts, NULL);
        Py_END_ALLOW_THREADS
        if (ready > 0) wakeups++;
        if (ready > 0 && coalesce > 0.0 && gather_pending(g) > 1) {
            /* more than one partial still to come: let them gather before reading (one
             * wake-up for several datagrams), never past the timeout */
            double pause = end - now_s() < coalesce ? end - now_s() : coalesce;
            struct timespec nap = {.tv_sec = 0, .tv_nsec = pause > 0.0 ? (long)(pause * 1e9) : 0};
            Py_BEGIN_ALLOW_THREADS
            nanosleep(&nap, NULL);
            Py_END_ALLOW_THREADS
        }
        slept += now_s() - t0;
        if (ready == 0) break;
        if (ready < 0 && errno != EINTR) break; /* the receive reports the socket's error */
        if (PyErr_CheckSignals() != 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return Py_BuildValue("(Nndl)", out, g->taken, slept, wakeups);
}

static PyObject *gather_arrived(Gather *g, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (; g->nreported < g->narrived; g->nreported++) {
        Slot *s = &g->slots[g->order[g->nreported]];
        PyObject *item = Py_BuildValue("(id)", s->sender, s->arrived_at);
        if (item == NULL || PyList_Append(out, item) != 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *gather_drop(Gather *g, PyObject *arg) {
    long sender = PyLong_AsLong(arg);
    if (sender == -1 && PyErr_Occurred()) return NULL;
    for (int i = 0; i < g->nslots; i++)
        if (g->slots[i].sender == sender && !g->slots[i].done) {
            slot_reset(&g->slots[i]);
            g->slots[i].done = 1; /* what comes from it now is late: the Python path's */
        }
    Py_RETURN_NONE;
}

static PyObject *gather_total(Gather *g, PyObject *unused) {
    return PyByteArray_FromStringAndSize((const char *)g->sum, (Py_ssize_t)g->dim * 4);
}

static PyMethodDef gather_methods[] = {
    {"pump", (PyCFunction)gather_pump, METH_VARARGS,
     "pump(fd, limit, channel_for, kinds, phases) -> (items, taken): read what waits (at most "
     "`limit` datagrams); this round's partials are taken in, the rest returned as recv_open's "
     "items; `taken`: how many datagrams were taken or refused here"},
    {"wait", (PyCFunction)gather_wait, METH_VARARGS,
     "wait(fd, limit, channel_for, kinds, phases, timeout[, coalesce]) -> (items, taken, "
     "slept, wakeups): pump until every sender's partial is in, an item for the Python path "
     "came, or `timeout` seconds passed; `slept`: seconds spent waiting for datagrams (the "
     "GIL released); `wakeups`: how often datagrams woke it; `coalesce`: after a wake-up "
     "with more than one partial still to come, pause this many seconds before reading "
     "again, so that one wake-up takes several datagrams"},
    {"arrived", (PyCFunction)gather_arrived, METH_NOARGS,
     "arrived() -> [(sender, time.monotonic() when complete)] since the last call"},
    {"drop", (PyCFunction)gather_drop, METH_O,
     "drop(sender): no longer waited for (recomputed, lost); what it sends now is late"},
    {"total", (PyCFunction)gather_total, METH_NOARGS,
     "total() -> bytearray: the float32 sum of the partials taken in (dim values; each "
     "added at its span)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GatherType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "halollm.runtime._wire.Gather",
    .tp_basicsize = sizeof(Gather),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Gather(tag, senders, channels, wire, dim[, spans]): a decode round's partials, "
              "taken in; spans: per sender (offset, length) of its values in the dim-long "
              "output (default: all of it, a sum; disjoint spans: a concatenation)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)gather_init,
    .tp_dealloc = (destructor)gather_dealloc,
    .tp_methods = gather_methods,
};

PyDoc_STRVAR(sockaddr_doc, "sockaddr(host, port) -> bytes: a packed IPv4 sockaddr_in for seal_send.");

static PyObject *sockaddr(PyObject *self, PyObject *args) {
    const char *host;
    int port;
    if (!PyArg_ParseTuple(args, "si", &host, &port)) return NULL;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (port < 0 || port > 65535 || inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address and port: %s:%d", host, port);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)&sa, sizeof sa);
}

static PyMethodDef methods[] = {
    {"seal_send", seal_send, METH_VARARGS, seal_send_doc},
    {"recv_open", recv_open, METH_VARARGS, recv_open_doc},
    {"sockaddr", sockaddr, METH_VARARGS, sockaddr_doc},
    {"body_values", body_values, METH_VARARGS, body_values_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire",
                                    "The data plane's per-datagram work in C (see _wire.c).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__wire(void) {
    seal_ctx = EVP_CIPHER_CTX_new();
    open_ctx = EVP_CIPHER_CTX_new();
    if (seal_ctx == NULL || open_ctx == NULL ||
        EVP_EncryptInit_ex(seal_ctx, EVP_chacha20_poly1305(), NULL, NULL, NULL) != 1 ||
        EVP_DecryptInit_ex(open_ctx, EVP_chacha20_poly1305(), NULL, NULL, NULL) != 1) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no ChaCha20-Poly1305");
        return NULL;
    }
    if (PyType_Ready(&WindowType) < 0 || PyType_Ready(&GatherType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&WindowType);
    Py_INCREF(&GatherType);
    if (PyModule_AddIntConstant(m, "VERSION", WIRE_VERSION) != 0 ||
        PyModule_AddObject(m, "Window", (PyObject *)&WindowType) != 0 ||
        PyModule_AddObject(m, "Gather", (PyObject *)&GatherType) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
