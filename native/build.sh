#!/usr/bin/env bash
# Build the keepbits native kernels into native/build/.
#
#   native/build.sh [--optional] [--cuda] [--offline]
#
# ONNX Runtime's C API headers come from, in order: $ONNXRUNTIME_INCLUDE_DIR, the system
# (/usr/include/onnxruntime, /usr/local/include/onnxruntime), native/.cache (a previous
# fetch), or Debian's headers-only package libonnxruntime-dev fetched into native/.cache
# (pinned 1.21 .deb checked by sha256, else `apt-get download` from a private trixie list).
# --optional: exit 0 with a message when no compiler, cmake or headers are available
#             (keepbits then runs the ONNX function bodies).
# --cuda:     also build native/cuda (CUDA kernels, their C entry points, ORT CUDA ops; TensorRT
#             plugin when TENSORRT_INCLUDE_DIR holds NvInfer.h). Architectures: $CUDAARCHS
#             (e.g. CUDAARCHS=90), default 80;90.
# --offline:  never fetch the headers; with --cuda and no headers found, build only what needs
#             none (the CUDA kernels, keepbits_cuda_test, libkeepbits_cuda_c.so).
# $KEEPBITS_NATIVE_BUILD_DIR: build folder (default native/build).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="$here/.cache"
build="${KEEPBITS_NATIVE_BUILD_DIR:-$here/build}"
optional=0
cuda=OFF
offline=0
for arg in "$@"; do
  case "$arg" in
    --optional) optional=1 ;;
    --cuda) cuda=ON ;;
    --offline) offline=1 ;;
    *) echo "usage: $0 [--optional] [--cuda] [--offline]" >&2; exit 2 ;;
  esac
done

give_up() {
  if [ "$optional" = 1 ]; then
    echo "keepbits native: not built ($1); keepbits will use the ONNX function bodies" >&2
    exit 0
  fi
  echo "keepbits native: $1" >&2
  exit 1
}

command -v cmake >/dev/null || give_up "cmake not found"
command -v "${CXX:-c++}" >/dev/null || give_up "no C++ compiler (${CXX:-c++})"

deb_version="1.21.0+dfsg-1"
deb_sha256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
deb_url="http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_${deb_version}_amd64.deb"

fetch_headers() {
  mkdir -p "$cache"
  local deb="$cache/libonnxruntime-dev_${deb_version}_amd64.deb"
  if [ ! -s "$deb" ] && command -v curl >/dev/null; then
    curl -fsSL --retry 2 -o "$deb.part" "$deb_url" && mv "$deb.part" "$deb" || rm -f "$deb.part"
  fi
  if [ -s "$deb" ] && ! echo "$deb_sha256  $deb" | sha256sum -c --status; then
    echo "keepbits native: $deb has the wrong sha256, ignoring it" >&2
    rm -f "$deb"
  fi
  if [ ! -s "$deb" ] && command -v apt-get >/dev/null; then
    # A private apt state under .cache: the system's sources and lists are untouched.
    local apt="$cache/apt"
    mkdir -p "$apt/lists/partial" "$apt/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" >"$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt" -o Dir::State::Status=/dev/null
      -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
    if apt-get "${opts[@]}" -qq update && (cd "$cache" && apt-get "${opts[@]}" -qq download libonnxruntime-dev); then
      deb="$(ls -t "$cache"/libonnxruntime-dev_*.deb | head -n1)"
    fi
  fi
  [ -s "$deb" ] || return 1
  rm -rf "$cache/ort"
  mkdir -p "$cache/ort"
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$deb" "$cache/ort"
  else
    (cd "$cache/ort" && ar x "$deb" && tar -xf data.tar.* && rm -f data.tar.* control.tar.* debian-binary)
  fi
  [ -f "$cache/ort/usr/include/onnxruntime/onnxruntime_c_api.h" ]
}

include=""
for dir in "${ONNXRUNTIME_INCLUDE_DIR:-}" /usr/include/onnxruntime /usr/local/include/onnxruntime "$cache/ort/usr/include/onnxruntime"; do
  if [ -n "$dir" ] && [ -f "$dir/onnxruntime_c_api.h" ]; then include="$dir"; break; fi
done
ort=ON
if [ -z "$include" ] && [ "$offline" = 1 ]; then
  [ "$cuda" = ON ] || give_up "ONNX Runtime headers not found (--offline: not fetched); set ONNXRUNTIME_INCLUDE_DIR"
  echo "keepbits native: no ONNX Runtime headers (--offline): building the CUDA kernels only, no ORT libraries" >&2
  ort=OFF
elif [ -z "$include" ]; then
  echo "keepbits native: fetching ONNX Runtime headers (Debian libonnxruntime-dev) into $cache" >&2
  fetch_headers || give_up "ONNX Runtime headers not found and could not be fetched; set ONNXRUNTIME_INCLUDE_DIR"
  include="$cache/ort/usr/include/onnxruntime"
fi

cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DKEEPBITS_ORT="$ort" ${include:+-DONNXRUNTIME_INCLUDE_DIR="$include"} \
  -DKEEPBITS_CUDA="$cuda" ${TENSORRT_INCLUDE_DIR:+-DTENSORRT_INCLUDE_DIR="$TENSORRT_INCLUDE_DIR"} >/dev/null \
  || give_up "cmake configure failed"
cmake --build "$build" -j "${KEEPBITS_BUILD_JOBS:-2}" || give_up "build failed"
echo "keepbits native: built $(ls "$build"/lib*.so | tr '\n' ' ')" >&2
