"""The compiled parts, both optional: where they do not build (no C compiler, no OpenSSL headers),
HALO installs without them and uses the Python code they mirror.

- the data plane's per-datagram work (src/halollm/runtime/_wire.c, OpenSSL's libcrypto);
- RMSNorm in one call (src/halollm/model/_norm.c; no dependency).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("halollm.runtime._wire", ["src/halollm/runtime/_wire.c"], libraries=["crypto"],
              optional=True, extra_compile_args=["-O2"]),
    Extension("halollm.model._norm", ["src/halollm/model/_norm.c"], optional=True,
              extra_compile_args=["-O2", "-ffp-contract=off"]),
])
