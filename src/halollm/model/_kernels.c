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
             "q.k / sqrt(hd)) to positions 0..pos of its KV head (head // (n_q / n_kv)); out: "
             "[n_q * hd], float32 (out_kind 0, the default) or bfloat16 (2: the float32 result "
             "rounded to nearest even, as torch's conversion rounds it)");

/* x (hd values) rotated as Rope.apply does: x * cos + x[perm] * signed_sin, perm swapping the
 * two halves -- x * cos rounded to float32, then the rest in one fused multiply-add, as
 * torch.addcmul computes it (bit-identical keys whichever path wrote them) */
static void rope_row(float *out, const float *x, const float *cos, const float *sin, long hd) {
    long half = hd / 2;
    for (long i = 0; i < hd; i++) {
        out[i] = fmaf(x[i < half ? i + half : i - half], sin[i], x[i] * cos[i]);
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
    float *q = PyMem_Malloc(sizeof(float) * (size_t)(n_q * hd));
    float *widened = qkv_kind == BF16 ? PyMem_Malloc(sizeof(float) * (size_t)rows) : NULL;
    double *w = PyMem_Malloc(sizeof(double) * (size_t)end), *acc = PyMem_Malloc(sizeof(double) * (size_t)hd);
    if (q == NULL || w == NULL || acc == NULL || (qkv_kind == BF16 && widened == NULL)) {
        PyMem_Free(q);
        PyMem_Free(widened);
        PyMem_Free(w);
        PyMem_Free(acc);
        return PyErr_NoMemory();
    }
    if (widened != NULL) { /* bfloat16 q, k, v rows: exactly their float32 values */
        for (long i = 0; i < rows; i++) widened[i] = weight_at((const void *)qkv, BF16, i);
        qkv = widened;
    }
    for (long h = 0; h < n_q; h++) rope_row(q + h * hd, qkv + h * hd, cos, sin, hd);
    for (long k = 0; k < n_kv; k++) {
        rope_row(kc + (k * capacity + pos) * hd, qkv + (n_q + k) * hd, cos, sin, hd);
        memcpy(vc + (k * capacity + pos) * hd, qkv + (n_q + n_kv + k) * hd, sizeof(float) * (size_t)hd);
    }
    double scale = 1.0 / sqrt((double)hd);
    for (long h = 0; h < n_q; h++) {
        const float *qh = q + h * hd, *kh = kc + (h / group) * capacity * hd;
        const float *vh = vc + (h / group) * capacity * hd;
        double top = -INFINITY, total = 0.0;
        for (long p = 0; p < end; p++) {
            double dot = 0.0;
            for (long i = 0; i < hd; i++) dot += (double)qh[i] * kh[p * hd + i];
            w[p] = dot * scale;
            if (w[p] > top) top = w[p];
        }
        for (long i = 0; i < hd; i++) acc[i] = 0.0;
        for (long p = 0; p < end; p++) {
            double e = exp(w[p] - top);
            total += e;
            for (long i = 0; i < hd; i++) acc[i] += e * vh[p * hd + i];
        }
        for (long i = 0; i < hd; i++) {
            float r = (float)(acc[i] / total);
            if (out_kind == BF16)
                ((uint16_t *)(uintptr_t)out_a)[h * hd + i] = to_bfloat16(r);
            else
                ((float *)(uintptr_t)out_a)[h * hd + i] = r;
        }
    }
    PyMem_Free(q);
    PyMem_Free(widened);
    PyMem_Free(w);
    PyMem_Free(acc);
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
