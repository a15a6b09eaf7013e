/* A decode step's one-row operators in one call each: RMSNorm (norm.rms_norm's fast path);
 * RoPE, the KV cache write and attention of one query position, and a SwiGLU MLP's
 * activations (attend.py's).
 *
 * What they save is PyTorch's per-operator dispatch: a decode step works on rows of a few
 * thousand values, where dispatch costs more than arithmetic -- and several times more on a
 * device woken for every synchronisation round (docs/results/c-path.md).
 *
 * RMSNorm's formula is Hugging Face LLaMA's: out = weight * (h * rsqrt(mean(h^2) + eps)), each
 * product rounded to float32, the result rounded to the output type (nearest even). Only the
 * mean differs from PyTorch's: its squares are summed in double here.
 *
 * Attention is float32 in eight-lane vectors (AVX2 where the CPU has it, else SSE or NEON),
 * each multiply and add rounded on its own (-ffp-contract=off) and summed in a fixed order: the
 * same bits from every build on one CPU family, so every path of a run (a worker, the
 * coordinator's fallback, `halo generate`) computes the same values. It was double and scalar
 * until session 19: 3-5x slower, a quarter of a worker's CPU at a 1,000-token context
 * (docs/results/attend.md).
 *
 * Tensors come as addresses (Tensor.data_ptr()) of contiguous memory the caller owns and has
 * checked (dtypes, shapes, contiguity, capacity): norm.py and attend.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../half_float.h"

enum { F32 = 0, F16 = 1, BF16 = 2 };

static float weight_at(const void *w, int kind, Py_ssize_t i) {
    if (kind == F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return kind == F16 ? half_to_float(h) : bfloat16_to_float(h);
}

static uint16_t to_bfloat16(float f) { /* round to nearest even, as c10::BFloat16 does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fc0; /* NaN */
    return (uint16_t)((bits + 0x7fff + (bits >> 16 & 1)) >> 16);
}

PyDoc_STRVAR(rms_norm_doc,
             "rms_norm(out, out_kind, h, w, w_kind, rows, dim, eps): out[r] = w * (h[r] * "
             "rsqrt(mean(h[r]^2) + eps)) for float32 rows h (addresses; kinds: 0 float32, "
             "2 bfloat16 for out; 0, 1 float16, 2 for w)");

