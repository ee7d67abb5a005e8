#!/usr/bin/env bash
# One device call that runs several benchmark stages in order, each under its own time limit, so a
# hang or crash in one stage does not lose the others. Results (JSON) and logs go to $OUT (or
# bench/results when OUT is unset). Usage:  bash bench/gpu_run.sh STAGE[:SECONDS] ...
#   stages: see the case list below (env, tests, gpupipe, gpuattn, kernels, attncfg, dit448, fp8, ...)
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export S2V_BENCH_OUT=$OUT PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if [ "${1:-}" != "--one" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# S2V_CLOCK_LOG=1: log SM clock, power, temperature and throttle reasons every 250 ms for the
# whole call into $OUT/clocks_power.csv (the step runs at the board power limit: NOTES section 15)
if [ "${1:-}" != "--one" ] && [ -n "${S2V_CLOCK_LOG:-}" ]; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 250 > "$OUT/clocks_power.csv" 2>&1 &
  trap "kill $! 2>/dev/null" EXIT
fi
# the pytest-benchmark regression suite (bench/README.md): quick tier against the newest baseline
# of this device kind in bench/baselines/<device>/ (if any), baseline refresh, full tier
device_tag() { python3 -c "import sys; sys.path.insert(0, 'bench'); from results_io import device_tag; print(device_tag())"; }
regress_commit() { echo "${S2V_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"; }
pytest_bench() { python3 -m pytest bench/ -p no:cacheprovider -q -rs --benchmark-only ${REGRESS_K:+-k "$REGRESS_K"} \
                   --benchmark-storage="file://$OUT/.benchmarks" --benchmark-columns=min,median,max,rounds "$@"; }
stage() {
  case "$1" in
    regress) dev=$(device_tag); base=${REGRESS_BASELINE:-$(ls bench/baselines/"$dev"/*.json 2>/dev/null | sort | tail -1)}
             echo "device $dev; baseline ${base:-none (no comparison)}"
             pytest_bench -m quick --benchmark-json="$OUT/regress-$dev.json" \
               ${base:+--benchmark-compare=$base --benchmark-compare-fail=median:${REGRESS_FAIL:-7%}} ;;
    regress_baseline) dev=$(device_tag); mkdir -p "$OUT/baselines/$dev"
             pytest_bench -m quick --benchmark-json="$OUT/baselines/$dev/$(date +%Y%m%d)-$(regress_commit).json" ;;
    regress_full) pytest_bench -m full \
               --benchmark-json="$OUT/regress_full-$(device_tag)${REGRESS_K:+-${REGRESS_K//[^A-Za-z0-9]/_}}.json" ;;
    gpusmoke) python3 bench/gpu_smoke.py ;;
    streaming) python3 bench/bench_streaming.py --sizes 704x384 --modes bf16_reference,bf16,fp8 --blocks 10 ;;
    streaming3) python3 bench/bench_streaming.py --sizes 704x384,720x400,448x832 --modes bf16,fp8 --blocks 9 --topic streaming_sizes ;;
    gpustream) python3 -m pytest -q -p no:cacheprovider -rs tests/test_liveavatar_golden.py tests/test_vae_stream.py tests/test_vae_fast.py tests/test_kernels_channel_norm.py tests/test_custom_ops.py ;;
    vaetile) python3 bench/vae_tiling_error.py ;;
    env) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
         python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())" ;;
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_*.py tests/test_fast_path.py ;;
    quicktests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels_rms_norm.py tests/test_kernels_qk_norm_rope.py tests/test_offload.py tests/test_fp8.py ;;
    kernels) python3 bench/bench_kernels.py --quick ;;
    dit448) python3 bench/bench_dit.py --sizes 448x832 --modes ${DIT_MODES:-forward,reference,fast,fast_sep_gelu} --topic ${DIT_TOPIC:-dit} ;;
    dit704) python3 bench/bench_dit.py --sizes 704x1280 --modes reference,fast --warmup 0 --iters 2 --topic dit704 ;;
    dit704fold) python3 bench/bench_dit.py --sizes 704x1280 --modes ${DIT_MODES:-fast_nofold,fast} --warmup 0 --iters 2 --topic dit704_fold ;;
    compile) python3 bench/bench_dit.py --sizes 448x832 --modes fast,compile --topic dit_compile ;;
    vae) python3 bench/bench_vae.py ;;
    offload) python3 bench/bench_offload.py ;;
    offload704) python3 bench/bench_offload.py --height 704 --width 1280 --iters 2 --topic offload704 ;;
    profile) python3 bench/profile_dit.py --profile-dir "$OUT/profile" ;;
    profilestack) python3 bench/profile_dit.py --profile-dir "$OUT/profile_stack" --with-stack ;;
    profilefp8) python3 bench/profile_dit.py --profile-dir "$OUT/profile_fp8" --quantization fp8 ;;
    gpuquant) python3 -m pytest -q -p no:cacheprovider -rs tests/test_fp8.py -k "gpu" ;;
    fp8) python3 bench/bench_fp8.py ;;
    audio) python3 bench/bench_audio_features.py ;;
    attnlayout) python3 bench/bench_attention_layout.py ;;
    rmsnorm) python3 bench/bench_kernels.py --quick --only kernel_rms_norm --topic kernels_rms_norm ;;
    fp8dit) python3 bench/bench_fp8.py --skip-attention --skip-gemm --topic fp8_dit ;;
    fp8dit704) python3 bench/bench_fp8.py --skip-attention --skip-gemm --dit-size 704x1280 --dit-iters 2 --topic fp8_dit704 ;;
    flash) python3 bench/bench_kernels.py --quick --only attention_triton --no-cross --topic flash_configs ;;
    attncfg) python3 bench/bench_attention_configs.py --warmup 3 --iters 10 ;;
    attncfgbf16) python3 bench/bench_attention_configs.py --warmup 3 --iters 10 --only bf16 --topic attention_configs_bf16 ;;
    gpuflash) python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_flash_attention.py ;;
    attncfgfp8) python3 bench/bench_attention_configs.py --warmup 3 --iters 10 --only fp8 --topic attention_configs_fp8 ;;
    dittriton) python3 bench/bench_dit.py --sizes 448x832 --modes fast --attention-backend triton --topic dit_attn_triton ;;
    ditauto) python3 bench/bench_dit.py --sizes 448x832 --modes fast --topic dit_attn_auto ;;
    ditauto704) python3 bench/bench_dit.py --sizes 704x1280 --modes fast --warmup 0 --iters 2 --topic dit704_attn_auto ;;
    ditcudnn) python3 bench/bench_dit.py --sizes 448x832 --modes fast --attention-backend cudnn --topic dit_attn_cudnn ;;
    gpupipe) python3 -m pytest -q -p no:cacheprovider -rs tests/test_pipeline_gpu.py tests/test_offload.py ;;
    gpuattn) python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_flash_attention.py tests/test_fp8.py ;;
    gpucuda) python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cuda_attention.py ;;
    attncfgcuda) python3 bench/bench_attention_configs.py --warmup 3 --iters 10 --only cuda --topic attention_configs_cuda ;;
    ncuattn) python3 -c "from s2v_fast.kernels import cuda_attention as c; c.build(); c.build(kernel='fp8')"
             ncu --kernel-name regex:"flash_fwd_sm90|fp8_fwd_sm90" --launch-skip 1 --launch-count 2 \
               --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
               --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
               python3 bench/ncu_attention.py > "$OUT/ncu_attention.txt" 2>&1; tail -c 20000 "$OUT/ncu_attention.txt" ;;
    ncustall) python3 -c "from s2v_fast.kernels import cuda_attention as c; c.build(); c.build(kernel='fp8')"
             ncu --kernel-name regex:"flash_fwd_sm90|fp8_fwd_sm90" --launch-skip 1 --launch-count 2 \
               --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active" \
               python3 bench/ncu_attention.py > "$OUT/ncu_stalls.txt" 2>&1; grep -v "^==PROF==" "$OUT/ncu_stalls.txt" | tail -c 12000 ;;
    sustained) python3 bench/bench_sustained.py ;;
    cudavariants) python3 bench/sweep_cuda_attention.py --variant nolazy=-DS2V_LAZY_RESCALE=0 --variant lazy8= \
                    --variant lazy16=-DS2V_LAZY_RESCALE=16 --warmup 5 --iters 20 ;;
    cudaattn) python3 bench/bench_kernels.py --quick --only attention_cuda attention_cudnn attention_triton --no-cross --topic attention_cuda ;;
    gpufold) python3 -m pytest -q -p no:cacheprovider -rs tests/test_folded_output.py tests/test_text_kv.py tests/test_fast_path.py \
               tests/test_kernels_audio_injection.py tests/test_kernels_gated_residual.py ;;
    gputext) python3 -m pytest -q -p no:cacheprovider -rs tests/test_text_kv.py tests/test_kernels_flash_attention.py ;;
    textattn) python3 bench/bench_kernels.py --quick --only kernel_text_attention --topic kernels_text_attention ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}
if [ "${1:-}" = "--one" ]; then stage "$2"; exit $?; fi
for spec in "$@"; do
  name=${spec%%:*}; secs=${spec#*:}; [ "$secs" = "$spec" ] && secs=600
  echo "=== stage $name (limit ${secs}s) $(date +%T)"
  t0=$(date +%s)
  timeout -k 10 "$secs" bash "$0" --one "$name" 2>&1 | tee -a "$OUT/log.txt"
  echo "=== stage $name rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/log.txt"
done
