#!/usr/bin/env bash
# revffn bench on one CUDA GPU: torch.cuda.max_memory_allocated and tokens/s per method.
#
#   bash benchmarks/gpu.sh              # from anywhere; results in benchmarks/gpu/
#   PYTHON=/path/to/python OUT=/tmp/x bash benchmarks/gpu.sh
#   LIMIT_FP32=120 LIMIT_BF16=130 bash benchmarks/gpu.sh   # tighter caps (seconds)
#   ONLY=headline bash benchmarks/gpu.sh   # only the whole-step headline (3.), ~5 minutes
#   LAYERS=16 BATCH=2 ONLY=headline ...     # its depth and batch (defaults)
#
# Needs a Python with CUDA torch, transformers, click, rich, matplotlib (the repository is put
# on PYTHONPATH, nothing is installed or downloaded: the models are synthetic). Two runs, each
# capped by `timeout`, so the whole script ends in under 8 minutes even on a slow GPU:
#   1. the reference config of docs/benchmarks.md (mixtral-like, batch 4 x seq 256, fp32,
#      depths 4/8/16/32), for the same figures as the CPU run plus max_memory_allocated;
#   2. a larger step (batch 8 x seq 2048, bf16, depths 8 and 32), where activations, not
#      parameters, dominate the GPU memory;
#   3. the headline (revffn bench --step): peak of a whole training step with AdamW, bf16,
#      Qwen1.5-MoE-shaped at its real width (hidden 2048, 60 experts top-4, vocab 151936),
#      LAYERS deep (16: the AdamW baseline with all gradients must fit 141 GB), seq 2048
#      and 4096; JSON and the table in $OUT/headline/.
# Exit status: 0 when both runs finished; 3 when no CUDA device is visible; otherwise the
# status of the first run that failed (124: it hit its timeout).
set -uo pipefail
case "${1:-}" in  # --help: the comment above, nothing run
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/gpu}"
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    # the project venv, when it has CUDA torch
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c \
        'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'EOF' || exit 3
import sys
try:
    import torch
except ImportError:
    print(f"gpu.sh: {sys.executable} has no torch; set PYTHON to a Python with CUDA torch",
          file=sys.stderr)
    sys.exit(1)
if not torch.cuda.is_available():
    print("gpu.sh: no CUDA device visible to torch", torch.__version__, file=sys.stderr)
    sys.exit(1)
print(f"gpu.sh: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}", flush=True)
EOF

status=0
run() {  # run NAME TIMEOUT_S ARGS...: one bench, JSON and PNG into $OUT
    local name="$1" limit="$2"
    shift 2
    echo "== $name: revffn bench $* --device cuda"
    timeout "$limit" "$PYTHON" -m revffn_fx bench "$@" --device cuda \
        --json "$OUT/$name.json" --plot "$OUT/$name.png"
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "gpu.sh: $name failed with status $rc" >&2
        [[ $status -eq 0 ]] && status=$rc
    fi
}

run_step() {  # run_step NAME TIMEOUT_S ARGS...: one whole-step headline, JSON + table
    local name="$1" limit="$2"
    shift 2
    mkdir -p "$OUT/headline"
    echo "== $name: revffn bench --step $* --device cuda"
    timeout "$limit" "$PYTHON" -m revffn_fx bench --step "$@" --device cuda \
        --json "$OUT/headline/$name.json" | tee "$OUT/headline/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        echo "gpu.sh: $name failed with status $rc" >&2
        [[ $status -eq 0 ]] && status=$rc
    fi
}

SECONDS=0
if [[ "${ONLY:-}" != "headline" ]]; then
run mixtral-like-fp32 "${LIMIT_FP32:-200}" --synthetic mixtral-like --layers 4,8,16,32 --batch 4 --seq 256 \
    --repeats 5 --dtype float32
run mixtral-like-bf16-b8s2048 "${LIMIT_BF16:-220}" --synthetic mixtral-like --layers 8,32 --batch 8 --seq 2048 \
    --repeats 5 --dtype bfloat16
fi
STEP_METHODS="${STEP_METHODS:-ckpt,exact,revffn,revnet,revffn/no-head}"
for seq in 2048 4096; do
    run_step "qwen1.5-moe-shaped-bf16-L${LAYERS:-16}-b${BATCH:-2}s$seq" "${LIMIT_STEP:-170}" \
        --synthetic qwen1.5-moe-shaped --layers "${LAYERS:-16}" --batch "${BATCH:-2}" \
        --seq "$seq" --dtype bfloat16 --repeats 2 --methods "$STEP_METHODS"
done

# one summary line per (run, depth, method): max_memory_allocated and tokens/s
"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):  # not headline/ (own table)
    data = json.loads(path.read_text())
    print(f"\n{path.stem}: {data['machine'].get('gpu', '?')}, batch {data['batch']} x seq "
          f"{data['seq']}, {data['dtype']}")
    print(f"{'layers':>6} {'method':<11} {'max_alloc MiB':>14} {'x ckpt':>7} {'tokens/s':>10} "
          f"{'x ckpt':>7} {'saved MiB':>10}")
    ref = {r["depth"]: r for r in data["rows"] if r["method"] == "checkpoint"}
    for r in data["rows"]:
        if r["error"]:
            print(f"{r['depth']:>6} {r['method']:<11} error: {r['error']}")
            continue
        c = ref.get(r["depth"]) or {}
        mem, tps = r["cuda_max_allocated"], r["tokens_per_s"]
        xm = f"{mem / c['cuda_max_allocated']:.2f}" if c.get("cuda_max_allocated") else "-"
        xt = f"{tps / c['tokens_per_s']:.2f}" if c.get("tokens_per_s") else "-"
        mem_s = f"{mem / 2**20:.1f}" if mem else "-"
        print(f"{r['depth']:>6} {r['method']:<11} {mem_s:>14} {xm:>7} {tps:>10,.0f} "
              f"{xt:>7} {r['saved_bytes'] / 2**20:>10.1f}")
EOF
echo "gpu.sh: done in ${SECONDS}s, results in $OUT"
exit $status
