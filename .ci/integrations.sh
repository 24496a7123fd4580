#!/usr/bin/env bash
# CI integration stage: the fine-tuning tools the kernels plug into, each in its own venv, since they pin different
# PEFT / transformers versions. Called by .ci/run after the main suite (which covers PEFT 0.22 in the main venv).
#
#   venv          what it holds (pinned: .ci/integrations/<venv>.txt, the full `pip freeze` of a working venv)
#   litgpt        litgpt 0.5.13: tests/integrations/test_litgpt.py, then LitGPT's own test_lora.py (from its PyPI
#                 sdist) unpatched and patched, outcomes compared (tests/integrations/litgpt_upstream.py)
#   deepspeed     deepspeed 0.19.8, transformers 5.25: the 2-process ZeRO-3 Trainer test (gloo, CPU accelerator)
#   llamafactory  llamafactory 0.9.5, peft 0.18.1, transformers 4.57.6: its YAML run + the PEFT tests on peft 0.18
#   axolotl       axolotl 0.19.0, peft 0.20.0, transformers 5.16.1: its YAML run + the PEFT tests on peft 0.20
#
# Each venv: torch 2.13.0 (the CPU wheel on this machine's disk), then its frozen list with --no-deps (every version
# pinned, nothing resolved, no CUDA torchvision / torchaudio pulled in), then this package (--no-deps, editable).
# Triton (1 GB a venv) only where the tool imports it (axolotl): on the CPU the fused op runs its torch backend.
# LORANULL_REQUIRE makes a tool's tests fail, never skip, when the tool does not import; each tool's tests count the
# calls that reach the fused op and fail without them. Each stage prints its time.
#
#   bash .ci/integrations.sh [venv ...]      # default: all four; LORANULL_CI_VENVS=<dir> keeps the venvs there
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -n "${LORANULL_CI_VENVS:-}" ]; then
    VENVS=$LORANULL_CI_VENVS
else  # ~8 GB of venvs: removed when the stage ends, pass or fail
    VENVS=$(mktemp -d -t loranull-ci-venvs-XXXXXX)
    trap 'rm -rf "$VENVS"' EXIT
fi
PYTHON=${PYTHON:-python3}
PEFT_TESTS=(tests/integrations/test_peft.py tests/integrations/test_peft_quantized.py
            tests/test_adapters_io.py::test_export_peft_loads_to_the_same_outputs
            tests/test_adapters_io.py::test_gpt2_conv1d_save_load_and_export
            tests/test_quantized_bases.py::test_export_peft_loads_onto_the_same_quantized_model)
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 WANDB_MODE=disabled

make_venv() {  # make_venv NAME: the venv $VENVS/NAME from .ci/integrations/NAME.txt
    local name=$1 t0=$SECONDS
    rm -rf "${VENVS:?}/$name"
    "$PYTHON" -m venv "$VENVS/$name"
    local pip="$VENVS/$name/bin/pip"
    "$pip" install --quiet torch==2.13.0
    "$pip" install --quiet --no-deps -r ".ci/integrations/$name.txt"
    "$pip" install --quiet --no-deps -e "$ROOT"
    echo "[integrations] $name: venv built in $((SECONDS - t0)) s"
}

run_tests() {  # run_tests NAME REQUIRED_MODULES PYTEST_ARGS...: pytest in that venv
    local name=$1 require=$2 t0=$SECONDS
    shift 2
    LORANULL_REQUIRE=$require "$VENVS/$name/bin/python" -m pytest -q -p no:cacheprovider "$@"
    echo "[integrations] $name: tests ran in $((SECONDS - t0)) s"
}

stage_litgpt() {
    make_venv litgpt
    run_tests litgpt litgpt tests/integrations/test_litgpt.py
    local t0=$SECONDS src
    src="$VENVS/litgpt-sdist"
    rm -rf "$src" && mkdir -p "$src"
    "$VENVS/litgpt/bin/pip" download --quiet --no-deps --no-binary :all: litgpt==0.5.13 -d "$src"
    tar xzf "$src"/litgpt-0.5.13.tar.gz -C "$src"
    "$VENVS/litgpt/bin/python" -m tests.integrations.litgpt_upstream "$src/litgpt-0.5.13/tests"
    echo "[integrations] litgpt: LitGPT's own LoRA tests (twice) ran in $((SECONDS - t0)) s"
}

stage_deepspeed() {
    make_venv deepspeed
    run_tests deepspeed deepspeed tests/integrations/test_deepspeed.py
}

stage_llamafactory() {
    make_venv llamafactory
    run_tests llamafactory llamafactory,peft,bitsandbytes tests/integrations/test_llamafactory.py "${PEFT_TESTS[@]}"
}

stage_axolotl() {
    make_venv axolotl
    run_tests axolotl axolotl,peft,bitsandbytes tests/integrations/test_axolotl.py "${PEFT_TESTS[@]}"
}

start=$SECONDS
for name in "${@:-litgpt deepspeed llamafactory axolotl}"; do
    for n in $name; do
        t0=$SECONDS
        "stage_$n"
        echo "[integrations] stage $n: $((SECONDS - t0)) s"
    done
done
echo "[integrations] all stages: $((SECONDS - start)) s"
