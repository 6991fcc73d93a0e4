#!/usr/bin/env bash
# The GPU proof of sci-scale in one command, on one H100 or H200 without network (<= 8 minutes
# without Transformer Engine files in the bundle):
#
#   bash tools/gpu_check.sh [--dry-run] [--out DIR] [--quick]
#
# Steps, each under its own timeout; a failing step is recorded and the next one still runs:
#   environment  nvidia-smi, the Python, torch and CUDA versions, the device
#   install      a venv (--system-site-packages) over the box's Python, and an offline
#                `pip install --no-index --find-links build/gpu-wheels` of the bundle's
#                megatron-core and deepspeed wheels (tools/gpu_wheels.sh makes the bundle);
#                sci-scale itself runs from the repo through PYTHONPATH
#   install-te   only when build/gpu-wheels/te/ holds Transformer Engine files
#   gpu-tests    python -m pytest -m gpu -ra tests
#   bench-bf16   sci-scale bench configs/bench/llama-1b.yaml (bf16, seq 4096): SCI joint,
#                SCI off and the transformers baseline, alternating steps
#   bench-fp8    the same SCI joint/off pair with model.fp8=delayed (no transformers baseline,
#                the bf16 run has it), only when `import transformer_engine` works
#   report       OUT/gpu_check.json (every step's command, exit code, seconds, output tail and
#                the bench figures) and OUT/gpu_check.md (tables for docs/performance.md)
# OUT is --out DIR, else $OUT when set, else runs/gpu-check. The exit code is non-zero when any
# step failed or timed out. --quick runs fewer bench steps. --dry-run runs nothing: it checks
# that the bundle is there and prints every step with its command and timeout.
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python, else python3), GPU_WHEELS
# (default build/gpu-wheels), GPU_CHECK_VENV (default build/gpu-check-venv), GPU_CHECK_CONFIG
# (the bench config, default configs/bench/llama-1b.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
QUICK=0
OUT_DIR="${OUT:-runs/gpu-check}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --quick) QUICK=1; shift ;;
        --out) OUT_DIR="${2:?--out needs a directory}"; shift 2 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x /opt/torch/.venv/bin/python ]; then PYTHON=/opt/torch/.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS="${GPU_WHEELS:-build/gpu-wheels}"
