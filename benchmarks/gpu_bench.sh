#!/usr/bin/env bash
# The GPU benchmark: reflora on CuPy against transformers + PEFT under torch CUDA eager, same workload as the
# CPU figures (GPT-2 small, LoRA r=8 on c_attn/c_proj, batch 4, seq 128, float32), plus a sequence sweep.
#
# Sized for one short device lease (well under 15 minutes: two model builds per worker, ~10 workers):
#   bash benchmarks/gpu_bench.sh [OUT_DIR]
# Needs CuPy, torch (CUDA), transformers and peft in `python3` (the H200 image has all four); reflora itself
# is imported from this checkout. Writes OUT_DIR/gpu-bench.json, OUT_DIR/gpu-seq-len.png and a log.
set -euo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# CuPy's namespace lacks parts of the array API standard; reflora uses array-api-compat's CuPy wrapper.
# The device image has no internet: carry its wheel in .whl/ (see docs/performance.md) if it is missing.
python3 -c "import array_api_compat" 2>/dev/null || python3 -m pip install -q --no-index --find-links .whl \
  --target /tmp/site array-api-compat && export PYTHONPATH="$PYTHONPATH:/tmp/site"
python3 - <<'PY'
import array_api_compat, cupy, torch, transformers, peft
print("cupy", cupy.__version__, "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
print("gpu", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
# float32 main figures, float64 ratio, and a sequence-length sweep for the plot
python3 -m reflora.tools bench --backend cupy --device cuda --warmup 3 --repeats 20 --rounds 2 \
  --matmul-n 8192 --sweep-seq-len 64,128,256,512,1024 \
  --json "$out/gpu-bench.json" --plot "$out/gpu-seq-len.png" 2>&1 | tee "$out/gpu-bench.log"
# a bigger batch, where the GPU is busier than kernel launches
python3 -m reflora.tools bench --backend cupy --device cuda --warmup 3 --repeats 20 --batch 32 --seq-len 512 \
  --no-float64 --matmul-n 8192 --json "$out/gpu-bench-b32-t512.json" 2>&1 | tee -a "$out/gpu-bench.log"
