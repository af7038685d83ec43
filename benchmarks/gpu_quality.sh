#!/usr/bin/env bash
# Fine-tuning quality on one CUDA GPU: benchmarks/quality.py configurations, one process
# each, all at once (the tiny model leaves the GPU mostly idle; one process per run keeps
# them independent and seeded alike), for longer schedules than the CPU allows.
#
#   bash benchmarks/gpu_quality.sh                         # results in benchmarks/gpu/
#   RUNS=full,revffn-cal STEPS=600,1200 LIMIT=300 bash benchmarks/gpu_quality.sh
#
# Writes $OUT/quality-gpu.json (every run: curve, final eval loss, exact match, the
# command), its plot $OUT/quality-gpu.png and $OUT/quality-gpu-logs.tar.gz (one log per
# run). Each run is capped by
# `timeout $LIMIT`; a run that hits it is reported and left out of the JSON.
set -uo pipefail
case "${1:-}" in  # --help: the comment above, nothing run
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/gpu}"
PYTHON="${PYTHON:-python3}"
RUNS="${RUNS:-full,revffn-aligned,revffn-cal,revnet}"
STEPS="${STEPS:-600,1200}"
LIMIT="${LIMIT:-240}"
DEVICE="${DEVICE:-cuda}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

SECONDS=0
pids=()
for steps in ${STEPS//,/ }; do
    for run in ${RUNS//,/ }; do
        name="$run-$steps"
        timeout "$LIMIT" "$PYTHON" benchmarks/quality.py --runs "$run" --steps "$steps" \
            --eval-steps 100 --device "$DEVICE" --out "$WORK/$name.json" \
            --work-dir "$WORK/$name" >"$WORK/$name.log" 2>&1 &
        pids+=("$!:$name")
    done
done
status=0
for entry in "${pids[@]}"; do
    pid="${entry%%:*}" name="${entry#*:}"
    if ! wait "$pid"; then
        echo "gpu_quality.sh: $name failed (see its log)" >&2
        tail -n 5 "$WORK/$name.log" >&2
        status=1
    fi
done

"$PYTHON" - "$WORK" "$OUT/quality-gpu.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {}
for path in sorted(work.glob("*.json")):
    data = json.loads(path.read_text())
    for name, run in data["runs"].items():
        merged[f"{name}@{data['meta']['steps']}"] = {**run, "meta": data["meta"]}
out.write_text(json.dumps(merged, indent=1) + "\n")
print(f"\n{'run@steps':<22} {'eval loss':>9} {'vs full':>8} {'exact':>6} {'vs full':>8} {'s':>5}")
for key, r in sorted(merged.items(), key=lambda kv: (int(kv[0].split("@")[1]), kv[0])):
    steps = key.split("@")[1]
    full = merged.get(f"full@{steps}")
    dl = f"{100 * (r['eval_loss'] / full['eval_loss'] - 1):+.1f}%" if full else "-"
    dm = f"{r['exact_match'] - full['exact_match']:+.1f}" if full else "-"
    print(f"{key:<22} {r['eval_loss']:>9.4f} {dl:>8} {r['exact_match']:>5.1f}% {dm:>8} "
          f"{r['train_seconds']:>5.0f}")
EOF
"$PYTHON" benchmarks/plot_quality.py "$OUT/quality-gpu.json" "$OUT/quality-gpu.png" || true
tar -czf "$OUT/quality-gpu-logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log)
echo "gpu_quality.sh: done in ${SECONDS}s, results in $OUT"
exit $status
