/* The data plane's per-datagram work in C: sealing and sending every fragment of a message
 * to every target in one sendmmsg, and receiving, parsing and opening a batch of datagrams
 * in one recvmmsg. The same wire format as protocol.py (which stays the reference: the
 * tests check that both produce and accept the same bytes); the AEAD is OpenSSL's
 * ChaCha20-Poly1305, the same cipher as the `cryptography` package's. Replay windows and
 * reassembly stay in Python (transport.py).
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
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

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
"sequence of (sockaddr, key, direction, counter) -- a packed sockaddr_in from sockaddr(),\n"
"the link's 32-byte key, this end's direction, and the link's last counter (fragment i is\n"
"sealed with counter + 1 + i). The caller advances each link's counter by the fragment\n"
"count. A datagram the kernel refuses is counted in errors and lost, like on the network.");

static PyObject *seal_send(PyObject *self, PyObject *args) {
    int fd;
    Py_ssize_t payload;
    Py_buffer prefix, body;
    PyObject *targets;
    if (!PyArg_ParseTuple(args, "iy*y*nO", &fd, &prefix, &body, &payload, &targets)) return NULL;
    PyObject *seq = NULL, *result = NULL;
    uint8_t *buf = NULL;
    struct mmsghdr *msgs = NULL;
    struct iovec *iov = NULL;
    if (prefix.len != PREFIX_SIZE || payload < 1 || body.len > (Py_ssize_t)MAX_BODY) {
        PyErr_SetString(PyExc_ValueError, "bad prefix, payload size or body length");
        goto done;
    }
    seq = PySequence_Fast(targets, "targets must be a sequence");
    if (seq == NULL) goto done;
    Py_ssize_t nt = PySequence_Fast_GET_SIZE(seq), n = body.len;
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
        PyObject *item = PySequence_Fast_GET_ITEM(seq, t);
        Py_buffer addr, key;
        unsigned int direction;
        unsigned long long counter;
        if (!PyArg_ParseTuple(item, "y*y*IK", &addr, &key, &direction, &counter)) goto done;
        int bad = addr.len != sizeof(struct sockaddr_in) || key.len != KEY_SIZE;
        if (!bad) {
            for (Py_ssize_t i = 0; i < count; i++, k++) {
                uint8_t *d = buf + k * stride, iv[12];
                Py_ssize_t off = i * payload, len = n - off < payload ? n - off : payload;
                uint64_t c = counter + 1 + (uint64_t)i;
                memcpy(d, prefix.buf, PREFIX_SIZE);
                put16(d + 28, (uint32_t)i);
                put16(d + 30, (uint32_t)count);
                put32(d + 32, (uint32_t)n);
                put64(d + 36, c);
                nonce(iv, direction, c);
                if (seal(key.buf, iv, d, HEADER_SIZE, (const uint8_t *)body.buf + off, (int)len,
                         d + HEADER_SIZE) != 0) {
                    bad = 2;
                    break;
                }
                iov[k].iov_base = d;
                iov[k].iov_len = HEADER_SIZE + len + TAG_SIZE;
                msgs[k].msg_hdr.msg_name = addr.buf;
                msgs[k].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
                msgs[k].msg_hdr.msg_iov = &iov[k];
                msgs[k].msg_hdr.msg_iovlen = 1;
            }
        }
        /* the sockaddr buffers belong to the targets, which outlive this call */
        PyBuffer_Release(&addr);
        PyBuffer_Release(&key);
        if (bad) {
            PyErr_SetString(bad == 2 ? PyExc_RuntimeError : PyExc_ValueError,
                            bad == 2 ? "sealing failed" : "bad sockaddr or key length");
            goto done;
        }
    }
    Py_ssize_t errors = 0;
    int sent = send_all(fd, msgs, (int)total, &errors);
    result = Py_BuildValue("nn", (Py_ssize_t)sent - errors, errors);
done:
    PyMem_Free(buf);
    PyMem_Free(msgs);
    PyMem_Free(iov);
    Py_XDECREF(seq);
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
"payload, (host, port)). `channel_for(sender, session)` names the link (an object with\n"
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

/* One received datagram: appended to `out` as a reason or a fragment; NULL on a Python error. */
static PyObject *open_one(PyObject *out, const uint8_t *d, Py_ssize_t n,
                          const struct sockaddr_in *from, PyObject *channel_for,
                          unsigned long kinds, unsigned long phases, uint8_t *plain) {
    if (n < HEADER_SIZE + TAG_SIZE) return reject(out, "malformed");
    if (d[0] != 'H' || d[1] != 'L' || d[2] != WIRE_VERSION) return reject(out, "malformed");
    uint32_t kind = d[3], sender = d[4], wire = d[5], session = get32(d + 6);
    uint32_t epoch = get32(d + 10), request = get32(d + 14), pos = get32(d + 18);
    uint32_t ntok = get16(d + 22), layer = get16(d + 24), phase = d[26];
    uint32_t index = get16(d + 28), count = get16(d + 30), body_len = get32(d + 32);
    uint64_t counter = get64(d + 36);
    if (kind >= 32 || phase >= 32 || !(kinds >> kind & 1) || !(phases >> phase & 1))
        return reject(out, "malformed");
    if (count == 0 || index >= count || body_len > MAX_BODY) return reject(out, "malformed");
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
    char host[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &from->sin_addr, host, sizeof host);
    PyObject *item = Py_BuildValue(
        "(NKkkk(kkkkkkk)kkky#(si))", channel, (unsigned long long)counter,
        (unsigned long)kind, (unsigned long)sender, (unsigned long)wire,
        (unsigned long)session, (unsigned long)epoch, (unsigned long)request, (unsigned long)pos,
        (unsigned long)ntok, (unsigned long)layer, (unsigned long)phase, (unsigned long)index,
        (unsigned long)count, (unsigned long)body_len, (const char *)plain, m, host,
        (int)ntohs(from->sin_port));
    if (item == NULL) return NULL;
    int r = PyList_Append(out, item);
    Py_DECREF(item);
    return r == 0 ? out : NULL;
}

static PyObject *recv_open(PyObject *self, PyObject *args) {
    int fd, limit;
    PyObject *channel_for;
    unsigned long kinds, phases;
    if (!PyArg_ParseTuple(args, "iiOkk", &fd, &limit, &channel_for, &kinds, &phases))
        return NULL;
    /* one receive at a time per process: channel_for runs Python, during which another
     * thread could enter here and overwrite these buffers; that is refused, not shared */
    static uint8_t bufs[BATCH][MAX_DATAGRAM], plain[MAX_DATAGRAM];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    static struct sockaddr_in from[BATCH];
    static int busy;
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "recv_open is already running in another thread");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
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
        for (int i = 0; i < got; i++)
            if (open_one(out, bufs[i], (Py_ssize_t)msgs[i].msg_len, &from[i], channel_for,
                         kinds, phases, plain) == NULL)
                goto fail;
        limit -= got;
        if (got < want) break;
    }
    busy = 0;
    return out;
fail:
    busy = 0;
    Py_DECREF(out);
    return NULL;
}

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
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", WIRE_VERSION) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
