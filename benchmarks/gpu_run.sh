#!/bin/bash
# The GPU runs of benchmarks/GPU.md in one command (issue 26), from a GPU machine with torch,
# triton, hypothesis and ml_dtypes; OUT names a folder for the logs: smoke, then the
# 1000-example gates (BF16, W8A8 and FP8 block scale, eager and CUDA-graph replay), the planted
# bugs, the isolation benchmark, the FP8 dot precision and the offline CLI install.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
# a failing gate saves its counterexample here (it comes back in logs.tgz)
mkdir -p $OUT/save && export DFC_GPU_SAVE=$OUT/save
N=${N:-1000}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import sys,torch,triton,numpy,hypothesis,ml_dtypes;print(sys.version.split()[0],torch.__version__,torch.version.cuda,triton.__version__,numpy.__version__,hypothesis.__version__,ml_dtypes.__version__)"
P="python3 -m pytest -q -p no:cacheprovider --durations=3 --hypothesis-show-statistics tests/controls/gpu/test_gpu_controls.py"
# (the CPU twins run in CI; FP8 block scale, new, runs below, where a failure stops nothing else)
DFC_GPU_EXAMPLES=20 timeout 170 $P -x -k "conforms and (gpu_control or gpu_vllm) and not on_cpu and not fp8" > $OUT/smoke.log 2>&1
rc=$?; tail -5 $OUT/smoke.log; [ $rc = 0 ] || { tail -80 $OUT/smoke.log; exit 1; }
for c in grouped vllm; do for m in faithful ideal; do
  DFC_GPU_EXAMPLES=$N timeout ${T:-330} $P -k "gpu_control_conforms and $c and $m and not scaled" > $OUT/$c-$m.log 2>&1 &
done; done
timeout ${T:-330} $P -k "planted and gpu_control and not scaled and not fp8" > $OUT/planted.log 2>&1 &
# issue 25/26: torch._scaled_grouped_mm (FP8 per token and channel, fp8_channel), both modes
# and its planted bugs; the whole FP8 control alone: pytest tests/controls/gpu -k scaled
DFC_GPU_EXAMPLES=$N timeout ${T:-330} $P -k "scaled and gpu_control" > $OUT/scaled.log 2>&1 &
# issue 26: a third family, JAX's lax.ragged_dot (XLA's grouped GEMM) in torch-grouped-mm's
# rounding points (tests/controls/gpu/jax_ragged.py), both modes and its planted bugs
for m in faithful ideal; do
  DFC_GPU_EXAMPLES=$N timeout ${T:-330} $P -k "gpu_jax_ragged_dot_conforms and $m" > $OUT/jax-$m.log 2>&1 &
done
timeout ${T:-330} $P -k "gpu_jax_ragged_dot_planted" > $OUT/jax-planted.log 2>&1 &
# issues 25/26: the row test's rows in line on the real FP8 and BF16 kernels at 128-512 rows
DFC_GEMM=torch timeout ${T:-330} python3 benchmarks/line_real_kernels.py > $OUT/line-rows.log 2>&1 &
# issue 26, second part: vLLM's kernel on int8 W8A8 (profile vllm-triton-tq), replayed from
# CUDA graphs with poisoned padding and caches, the padding-only planted bugs; FP8 dot precision
for m in faithful ideal; do
  DFC_GPU_EXAMPLES=$N timeout ${T:-330} $P -k "w8a8 and $m" > $OUT/w8a8-$m.log 2>&1 &
  DFC_GPU_EXAMPLES=$N timeout ${T:-330} $P -k "graph_replay_conforms and $m" > $OUT/graph-$m.log 2>&1 &
done
timeout ${T:-330} $P -k "graph_replay_padding_bug" > $OUT/graph-planted.log 2>&1 &
# issue 25/26: vLLM's kernel on FP8 block scale (profile vllm-triton-fp8; e4m3 weights, 128x128
# block scales, activations quantised per token and 128 columns by vLLM's Triton quantiser,
# carried as .carry/vllm/fp8_quant_kernel.py), both modes, and its planted bugs
for m in faithful ideal; do
  DFC_GPU_EXAMPLES=$N timeout ${T:-330} $P -k "fp8_block_conforms and $m" > $OUT/fp8-block-$m.log 2>&1 &
done
timeout ${T:-330} $P -k "gpu_vllm_fp8_block_planted" > $OUT/fp8-block-planted.log 2>&1 &
timeout 120 python3 benchmarks/fp8_dot_precision.py --out $OUT/fp8_dot.json > $OUT/fp8-dot.log 2>&1 &
(timeout 150 python3 benchmarks/gpu_gate.py 10;
 python3 -m pip install -q --no-build-isolation --no-deps -e . && cd tests && /usr/bin/time -f "check: %e s" timeout 120 python3 -m oracle.cli check controls.gpu.grouped_mm:dispatch_ffn_combine --kernel torch-grouped-mm --variants bf16 --max-examples 30; echo "check exit $?") > $OUT/gate.log 2>&1 &
wait
for f in $OUT/*.log; do echo "== $f"; grep -E "passed|failed|error|Error|seconds|slowest|^[0-9.]+s call|passing examples|Typical runtimes|dot_bits|device|quantised in torch" $f | head -20; done
cat $OUT/gate.log | tail -15
# the device returns at most 8 files: every log in one archive
(cd $OUT && tar czf logs.tgz *.log *.json save 2>/dev/null && rm -rf *.log *.json save)
