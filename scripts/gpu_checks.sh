#!/bin/bash
# The GPU checks, as one short script for a lent GPU machine (run from the repo root, on a
# clean committed tree so the result files name the commit). Each writes docs/results/<name>.json
# with its provenance; one failing does not stop the others. Pick some with arguments:
#   bash scripts/gpu_checks.sh                 # all
#   bash scripts/gpu_checks.sh gpu_lm_fsdp     # only the LM FSDP check (< 3 min on an H200)
# gpu_vllm_onpolicy needs vllm (pip install "kd-lightning[vllm]"): skipped, not failed, without it.
set -uo pipefail
CHECKS=("$@")
[ ${#CHECKS[@]} -eq 0 ] && CHECKS=(gpu_lm_fsdp gpu_teacher_speed gpu_throughput gpu_vllm_onpolicy)
status=0
for check in "${CHECKS[@]}"; do
    case "$check" in
        gpu_lm_fsdp) args=(--out docs/results/gpu_lm_fsdp.json) ;;
        gpu_teacher_speed) args=(--out docs/results/gpu_teacher_speed.json) ;;
        gpu_throughput) args=(--json docs/results/gpu_throughput.json) ;;
        gpu_vllm_onpolicy) args=(--out docs/results/gpu_vllm_onpolicy.json) ;;
        *) echo "gpu_checks: unknown check '$check' (gpu_lm_fsdp, gpu_teacher_speed, gpu_throughput, gpu_vllm_onpolicy)" >&2; exit 2 ;;
    esac
    if [ "$check" = gpu_vllm_onpolicy ] && ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"; then
        echo "== $check skipped: vllm is not installed (pip install \"kd-lightning[vllm]\")"
        continue
    fi
    echo "== $check"
    timeout 600 python -m "benchmarks.$check" "${args[@]}" || { echo "$check failed" >&2; status=1; }
done
exit $status
