#!/usr/bin/env bash
# Rebuilds the in-process LLM runtime (ik-llama-cpp-python, the version pyproject.toml pins) from
# its source distribution for the CPU of this machine, and installs it into the venv over the
# prebuilt wheel (`make llm-native`; `make llm-prebuilt` puts the wheel back).
#
# Why: the PyPI wheel is built for AVX2 only (llama_print_system_info: AVX512 = 0, AVX512_VNNI = 0),
# so on a CPU with AVX-512 / VNNI prompt evaluation leaves speed unused: measured on this 2-core
# Xeon, a 450-token prompt of the 1.5B takes 3.0-3.5 s native against 4.2-4.9 s prebuilt.
# Opt-in, not the default: the result only runs on CPUs like the one that built it (never copy the
# venv to another machine kind; pip's cache is bypassed for the same reason), and it takes ~6-15
# min on 2 cores.
#
# The 0.1.5 sdist lacks vendor/ik_llama.cpp/common/cmake/build-info-gen-cpp.cmake, which its build
# runs; this script writes a small one of its own (it fills in the build-info strings).
set -euo pipefail

VENV=${VENV:-.venv}
VERSION=0.1.5
SHA256=33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad
PIP="$VENV/bin/pip"
[ -x "$PIP" ] || { echo "build-native-llm: no venv at $VENV (run make install first)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PIP" download -q --no-deps --no-binary :all: --no-cache-dir -d "$WORK" "ik-llama-cpp-python==$VERSION"
SDIST="$WORK/ik_llama_cpp_python-$VERSION.tar.gz"
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "build-native-llm: sha256 mismatch for $SDIST" >&2; exit 1; }
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/ik_llama_cpp_python-$VERSION"

GEN="$SRC/vendor/ik_llama.cpp/common/cmake/build-info-gen-cpp.cmake"
if [ ! -f "$GEN" ]; then
    mkdir -p "$(dirname "$GEN")"
    cat > "$GEN" <<EOF
# Written by openrealtime's scripts/build-native-llm.sh (missing from the sdist). Runs with -P from
# vendor/ik_llama.cpp, so CMAKE_CURRENT_SOURCE_DIR is that directory.
set(BUILD_NUMBER 0)
set(BUILD_COMMIT "pypi-sdist-$VERSION")
set(BUILD_COMPILER "\${CMAKE_C_COMPILER_ID} \${CMAKE_C_COMPILER_VERSION}")
set(BUILD_TARGET "native")
configure_file("\${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp.in"
               "\${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp")
EOF
fi

# GGML_NATIVE: -march=native, i.e. the whole AVX-512 family where present (ik's AVX-512 kernels
# need F/BW/DQ/VL together; the separate GGML_AVX512* switches do not build). The libraries find
# each other through $ORIGIN, as they do in the auditwheel-repaired wheel.
echo "build-native-llm: building ik-llama-cpp-python $VERSION for this CPU (several minutes)"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_INSTALL_RPATH=\$ORIGIN -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON" \
    "$PIP" wheel -q --no-deps --no-cache-dir -w "$WORK/wheel" "$SRC"
"$PIP" install -q --no-deps --force-reinstall --no-cache-dir "$WORK"/wheel/ik_llama_cpp_python-*.whl

"$VENV/bin/python" - <<'EOF'
import ctypes

from ik_llama_cpp import _ctypes_api

_ctypes_api._lib.llama_print_system_info.restype = ctypes.c_char_p
print("build-native-llm: installed;", _ctypes_api._lib.llama_print_system_info().decode().strip())
EOF
