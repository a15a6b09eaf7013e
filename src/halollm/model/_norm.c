/* RMSNorm of float32 rows in one call (llama.rms_norm's fast path).
 *
 * The formula is llama.rms_norm's (Hugging Face LLaMA's): out = weight * (h * rsqrt(mean(h^2)
 * + eps)), each product rounded to float32, the result rounded to the output type (nearest
 * even). Only the mean differs from PyTorch's: its squares are summed in double here, so the
 * mean is the correctly rounded float32 of the exact one. What this saves is PyTorch's
 * per-operator dispatch: the seven operators of one row of a decode step cost ~25 us warm and
 * ~100 us on a coordinator that wakes for every round; this costs a few.
 *
 * Tensors come as addresses (Tensor.data_ptr()) of contiguous memory the caller owns;
 * llama.rms_norm checks dtypes, shapes and contiguity before calling.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = h >> 10 & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | exp << 23 | (man & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float weight_at(const void *w, int kind, Py_ssize_t i) {
    if (kind == F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (kind == F16) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
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

static PyMethodDef methods[] = {
    {"rms_norm", rms_norm, METH_VARARGS, rms_norm_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_norm",
                                    "RMSNorm in one call (see _norm.c).", -1, methods};

PyMODINIT_FUNC PyInit__norm(void) { return PyModule_Create(&module); }
