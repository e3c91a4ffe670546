#!/usr/bin/env bash
# Every GPU check of the quantized matmul in one device call (at most 9 minutes: each step has a time limit).
#
#   bash benchmarks/gpu_session.sh            # outputs under $OUT (the device tool's folder)
#
# Run it from the repository root on the device machine, carrying .whl/ (that
# machine has JAX with CUDA but not array-api-compat; the wheel is installed to
# /tmp/site). Each step has its own time limit and writes its own file, so a
# step that runs out of time still leaves the others' results:
#   int_accumulation_check.txt  exact integer sums per formulation (+ hlo/ of failures)
#   test_matmul_jax.txt         tests/test_matmul.py on jax and jax-jit
#   gpu_bitexact.txt            NumPy vs GPU codes and scales
#   gpu_arith_check.txt         which float32 operations differ from NumPy (division)
#   gpu_compile_crash.txt       XLA:GPU compile aborts, one child process per formulation
#   matmul_jax_gpu.md           benchmarks/matmul.py --backends jax --large
#   compile_gpu.md              benchmarks/compile.py
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# Output reaches the files line by line, so a step stopped by its time limit keeps
# what it printed (timeout sends SIGINT to pytest so that it prints its summary).
export PYTHONUNBUFFERED=1
# Several processes share the GPU (pytest-xdist workers, gpu_compile_crash.py's children).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if ! python3 -c "import array_api_compat" 2>/dev/null; then
    wheel=$(ls .whl/array_api_compat-*.whl 2>/dev/null | head -n 1)
    if [ -z "$wheel" ]; then
        echo "array_api_compat is missing and no wheel is in .whl/: carry .whl" >&2
        exit 2
    fi
    python3 -m pip install -q --no-deps --no-index --disable-pip-version-check \
        --target /tmp/site "$wheel"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

timeout 100 python3 benchmarks/int_accumulation_check.py --cases 60 --dump "$OUT/hlo" \
    > "$OUT/int_accumulation_check.txt" 2>&1
echo "int_accumulation_check: exit $?"
# Float reference checks need full float32 products (the GPU default is TF32).
# Workers (pytest-xdist, installed there) so that an XLA abort fails one test, not the run;
# pytest-benchmark warns under xdist, and the suite turns warnings into errors.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s INT 130 python3 -m pytest -q -p no:cacheprovider \
    -p no:benchmark -p xdist -n 6 -rfE --tb=short -k "jax" tests/test_matmul.py \
    > "$OUT/test_matmul_jax.txt" 2>&1
echo "test_matmul (jax): exit $?"
timeout 40 python3 benchmarks/gpu_bitexact.py > "$OUT/gpu_bitexact.txt" 2>&1
echo "gpu_bitexact: exit $?"
timeout 40 python3 benchmarks/gpu_arith_check.py > "$OUT/gpu_arith_check.txt" 2>&1
echo "gpu_arith_check: exit $?"
timeout 70 python3 benchmarks/gpu_compile_crash.py > "$OUT/gpu_compile_crash.txt" 2>&1
echo "gpu_compile_crash: exit $?"
timeout 110 python3 benchmarks/matmul.py --backends jax --large > "$OUT/matmul_jax_gpu.md" 2>&1
echo "matmul benchmark: exit $?"
# Compile time on the GPU, where `auto` picks the loop-free formulations (docs/inference.md).
timeout 50 python3 benchmarks/compile.py > "$OUT/compile_gpu.md" 2>&1
echo "compile benchmark: exit $?"
tail -n 3 "$OUT/int_accumulation_check.txt" "$OUT/test_matmul_jax.txt"