static PyObject *rms_norm(PyObject *self, PyObject *args) {
    unsigned long long out_addr, h_addr, w_addr;
    int out_kind, w_kind;
    Py_ssize_t rows, dim;
    double eps;
    if (!PyArg_ParseTuple(args, "KiKKinnd", &out_addr, &out_kind, &h_addr, &w_addr, &w_kind,
                          &rows, &dim, &eps))
        return NULL;
    if ((out_kind != F32 && out_kind != BF16) || w_kind < F32 || w_kind > BF16 || rows < 0 ||
        dim < 1 || !out_addr || !h_addr || !w_addr) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: bad kinds, shape or address");
        return NULL;
    }
    const float *h = (const float *)(uintptr_t)h_addr;
    const void *w = (const void *)(uintptr_t)w_addr;
    for (Py_ssize_t r = 0; r < rows; r++, h += dim) {
        double sq = 0.0;
        for (Py_ssize_t i = 0; i < dim; i++) sq += (double)h[i] * h[i];
        float mean = (float)(sq / (double)dim);
        float scale = 1.0f / sqrtf(mean + (float)eps);
        for (Py_ssize_t i = 0; i < dim; i++) {
            float v = h[i] * scale;
            v = weight_at(w, w_kind, i) * v;
            if (out_kind == F32)
                ((float *)(uintptr_t)out_addr)[r * dim + i] = v;
            else
                ((uint16_t *)(uintptr_t)out_addr)[r * dim + i] = to_bfloat16(v);
        }
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(attend_doc,
             "attend(out, qkv, n_q, n_kv, hd, pos, cos, sin, k_cache, v_cache, capacity"
             "[, out_kind, qkv_kind]): one query position's attention: RoPE on its q and k "
             "rows ([n_q + 2 n_kv, hd] qkv: float32, or bfloat16 with qkv_kind 2, widened "
             "exactly; cos and signed sin rows of the position), k and v written at `pos` of the "
             "float32 [n_kv, capacity, hd] caches, each query head attending (softmax of "
             "q.k / sqrt(hd), in float32) to positions 0..pos of its KV head "
             "(head // (n_q / n_kv)); out: [n_q * hd], float32 (out_kind 0, the default) or "
             "bfloat16 (2: the float32 result rounded to nearest even, as torch's conversion "
             "rounds it)");

/* x (hd values) rotated as Rope.apply does: x * cos + x[perm] * signed_sin, perm swapping the
 * two halves -- x * cos rounded to float32, then the rest in one fused multiply-add, as
 * torch.addcmul computes it (bit-identical keys whichever path wrote them) */
static void rope_row(float *out, const float *x, const float *cos, const float *sin, long hd) {
    long half = hd / 2;
    for (long i = 0; i < hd; i++) {
        out[i] = fmaf(x[i < half ? i + half : i - half], sin[i], x[i] * cos[i]);
    }
}

/* Eight float32 lanes (GCC/Clang vector extensions: AVX or SSE on x86, NEON on ARM). With
 * -ffp-contract=off every lane's multiply and add round separately, so a sum comes out the same
 * bits whichever instructions carry it. */
typedef float lanes8 __attribute__((vector_size(32)));

static inline lanes8 load8(const float *p) {
    lanes8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* the eight lanes added pairwise, in a fixed order */
static inline float lane_total(lanes8 s) {
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* a . b over n values: eight lane sums over the multiples of 8, their total, then the tail
 * one by one */
static inline float dot(const float *a, const float *b, long n) {
    lanes8 s = {0};
    long i = 0;
    for (; i + 8 <= n; i += 8) s += load8(a + i) * load8(b + i);
    float t = lane_total(s);
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

/* dot(a, b + r * n, n) for rows r = 0..3, in one pass over a (four independent sums keep the
 * core busy where one waits on its own additions): the same four values, bit for bit */
static inline void dot4(float *out, const float *a, const float *b, long n) {
    if (n % 8) {
        for (int r = 0; r < 4; r++) out[r] = dot(a, b + r * n, n);
        return;
    }
    lanes8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    for (long i = 0; i < n; i += 8) {
        lanes8 x = load8(a + i);
        s0 += x * load8(b + i);
        s1 += x * load8(b + n + i);
        s2 += x * load8(b + 2 * n + i);
        s3 += x * load8(b + 3 * n + i);
    }
    out[0] = lane_total(s0), out[1] = lane_total(s1), out[2] = lane_total(s2);
    out[3] = lane_total(s3);
}

/* acc += e * v over n values */
static inline void add_scaled(float *acc, float e, const float *v, long n) {
    long i = 0;
    lanes8 ev = {e, e, e, e, e, e, e, e};
    for (; i + 8 <= n; i += 8) {
        lanes8 a = load8(acc + i) + ev * load8(v + i);
        memcpy(acc + i, &a, sizeof a);
    }
    for (; i < n; i++) acc[i] += e * v[i];
}

/* One query head over positions 0..end-1 of its KV head: softmax(q.k * scale) . v, in float32
 * as torch's attention computes it (the exponentials' total in double); out in out_kind. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void attend_head(void *out, int out_kind, const float *q, const float *kh,
                        const float *vh, long end, long hd, float *w, float *acc) {
    float scale = 1.0f / sqrtf((float)hd), top = -INFINITY;
    long p = 0;
    for (; p + 4 <= end; p += 4) dot4(w + p, q, kh + p * hd, hd);
    for (; p < end; p++) w[p] = dot(q, kh + p * hd, hd);
    for (p = 0; p < end; p++) {
        w[p] *= scale;
        if (w[p] > top) top = w[p];
    }
    memset(acc, 0, sizeof(float) * (size_t)hd);
    double total = 0.0;
    for (p = 0; p < end; p++) {
        float e = expf(w[p] - top);
        total += e;
        add_scaled(acc, e, vh + p * hd, hd);
    }
    for (long i = 0; i < hd; i++) {
        float r = (float)((double)acc[i] / total);
        if (out_kind == BF16)
            ((uint16_t *)out)[i] = to_bfloat16(r);
        else
            ((float *)out)[i] = r;
    }
}

static PyObject *attend(PyObject *self, PyObject *args) {
    unsigned long long out_a, qkv_a, cos_a, sin_a, k_a, v_a;
    long n_q, n_kv, hd, pos, capacity;
    int out_kind = F32, qkv_kind = F32;
    if (!PyArg_ParseTuple(args, "KKlllKKKKKl|ii", &out_a, &qkv_a, &n_q, &n_kv, &hd, &pos,
                          &cos_a, &sin_a, &k_a, &v_a, &capacity, &out_kind, &qkv_kind))
        return NULL;
    if (n_kv < 1 || n_q < n_kv || n_q % n_kv || hd < 2 || hd % 2 || hd > 4096 || pos < 0 ||
        pos >= capacity || (out_kind != F32 && out_kind != BF16) ||
        (qkv_kind != F32 && qkv_kind != BF16) || !out_a || !qkv_a || !cos_a || !sin_a ||
        !k_a || !v_a) {
        PyErr_SetString(PyExc_ValueError, "attend: bad shape, position or address");
        return NULL;
    }
    float *kc = (float *)(uintptr_t)k_a;
    float *vc = (float *)(uintptr_t)v_a;
    const float *qkv = (const float *)(uintptr_t)qkv_a, *cos = (const float *)(uintptr_t)cos_a;
    const float *sin = (const float *)(uintptr_t)sin_a;
    long group = n_q / n_kv, end = pos + 1, rows = (n_q + 2 * n_kv) * hd;
    float *q = PyMem_Malloc(sizeof(float) * (size_t)(n_q * hd + hd + end));
    float *widened = qkv_kind == BF16 ? PyMem_Malloc(sizeof(float) * (size_t)rows) : NULL;
    if (q == NULL || (qkv_kind == BF16 && widened == NULL)) {
        PyMem_Free(q);
        PyMem_Free(widened);
        return PyErr_NoMemory();
    }
    float *acc = q + n_q * hd, *w = acc + hd;
    if (widened != NULL) { /* bfloat16 q, k, v rows: exactly their float32 values */
        for (long i = 0; i < rows; i++) widened[i] = weight_at((const void *)qkv, BF16, i);
        qkv = widened;
    }
    for (long h = 0; h < n_q; h++) rope_row(q + h * hd, qkv + h * hd, cos, sin, hd);
    for (long k = 0; k < n_kv; k++) {
        rope_row(kc + (k * capacity + pos) * hd, qkv + (n_q + k) * hd, cos, sin, hd);
        memcpy(vc + (k * capacity + pos) * hd, qkv + (n_q + n_kv + k) * hd, sizeof(float) * (size_t)hd);
    }
    size_t row_bytes = (size_t)hd * (out_kind == BF16 ? 2 : 4);
    for (long h = 0; h < n_q; h++) {
        long kv = (h / group) * capacity * hd;
        attend_head((char *)(uintptr_t)out_a + h * row_bytes, out_kind, q + h * hd, kc + kv,
                    vc + kv, end, hd, w, acc);
    }
    PyMem_Free(q);
    PyMem_Free(widened);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(silu_mul_doc,
             "silu_mul(out, gu, gu_kind, rows, n[, out_kind]): out[r, i] = silu(gu[r, i]) * "
             "gu[r, n + i] in float32 (gu: [rows, 2n], float32 or bfloat16 (kind 0 or 2): a "
             "SwiGLU MLP's gate values, then its up values; out: [rows, n], float32 (kind 0, "
             "the default) or bfloat16 (kind 2: the float32 result rounded to nearest even, "
             "as torch's conversion rounds it))");

static PyObject *silu_mul(PyObject *self, PyObject *args) {
    unsigned long long out_a, gu_a;
    int kind, out_kind = F32;
    Py_ssize_t rows, n;
    if (!PyArg_ParseTuple(args, "KKinn|i", &out_a, &gu_a, &kind, &rows, &n, &out_kind))
        return NULL;
    if ((kind != F32 && kind != BF16) || (out_kind != F32 && out_kind != BF16) || rows < 0 ||
        n < 1 || !out_a || !gu_a) {
        PyErr_SetString(PyExc_ValueError, "silu_mul: bad kind, shape or address");
        return NULL;
    }
    const void *gu = (const void *)(uintptr_t)gu_a;
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t i = 0; i < n; i++) {
            float g = weight_at(gu, kind, r * 2 * n + i), u = weight_at(gu, kind, r * 2 * n + n + i);
            float silu = g / (1.0f + expf(-g)), v = silu * u;
            if (out_kind == BF16)
                ((uint16_t *)(uintptr_t)out_a)[r * n + i] = to_bfloat16(v);
            else
                ((float *)(uintptr_t)out_a)[r * n + i] = v;
        }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"silu_mul", silu_mul, METH_VARARGS, silu_mul_doc},
    {"rms_norm", rms_norm, METH_VARARGS, rms_norm_doc},
    {"attend", attend, METH_VARARGS, attend_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "A decode step's one-row operators (see _kernels.c).", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