VENV="${GPU_CHECK_VENV:-build/gpu-check-venv}"
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$ROOT/$OUT_DIR" ;; esac
case "$WHEELS" in /*) ;; *) WHEELS="$ROOT/$WHEELS" ;; esac
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
CONFIG="${GPU_CHECK_CONFIG:-configs/bench/llama-1b.yaml}"
if [ "$QUICK" = 1 ]; then
    STEPS=3 WARMUP=1 T_BENCH=150 T_FP8=120
else
    STEPS=10 WARMUP=3 T_BENCH=200 T_FP8=180
fi
# Timeouts in seconds. Without TE files: 20 + 60 + 120 + 200 + 30 + 30 = 460 s, plus 5 s of
# grace per step before a kill: 8 minutes at most.
T_ENV=20 T_INSTALL=60 T_TE=300 T_TESTS=120 T_PROBE=30 T_REPORT=30

q() { printf '%q' "$1"; }
PY=$(q "$PYTHON")
VPY=$(q "$VENV/bin/python")
RUN_ENV="env PYTHONPATH=$(q "$ROOT") PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled"

# --- the steps' commands: what runs is exactly what --dry-run prints ---------------------------
ENV_CMD="rc=0
nvidia-smi || rc=1
$PY - <<'PY' || rc=1
import json, os, platform, sys

import torch

info = {
    'python': sys.version.split()[0], 'executable': sys.executable,
    'torch': torch.__version__, 'cuda': torch.version.cuda,
    'cudnn': torch.backends.cudnn.version(), 'cuda_available': torch.cuda.is_available(),
    'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    'device_count': torch.cuda.device_count(), 'host': platform.node(), 'cpus': os.cpu_count(),
}
for key, value in info.items():
    print(f'{key}: {value}')
if os.environ.get('GPU_CHECK_ENV_JSON'):
    with open(os.environ['GPU_CHECK_ENV_JSON'], 'w') as f:
        json.dump(info, f)
sys.exit(0 if info['cuda_available'] else 'torch sees no CUDA device')
PY
command -v nvcc >/dev/null && nvcc --version | tail -n 2
exit \$rc"

INSTALL_CMD="set -e
$PY - $(q "$WHEELS") <<'PY'
import hashlib, sys
from pathlib import Path

wheels = Path(sys.argv[1])
manifest = wheels / 'MANIFEST.txt'
if not manifest.is_file():
    sys.exit(f'{manifest} is missing: make the bundle with bash tools/gpu_wheels.sh')
for line in manifest.read_text().splitlines():
    if line.strip() and not line.startswith('#'):
        name, size, digest = line.split()
        if hashlib.sha256((wheels / name).read_bytes()).hexdigest() != digest:
            sys.exit(f'{name}: sha256 differs from MANIFEST.txt')
print(f'bundle {wheels}: MANIFEST.txt verified')
PY
[ -x $VPY ] || $PY -m venv --system-site-packages --without-pip $(q "$VENV")
# A venv made from a venv sees the base interpreter's site-packages only: add the parent's.
$PY -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' && $PY - \"\$($VPY -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))')\" <<'PY'
import site, sys
from pathlib import Path

pth = Path(sys.argv[1]) / '_sci_scale_parent_env.pth'
dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
pth.write_text(''.join(f'import site; site.addsitedir({d!r})\n' for d in dirs))
print(f'{pth}: adds {dirs}')
PY
$VPY -m pip --version || $VPY -m ensurepip --default-pip
$VPY -m pip install --disable-pip-version-check --no-index --find-links $(q "$WHEELS") $(q "$WHEELS")/megatron_core-*.whl $(q "$WHEELS")/deepspeed-*.whl
$RUN_ENV $VPY -c 'import deepspeed, megatron.core, torch, sci_scale.train.trainer; from importlib.metadata import version as v; print(*(f\"{n} {v(n)}\" for n in (\"megatron-core\", \"deepspeed\", \"torch\")))'"

TE_CMD="$VPY -m pip install --disable-pip-version-check --no-index --no-build-isolation --find-links $(q "$WHEELS/te") --find-links $(q "$WHEELS") $(q "$WHEELS")/te/*"

TESTS_CMD="$RUN_ENV $VPY -m pytest -m gpu -ra tests"

BENCH_CMD="$RUN_ENV $VPY -m sci_scale bench $CONFIG --steps $STEPS --warmup $WARMUP --baseline --json $(q "$OUT_DIR/bench-bf16.json") --markdown $(q "$OUT_DIR/bench-bf16.md")"

PROBE_CMD="$RUN_ENV $VPY -c 'import transformer_engine'"

FP8_CMD="$RUN_ENV $VPY -m sci_scale bench $CONFIG model.fp8=delayed --steps $STEPS --warmup $WARMUP --no-baseline --json $(q "$OUT_DIR/bench-fp8.json") --markdown $(q "$OUT_DIR/bench-fp8.md")"

# --- dry run -----------------------------------------------------------------------------------
bundle_status() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl) mc=("$WHEELS"/megatron_core-0.19.2-cp312-*.whl)
    local ds=("$WHEELS"/deepspeed-*.whl) te=("$WHEELS"/te/*)
    shopt -u nullglob
    if [ ${#mc[@]} -eq 0 ] || [ ${#ds[@]} -eq 0 ] || [ ! -f "$WHEELS/MANIFEST.txt" ]; then
        echo "bundle: MISSING at $WHEELS (megatron-core 0.19.2 cp312 and deepspeed wheels," \
            "MANIFEST.txt): make it with 'bash tools/gpu_wheels.sh' on a machine with PyPI access"
        return 1
    fi
    local size
    size=$(du -scb "${wheels[@]}" "$WHEELS/MANIFEST.txt" | tail -n 1 | cut -f 1)
    echo "bundle: $WHEELS: ${#wheels[@]} wheels, $(awk -v b="$size" 'BEGIN { printf "%.1f", b / 1048576 }') MiB, MANIFEST.txt;" \
        "Transformer Engine files: ${#te[@]}"
}

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh --dry-run: nothing runs. Python: $PYTHON; venv: $VENV; OUT: $OUT_DIR"
    bundle_status || true
    show() {  # name timeout condition command
        echo
        echo "== step $1 (timeout ${2}s)${3:+, $3}"
        printf '%s\n' "$4" | sed 's/^/    /'
    }
    show environment "$T_ENV" "" "$ENV_CMD"
    show install "$T_INSTALL" "" "$INSTALL_CMD"
    show install-te "$T_TE" "only when $WHEELS/te/ holds TE files, else recorded as skipped" \
        "$TE_CMD"
    show gpu-tests "$T_TESTS" "" "$TESTS_CMD"
    show bench-bf16 "$T_BENCH" "" "$BENCH_CMD"
    show bench-fp8 "$T_FP8" "fp8 when TE: only when the probe (timeout ${T_PROBE}s) $PROBE_CMD exits 0, else recorded as skipped with the reason" "$FP8_CMD"
    show report "$T_REPORT" "" "writes $OUT_DIR/gpu_check.json and $OUT_DIR/gpu_check.md from the steps and bench figures"
    echo
    echo "OUT files: gpu_check.log, gpu_check.json, gpu_check.md, bench-bf16.{json,md}, bench-fp8.{json,md}"
    exit 0
fi

# --- the run -----------------------------------------------------------------------------------
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sci-scale-gpu-check.XXXXXX")
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
rm -f "$OUT_DIR"/bench-bf16.* "$OUT_DIR"/bench-fp8.* "$OUT_DIR"/gpu_check.json "$OUT_DIR"/gpu_check.md
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
export GPU_CHECK_ENV_JSON="$WORK/env.json"
FAILED=0

record() {  # name status rc seconds timeout note
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"
}

run_step() {  # name timeout command
    local name=$1 limit=$2 cmd=$3 rc start end seconds status
    printf '%s\n' "$cmd" >"$WORK/$name.cmd"
    printf '\n===== %s (timeout %ss) =====\n%s\n-----\n' "$name" "$limit" "$cmd" | tee -a "$LOG"
    start=$(date +%s.%N)
    set +e
    timeout --kill-after=5 "$limit" bash -c "$cmd" 2>&1 | tee "$WORK/$name.log" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    end=$(date +%s.%N)
    seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout; FAILED=1 ;;
        *) status=failed; FAILED=1 ;;
    esac
    local note=""
    [ "$status" = timeout ] && note="stopped after ${limit}s"
    if [ "$name" = gpu-tests ] && [ "$rc" = 5 ]; then note="no test marked gpu was collected"; fi
    record "$name" "$status" "$rc" "$seconds" "$limit" "$note"
    printf -- '----- %s: %s (exit %s, %ss)\n' "$name" "$status" "$rc" "$seconds" | tee -a "$LOG"
}

skip_step() {  # name timeout command reason
    printf '%s\n' "$3" >"$WORK/$1.cmd"
    : >"$WORK/$1.log"
    record "$1" skipped "" 0 "$2" "$4"
    printf '\n===== %s: skipped: %s\n' "$1" "$4" | tee -a "$LOG"
}

run_step environment "$T_ENV" "$ENV_CMD"
run_step install "$T_INSTALL" "$INSTALL_CMD"
shopt -s nullglob
te_files=("$WHEELS"/te/*)
shopt -u nullglob
if [ ${#te_files[@]} -gt 0 ]; then
    run_step install-te "$T_TE" "$TE_CMD"
else
    skip_step install-te "$T_TE" "$TE_CMD" \
        "no Transformer Engine files in $WHEELS/te (the bundle leaves TE out: ~276 MB)"
fi
run_step gpu-tests "$T_TESTS" "$TESTS_CMD"
run_step bench-bf16 "$T_BENCH" "$BENCH_CMD"
set +e
probe=$(timeout "$T_PROBE" bash -c "$PROBE_CMD" 2>&1)
probe_rc=$?
set -e
if [ "$probe_rc" = 0 ]; then
    run_step bench-fp8 "$T_FP8" "$FP8_CMD"
else
    reason=$(printf '%s\n' "$probe" | grep -v '^\s*$' | tail -n 1 | tr '\t' ' ' | cut -c 1-300)
    skip_step bench-fp8 "$T_FP8" "$FP8_CMD" \
        "transformer_engine does not import in the venv (exit $probe_rc: ${reason:-no output})"
fi

# The report uses the standard library only, so it runs even when the install failed.
set +e
timeout "$T_REPORT" "$PYTHON" - "$WORK" "$OUT_DIR" "$STARTED" "$QUICK" "$STEPS" "$WARMUP" \
    "$FAILED" <<'PY' 2>&1 | tee -a "$LOG"
import json
import subprocess
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
started, quick, steps, warmup, failed = sys.argv[3], sys.argv[4] == "1", *sys.argv[5:8]


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


records = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds, limit, note = line.split("\t")
    tail = (work / f"{name}.log").read_text(errors="replace").splitlines()[-40:]
    records.append({
        "name": name, "command": (work / f"{name}.cmd").read_text().rstrip("\n"),
        "status": status, "exit_code": int(rc) if rc else None, "seconds": float(seconds),
        "timeout_s": int(limit), "note": note, "output_tail": tail,
    })  # fmt: skip
env = load(work / "env.json") or {}
bench = {kind: load(out / f"bench-{kind}.json") for kind in ("bf16", "fp8")}
commit = git("rev-parse", "--short", "HEAD")
dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else False
device = env.get("device") or next(
    (b["device"] for b in bench.values() if b), "unknown (environment step failed)"
)
date = started[:10]


def variant(summary, name):
    return next((v for v in (summary or {}).get("variants", []) if v["variant"] == name), None)


ratios = {}
bf16, fp8 = bench["bf16"], bench["fp8"]
for name in ("sci", "off"):
    a, b = variant(fp8, name), variant(bf16, name)
    if a and b:
        ratios[f"fp8_over_bf16_tokens_per_s_{name}"] = a["tokens_per_s"] / b["tokens_per_s"]
base = variant(bf16, "transformers")
if fp8 and base and variant(fp8, "off"):
    ratios["fp8_off_over_transformers_tokens_per_s"] = (
        variant(fp8, "off")["tokens_per_s"] / base["tokens_per_s"]
    )
combined = {
    "date": started, "device": device, "environment": env,
    "commit": commit + ("+local changes" if dirty else "") if commit else None,
    "quick": quick, "bench_steps": int(steps), "bench_warmup": int(warmup),
    "ok": failed == "0", "steps": records, "bench": bench, "ratios": ratios,
}  # fmt: skip
(out / "gpu_check.json").write_text(json.dumps(combined, indent=2) + "\n")

by_name = {r["name"]: r for r in records}


def cell(summary, key, names, fmt):
    values = [variant(summary, n) for n in names]
    shown = [fmt(v[key]) if v and v.get(key) is not None else "–" for v in values]
    return " / ".join(shown)


def gib(mb: float) -> str:
    return f"{mb / 1024:,.1f} GiB"


def row(kind: str, names: list[str]) -> str:
    step, summary = by_name.get(f"bench-{kind}"), bench[kind]
    bench_args = step["command"].split(" -m sci_scale ", 1)[-1].split(" --json")[0] if step else ""
    command = f"`sci-scale {bench_args}`" if step else ""
    if summary is None:
        status = step["status"] if step else "not run"
        why = f"{status}: {step['note']}" if step and step["note"] else status
        return f"| {date} | {device} | {command} | no figures ({why}; see gpu_check.log) |"
    figures = [
        "tokens/s " + cell(summary, "tokens_per_s", names, lambda x: f"{x:,.0f}"),
        "TFLOP/s per device " + cell(summary, "tflops_per_device", names, lambda x: f"{x:.4g}"),
        "MFU " + cell(summary, "mfu", names, lambda x: f"{x:.1%}"),
        "peak memory " + cell(summary, "peak_memory_mb", names, gib),
    ]
    if "sci_step_time_ratio" in summary:
        figures.append(f"SCI/off step time {summary['sci_step_time_ratio']:.3f}")
    if "tokens_per_s_vs_transformers" in summary:
        figures.append(f"vs transformers {summary['tokens_per_s_vs_transformers']:.3f}x")
    if kind == "fp8" and "fp8_over_bf16_tokens_per_s_off" in ratios:
        figures.append(f"fp8/bf16 tokens/s {ratios['fp8_over_bf16_tokens_per_s_off']:.3f}x (off)")
    return f"| {date} | {device} | {command} | {'; '.join(figures)} |"


md = [
    f"## GPU check, {date}: {device}",
    "",
    f"`bash tools/gpu_check.sh{' --quick' if quick else ''}`, commit "
    f"{combined['commit'] or 'unknown'}; torch {env.get('torch', '?')}, CUDA "
    f"{env.get('cuda', '?')}, Python {env.get('python', '?')}; {steps} timed steps per variant "
    f"after {warmup} warm-up steps. Figures are given as SCI on / SCI off / transformers.",
    "",
    "| date | device | command | figures |",
    "|---|---|---|---|",
    row("bf16", ["sci", "off", "transformers"]),
    row("fp8", ["sci", "off"]),
    "",
]
for kind, title in (("bf16", "bf16"), ("fp8", "fp8 (delayed scaling)")):
    table = out / f"bench-{kind}.md"
    if table.is_file():
        md += [f"### {title}", "", table.read_text().rstrip("\n"), ""]
md += ["### Steps", "", "| step | status | exit code | seconds | note |", "|---|---|---|---|---|"]
for r in records:
    code = "" if r["exit_code"] is None else r["exit_code"]
    md.append(f"| {r['name']} | {r['status']} | {code} | {r['seconds']:.1f} | {r['note']} |")
(out / "gpu_check.md").write_text("\n".join(md) + "\n")

print()
for r in records:
    print(f"{r['name']:<12} {r['status']:<8} exit {r['exit_code']!s:<5} {r['seconds']:>7.1f}s {r['note']}")
print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}, {out / 'gpu_check.log'}")
PY
report_rc=${PIPESTATUS[0]}
set -e
if [ "$report_rc" != 0 ]; then
    echo "gpu_check: the report failed (exit $report_rc); step logs are in $WORK" | tee -a "$LOG"
    FAILED=1
fi
if [ "$FAILED" != 0 ]; then
    echo "gpu_check: FAILED (a step failed or timed out; see $LOG)"
    exit 1
fi
echo "gpu_check: all steps passed"
