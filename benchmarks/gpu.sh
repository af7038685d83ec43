#!/usr/bin/env bash
# revffn-fx on one CUDA GPU (H100 or H200), in under 10 minutes: torch.cuda.max_memory_allocated
# and tokens/s per method, every ratio taken inside one run.
#
#   bash benchmarks/gpu.sh                    # from anywhere; results in benchmarks/gpu/
#   ONLY=exactness bash benchmarks/gpu.sh     # one part: exactness, headline, long, bench
#   ONLY=headline,long bash benchmarks/gpu.sh # or several, comma-separated
#   PYTHON=/path/to/python OUT=/tmp/x bash benchmarks/gpu.sh
#   LAYERS=16 BATCH=2 ONLY=headline ...       # the headline's depth and batch
#
# Needs a Python with CUDA torch, transformers, click, rich (the repository is put on
# PYTHONPATH, nothing is installed or downloaded: the models are synthetic). The default
# parts, each capped by `timeout` (LIMIT_* seconds), 9.5 minutes at most together:
#   1. exactness (LIMIT_EXACT=120): the bf16 exactness table, benchmarks/gpu_exactness.py:
#      each coupling's generated backward and plain bf16 autograd against float64 of the
#      same function (the criterion of rf.verify); Mixtral-shaped, hidden 1024, 8 layers,
#      2 x 512 tokens; $OUT/exactness.json and .md; the part fails if a coupling fails;
#   2. headline (LIMIT_STEP=240): revffn bench --step, the peak of a whole training step
#      (forward, loss, backward, AdamW) in bf16, Qwen1.5-MoE-shaped at its real width
#      (hidden 2048, 60 experts top-4, vocab 151936), LAYERS deep (default 16 on a GPU with
#      more than 100 GB, else 8: the baseline keeps every gradient), batch BATCH (2) x seq
#      4096; methods ckpt (the baseline of the ratios), exact, offload (the exact mode with
#      its saved tensors in pinned host memory), revffn, revnet, momentum;
#      $OUT/headline/*.json and .txt;
#   3. long (LIMIT_LONG=210): one long-context point, Mixtral-shaped hidden 1024 (8 experts
#      top-2, vocab 32000), LONG_LAYERS (16) layers, batch 1 x LONG_SEQ (32768) tokens,
#      bf16; methods exact (the baseline of the ratios), offload, revnet, revffn, momentum,
#      bdia (momentum and bdia on int32 exact streams, the bf16 default);
#      $OUT/long/*.json and .txt.
#   ONLY=bench: the older per-part runs (revffn bench, mixtral-like, fp32 4 x 256 and bf16
#      8 x 2048; LIMIT_FP32=200, LIMIT_BF16=220), about 7 minutes more.
# At the end, one table per run: max_memory_allocated and tokens/s, with their ratios.
# Exit status: 0 when every part finished (and every coupling passed the exactness table);
# 3 when no CUDA device is visible; otherwise the status of the first part that failed
# (124: it hit its timeout).
set -uo pipefail
case "${1:-}" in  # --help: the comment above, nothing run
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/gpu}"
ONLY="${ONLY:-exactness,headline,long}"
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

GPU_GB=$("$PYTHON" - <<'EOF'
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
p = torch.cuda.get_device_properties(0)
print(f"gpu.sh: {p.name}, {p.total_memory / 1e9:.0f} GB, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}", file=sys.stderr, flush=True)
print(int(p.total_memory / 1e9))
EOF
) || exit 3
LAYERS="${LAYERS:-$([[ $GPU_GB -gt 100 ]] && echo 16 || echo 8)}"

status=0
fail() {  # fail NAME RC: remember the first failure
    echo "gpu.sh: $1 failed with status $2" >&2
    [[ $status -eq 0 ]] && status=$2
}
want() { [[ ",$ONLY," == *",$1,"* ]]; }

run_step() {  # run_step DIR NAME TIMEOUT_S ARGS...: one revffn bench --step, JSON + table
    local dir="$1" name="$2" limit="$3"
    shift 3
    mkdir -p "$OUT/$dir"
    echo "== $dir/$name: revffn bench --step $* --device cuda"
    timeout "$limit" "$PYTHON" -m revffn_fx bench --step "$@" --device cuda \
        --json "$OUT/$dir/$name.json" | tee "$OUT/$dir/$name.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && fail "$dir/$name" $rc
}

