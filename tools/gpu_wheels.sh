#!/usr/bin/env bash
# Build the offline wheel bundle that tools/gpu_check.sh installs on a GPU box without network.
#
#   bash tools/gpu_wheels.sh [--with-te DIR] [--out DIR]
#
# Run it on a machine with PyPI access. It writes build/gpu-wheels/ (or --out DIR) with
#   - megatron-core 0.19.2 (its cp312 wheel: the GPU box runs Python 3.12),
#   - deepspeed, built here as a pure-Python wheel (DS_BUILD_OPS=0; its ops JIT-build there),
#   - every runtime requirement of those two that such a box may lack (pydantic, hjson, ...),
# and MANIFEST.txt (file, bytes, sha256). The box is expected to hold torch (CUDA), triton,
# numpy, transformers, safetensors, sentencepiece, tokenizers, accelerate, pytest and their own
# requirements (pyyaml, jinja2, tqdm, psutil, ...): those are never bundled. The script checks
# that each bundled wheel's requirements are bundled or among those, and that each of sci-scale's
# own requirements is bundled, provided, or imported only off the GPU check's path.
# The bundle must stay under 64 MiB so that it travels with the working tree; the script fails
# otherwise. Transformer Engine does not fit (its CUDA 13 core wheel alone is ~276 MB): it is
# skipped unless --with-te DIR names a directory of TE wheels/sdists, which are copied to
# OUT/te/ and left out of the size check.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=build/gpu-wheels
TE_DIR=""
LIMIT_BYTES=$((64 * 1024 * 1024))
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --with-te) TE_DIR="${2:?--with-te needs a directory}"; shift 2 ;;
        --out) OUT_DIR="${2:?--out needs a directory}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

# The interpreter that builds deepspeed's wheel: its setup.py imports torch, so it runs without
# build isolation in a Python that has torch (the repo's .venv, CPU torch is enough).
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PIP=("$PYTHON" -m pip --disable-pip-version-check)

# Versions: megatron-core's newest Python 3.12 release within pyproject's range, and for the
# rest the versions the CPU test venv runs with (tools/setup.sh).
MEGATRON="megatron-core==0.19.2"
DEEPSPEED="deepspeed==0.19.8"
# Binary wheels: what deepspeed needs beyond the box (hjson, pydantic and its own needs), plus
# small ones the box is listed with today but whose absence would stop the install (einops,
# msgpack, ninja, py-cpuinfo; packaging and typing-extensions for the minimum versions that
# megatron-core and pydantic ask), and xxhash (sci-scale's checkpoint manifests). pip installs
# from the bundle only what the box lacks.
BINARY=(
    "$MEGATRON"
    hjson==3.1.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    einops==0.8.2
    msgpack==1.2.4
    ninja==1.13.2
    py-cpuinfo==9.0.0
    packaging==26.4
    xxhash==4.1.0
)

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
echo "[gpu-wheels] downloading ${#BINARY[@]} binary wheels for CPython 3.12, manylinux x86_64"
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -d "$OUT_DIR" "${BINARY[@]}"

echo "[gpu-wheels] building $DEEPSPEED as a pure-Python wheel (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "${PIP[@]}" wheel --quiet --no-deps --no-build-isolation \
    --no-binary deepspeed -w "$OUT_DIR" "$DEEPSPEED"

if [ -n "$TE_DIR" ]; then
    shopt -s nullglob
    te_files=("$TE_DIR"/*.whl "$TE_DIR"/*.tar.gz)
    shopt -u nullglob
    if [ ${#te_files[@]} -eq 0 ]; then
        echo "[gpu-wheels] --with-te $TE_DIR: no .whl or .tar.gz there" >&2
        exit 1
    fi
    mkdir -p "$OUT_DIR/te"
    cp "${te_files[@]}" "$OUT_DIR/te/"
    echo "[gpu-wheels] copied ${#te_files[@]} Transformer Engine file(s) to $OUT_DIR/te/" \
        "(not counted in the 64 MiB bundle)"
else
    echo "[gpu-wheels] Transformer Engine skipped: its CUDA 13 core wheel alone is ~276 MB," \
        "over the 64 MiB bundle; pass --with-te DIR to add TE files you have (OUT/te/)"
fi

# Requirements closure, sci-scale's own requirements, the manifest and the size check.
"$PYTHON" - "$OUT_DIR" "$LIMIT_BYTES" <<'PY'
import email.parser
import hashlib
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

out, limit = Path(sys.argv[1]), int(sys.argv[2])
# What the GPU box holds (torch's CUDA build and the packages named with it), with the
# requirements of those packages that the bundle's wheels and sci-scale rely on.
PROVIDED = {
    "torch", "triton", "numpy", "transformers", "safetensors", "sentencepiece", "tokenizers",
    "accelerate", "pytest", "pyyaml", "jinja2", "tqdm", "psutil", "filelock", "huggingface-hub",
    "regex", "requests", "fsspec", "sympy", "networkx", "markupsafe", "setuptools",
}  # fmt: skip
# sci-scale requirements imported only inside functions the GPU check never calls:
# datasets (preprocessing Parquet/Arrow), wandb (logging.wandb_mode other than disabled),
# matplotlib (sci-scale plot / experiment reports).
OFF_PATH = {"datasets", "wandb", "matplotlib"}
TARGET = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}  # fmt: skip

wheels = sorted(out.glob("*.whl"))
bundled = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels}
missing = []
for name, wheel in bundled.items():
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(zf.read(meta).decode())
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(TARGET):
            continue  # an extra, or another platform
        dep = canonicalize_name(req.name)
        if dep not in bundled and dep not in PROVIDED:
            missing.append(f"{name} needs {req} (neither bundled nor on the GPU box)")

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
for line in project["dependencies"]:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate(TARGET):
        continue
    dep = canonicalize_name(req.name)
    if dep not in bundled and dep not in PROVIDED and dep not in OFF_PATH:
        missing.append(f"sci-scale needs {req} (neither bundled nor on the GPU box)")
    if dep in bundled and not req.specifier.contains(
        parse_wheel_filename(bundled[dep].name)[1], prereleases=True
    ):
        missing.append(f"sci-scale needs {req}; the bundle has {bundled[dep].name}")
if missing:
    sys.exit("[gpu-wheels] requirements not covered:\n  " + "\n  ".join(missing))

files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.txt")
lines = ["# sci-scale GPU wheel bundle: file, bytes, sha256 (te/ is not counted in the size)"]
for path in files:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    lines.append(f"{path.relative_to(out)}  {path.stat().st_size}  {digest}")
(out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
counted = [p for p in out.rglob("*") if p.is_file() and "te" not in p.relative_to(out).parts]
size = sum(p.stat().st_size for p in counted)
for path in files:
    print(f"  {path.relative_to(out)}  {path.stat().st_size / 2**20:.2f} MiB")
print(f"[gpu-wheels] {out}: {len(counted)} files, {size / 2**20:.2f} MiB (limit 64 MiB)")
print(f"[gpu-wheels] requirements covered: bundled {sorted(bundled)}")
if size > limit:
    sys.exit(f"[gpu-wheels] the bundle is {size / 2**20:.2f} MiB, over the 64 MiB limit")
PY
echo "[gpu-wheels] ready: copy the repo with $OUT_DIR to the GPU box and run bash tools/gpu_check.sh"
