#!/bin/bash
# The CUDA 12 flavour of the addon, for hosts whose NVIDIA driver is older than the default CUDA 13
# build needs (R525..R570: CUDA 12 runs on 525+ by minor version compatibility). lib/native.ts loads
# prebuilds/linux-x64/cuda12/xft.node instead of the default when /proc/driver/nvidia/version says so.
# The toolkit is Debian's nvidia-cuda-toolkit 12.4 (trixie non-free; ~1 GB of packages, mostly
# nvidia-cuda-dev), downloaded with apt's own client into a private folder and unpacked there
# (dpkg-deb -x): nothing is installed on the system. Needs apt-get, dpkg-deb, g++ <= 13, cmake.
# Usage, from the repo root: bash scripts/build-cuda12.sh   (XFT_CUDA12_HOME: where the toolkit goes)
set -euo pipefail
HOME_DIR=${XFT_CUDA12_HOME:-$HOME/.cache/xft-cuda12}
ROOT=$HOME_DIR/root
PKGS="nvidia-cuda-toolkit nvidia-cuda-dev libnvvm4 libcudart12 libcub-dev libthrust-dev libcu++-dev"
mkdir -p "$HOME_DIR"/{lists/partial,cache/archives/partial,debs,tree}
if [ ! -x "$ROOT/bin/nvcc" ]; then
  echo 'deb http://deb.debian.org/debian trixie main contrib non-free' >"$HOME_DIR/sources.list"
  touch "$HOME_DIR/status"
  APT=(-o Dir::Etc::sourcelist="$HOME_DIR/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$HOME_DIR/lists"
       -o Dir::Cache="$HOME_DIR/cache" -o Dir::State::status="$HOME_DIR/status" -o APT::Get::List-Cleanup=0)
  apt-get "${APT[@]}" update -q
  (cd "$HOME_DIR/debs" && apt-get "${APT[@]}" download $PKGS)
  for deb in "$HOME_DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$HOME_DIR/tree"; done
  # the layout CMake and nvcc expect of a toolkit: bin/, nvvm/, include/, lib64/
  T=$HOME_DIR/tree
  mkdir -p "$ROOT/bin" "$ROOT/nvvm/bin"
  cp "$T/usr/lib/nvidia-cuda-toolkit/bin/nvcc" "$ROOT/bin/"
  ln -sfn "$T/usr/lib/nvidia-cuda-toolkit/bin/crt" "$ROOT/bin/crt"
  for b in ptxas fatbinary nvlink cudafe++ bin2c cuobjdump nvdisasm cu++filt; do ln -sf "$T/usr/bin/$b" "$ROOT/bin/$b"; done
  ln -sf "$T/usr/lib/nvidia-cuda-toolkit/bin/cicc" "$ROOT/nvvm/bin/cicc"
  ln -sfn "$T/usr/lib/nvidia-cuda-toolkit/libdevice" "$ROOT/nvvm/libdevice"
  ln -sfn "$T/usr/include" "$ROOT/include"
  ln -sfn "$T/usr/lib/x86_64-linux-gnu" "$ROOT/lib64"
  cat >"$ROOT/bin/nvcc.profile" <<'PROFILE'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib64:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
PROFILE
fi
"$ROOT/bin/nvcc" --version | tail -1
CUDACXX="$ROOT/bin/nvcc" npx cmake-js compile --out build-cu12
mkdir -p prebuilds/linux-x64/cuda12
cp build-cu12/Release/xft.node prebuilds/linux-x64/cuda12/xft.node
echo "prebuilds/linux-x64/cuda12/xft.node: $(du -h prebuilds/linux-x64/cuda12/xft.node | cut -f1)"
