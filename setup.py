"""The compiled parts, both optional: where they do not build (no C compiler, no OpenSSL headers),
HALO installs without them and uses the Python code they mirror.

- the data plane's per-datagram work (src/halollm/runtime/_wire.c, OpenSSL's libcrypto);
- a decode step's one-row operators in one call each (src/halollm/model/_kernels.c: RMSNorm,
  RoPE and attention of one query, a SwiGLU MLP's activations; no dependency).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("halollm.runtime._wire", ["src/halollm/runtime/_wire.c"], libraries=["crypto"],
              depends=["src/halollm/half_float.h"], optional=True, extra_compile_args=["-O2"]),
    Extension("halollm.model._kernels", ["src/halollm/model/_kernels.c"],
              depends=["src/halollm/half_float.h"], optional=True,
              extra_compile_args=["-O2", "-ffp-contract=off"]),
])