SECONDS=0
if want exactness; then
    echo "== exactness: benchmarks/gpu_exactness.py (bf16)"
    timeout "${LIMIT_EXACT:-120}" "$PYTHON" benchmarks/gpu_exactness.py --device cuda \
        --dtype bfloat16 --preset mixtral-shaped --hidden 1024 --layers 8 --batch 2 \
        --seq 512 --json "$OUT/exactness.json" | tee "$OUT/exactness.md"
    rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && fail exactness $rc
fi
if want headline; then
    run_step headline "qwen1.5-moe-shaped-bf16-L$LAYERS-b${BATCH:-2}s4096" "${LIMIT_STEP:-240}" \
        --synthetic qwen1.5-moe-shaped --layers "$LAYERS" --batch "${BATCH:-2}" --seq 4096 \
        --dtype bfloat16 --repeats 2 \
        --methods "${STEP_METHODS:-ckpt,exact,offload,revffn,revnet,momentum}"
fi
if want long; then
    run_step long "mixtral-shaped-h1024-bf16-L${LONG_LAYERS:-16}-s${LONG_SEQ:-32768}" \
        "${LIMIT_LONG:-210}" --synthetic mixtral-shaped --hidden 1024 \
        --layers "${LONG_LAYERS:-16}" --batch 1 --seq "${LONG_SEQ:-32768}" --dtype bfloat16 \
        --repeats 2 --methods "${LONG_METHODS:-exact,offload,revnet,revffn,momentum,bdia}"
fi
if want bench; then
    for spec in "mixtral-like-fp32 ${LIMIT_FP32:-200} --batch 4 --seq 256 --layers 4,8,16,32 --dtype float32" \
                "mixtral-like-bf16-b8s2048 ${LIMIT_BF16:-220} --batch 8 --seq 2048 --layers 8,32 --dtype bfloat16"; do
        read -r name limit rest <<<"$spec"
        echo "== $name: revffn bench --synthetic mixtral-like $rest --device cuda"
        # shellcheck disable=SC2086
        timeout "$limit" "$PYTHON" -m revffn_fx bench --synthetic mixtral-like $rest \
            --repeats 5 --device cuda --json "$OUT/$name.json" --plot "$OUT/$name.png"
        rc=$?
        [[ $rc -ne 0 ]] && fail "$name" $rc
    done
fi

# one table per whole-step run: max_memory_allocated and tokens/s, ratios to the run's
# baseline (ckpt, or exact where ckpt was not run), all from the same run
"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted([*out.glob("headline/*.json"), *out.glob("long/*.json")]):
    for res in json.loads(path.read_text())["results"]:
        ref_name = res.get("reference", "ckpt")
        rows = {r["method"]: r for r in res["rows"]}
        ref = rows.get(ref_name) or {}
        tokens = res["batch"] * res["seq"]
        print(f"\n{path.parent.name}/{path.stem}: {res['layers']} layers, hidden {res['hidden']}, "
              f"batch {res['batch']} x seq {res['seq']}, {res['dtype']}, "
              f"{res['machine'].get('gpu', '?')}")
        print(f"{'method':<10} {'max_alloc MiB':>14} {'x ' + ref_name:>9} {'tokens/s':>10} "
              f"{'x ' + ref_name:>9}")
        for name, r in rows.items():
            if r.get("error"):
                print(f"{name:<10} error: {r['error']}")
                continue
            mem, t = r.get("peak_bytes"), r.get("step_s")
            tps = tokens / t if t else None
            rtps = tokens / ref["step_s"] if ref.get("step_s") else None
            xm = f"{mem / ref['peak_bytes']:.3f}" if mem and ref.get("peak_bytes") else "-"
            xt = f"{tps / rtps:.3f}" if tps and rtps else "-"
            print(f"{name:<10} {mem / 2**20 if mem else 0:>14,.0f} {xm:>9} "
                  f"{tps or 0:>10,.0f} {xt:>9}")
EOF
echo "gpu.sh: done in ${SECONDS}s, results in $OUT"
exit $status
