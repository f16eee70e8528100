#!/usr/bin/env bash
# Builds the package (msg/, srv/ and the Python code) with colcon against the ROS 2 wheels in .venv:
# build/ and install/ in the repository root, a symlink install so edited Python files take effect
# without building again. Skips everything when nothing that goes into the build has changed.
# With --copy, a plain (copying) install into the given folders instead, as a release would be built;
# always built, the stamp left alone.
# Usage: tools/build_interfaces.sh   (tools/setup.sh calls it after making .venv)
#        tools/build_interfaces.sh --copy BUILD_DIR INSTALL_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv
python=$venv/bin/python
stamp=$root/.stamps/interfaces
build_base=$root/build
install_base=$root/install
log_base=$root/log
install_mode=(--symlink-install)
if [ "${1:-}" = "--copy" ]; then
    if [ $# -ne 3 ]; then
        echo "usage: $0 [--copy BUILD_DIR INSTALL_DIR]" >&2
        exit 2
    fi
    build_base=$(realpath -m "$2")
    install_base=$(realpath -m "$3")
    log_base=$build_base/log
    install_mode=()
elif [ $# -ne 0 ]; then
    echo "usage: $0 [--copy BUILD_DIR INSTALL_DIR]" >&2
    exit 2
fi
mkdir -p "$root/.stamps"
# One build at a time: several shells may run the set-up at once.
exec 9>"$stamp.lock"
flock 9

# What the build depends on: interface and build files, the launcher, which files are installed
# (their contents are linked, not copied), the venv and this script.
build_key=$(
    {
        find msg srv action scripts -type f -print0 | sort -z | xargs -0 cat
        cat CMakeLists.txt package.xml tools/build_interfaces.sh .stamps/venv 2>/dev/null || true
        { find lisa_ros -name '*.py'; find launch config -type f; } | sort
    } | sha256sum | cut -d' ' -f1
)
# install/ links into build/, so both must still be there.
if [ ${#install_mode[@]} -gt 0 ] && [ -f install/setup.bash ] && [ -d build/lisa_ros ] \
        && [ "$(cat "$stamp" 2>/dev/null)" = "$build_key" ]; then
    echo "[build_interfaces] up to date"
    exit 0
fi

# The wheels' exported CMake targets name the Python and NumPy include folders of the machine they
# were built on; point the ones that do not exist here at this venv's own.
"$python" - "$venv" <<'EOF'
import pathlib
import re
import sys
import sysconfig

import numpy

venv = pathlib.Path(sys.argv[1])
replacements = [
    (re.compile(r'(?<![^;"\s])/[^;"\s]*/include/python3\.\d+'), sysconfig.get_paths()["include"]),
    (re.compile(r'(?<![^;"\s])/[^;"\s]*/site-packages/numpy/_core/include'), numpy.get_include()),
]
for cmake_file in sorted(venv.glob("share/*/cmake/*.cmake")):
    text = cmake_file.read_text()
    fixed = text
    for pattern, local_dir in replacements:
        fixed = pattern.sub(lambda m: m.group(0) if pathlib.Path(m.group(0)).is_dir() else local_dir, fixed)
    if fixed != text:
        cmake_file.write_text(fixed)
        print(f"[build_interfaces] include folders rewritten in {cmake_file.relative_to(venv)}")
EOF

echo "[build_interfaces] colcon build (under a minute from scratch)"
set +u
# shellcheck disable=SC1091
source "$venv/bin/activate"
set -u
export AMENT_PREFIX_PATH=$venv CMAKE_PREFIX_PATH=$venv
# CMake refuses to export include folders that lie in the source tree unless they lie in the install
# prefix, and .venv lies in the source tree: hand it NumPy's headers through a link in the prefix.
numpy_include=$install_base/lisa_ros/include/numpy_headers
mkdir -p "$(dirname "$numpy_include")"
ln -sfn "$("$python" -c 'import numpy; print(numpy.get_include())')" "$numpy_include"
colcon --log-base "$log_base" build \
    --paths "$root" \
    --build-base "$build_base" \
    --install-base "$install_base" \
    "${install_mode[@]}" \
    --cmake-args -DPython3_EXECUTABLE="$python" -DPython3_NumPy_INCLUDE_DIR="$numpy_include" \
        -DBUILD_TESTING=OFF

if [ ${#install_mode[@]} -gt 0 ]; then
    echo "$build_key" > "$stamp"
fi
