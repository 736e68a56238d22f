#!/usr/bin/env bash
# Prepare the project's virtual environment: pinned CPU torch, ROS 2 kilted wheels, tf2_msgs
# (built from tools/tf2_msgs only when it is not importable), and spark3r_ros itself (editable).
# Idempotent: a re-run with unchanged requirements only checks and returns (about a second).
#
#   bash tools/setup_env.sh            # creates ./.venv
#   SPARK3R_VENV=/path bash tools/setup_env.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPARK3R_VENV:-$repo/.venv}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3

log() { printf '[setup_env] %s\n' "$*"; }
# pip warns once per package about this machine's optional local index folders; drop that noise.
pip_quiet() { "$py" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# A parent process from another venv may leak the ROS wheels' bootstrap marker; without the
# matching LD_LIBRARY_PATH rclpy's C extension would not load in this venv.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE || true

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"

stamp="$venv/.spark3r_requirements.sha256"
want="$(cat "$repo/tools/requirements.txt" "$repo/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing pinned requirements"
  pip_quiet --upgrade pip wheel setuptools
  pip_quiet -r "$repo/tools/requirements.txt"
  pip_quiet --no-deps --no-build-isolation -e "$repo"
  echo "$want" > "$stamp"
else
  log "requirements up to date"
fi

if "$py" -c 'import tf2_msgs.msg' >/dev/null 2>&1; then
  log "tf2_msgs importable"
else
  log "building tf2_msgs from tools/tf2_msgs"
  pip_quiet -r "$repo/tools/requirements-build-msgs.txt"
  # The toolchain wheels' exported CMake files name the wheel builder's Python include paths.
  "$py" - "$venv" <<'PY'
import pathlib, re, sys, sysconfig
import numpy
venv = pathlib.Path(sys.argv[1])
py_inc = sysconfig.get_paths()["include"]
np_inc = numpy.get_include()
for f in (venv / "share").rglob("*.cmake"):
    text = f.read_text(errors="surrogateescape")
    new = text.replace("/opt/python/cp311-cp311/include/python3.11", py_inc)
    new = re.sub(r"/opt/python/[^;\"\s]*?/site-packages/numpy/_core/include", np_inc, new)
    if new != text:
        f.write_text(new, errors="surrogateescape")
PY
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
  (
    # cmake and the rosidl generators must run with the venv's interpreter and libraries.
    export PATH="$venv/bin:$PATH"
    cmake -S "$repo/tools/tf2_msgs" -B "$build" -DCMAKE_INSTALL_PREFIX="$venv" \
      -DCMAKE_PREFIX_PATH="$venv" -DPython3_EXECUTABLE="$py" -DBUILD_TESTING=OFF >"$build/cmake.log" 2>&1 \
      && cmake --build "$build" -j 2 >>"$build/cmake.log" 2>&1 \
      && cmake --install "$build" >>"$build/cmake.log" 2>&1
  ) || { log "tf2_msgs build failed; log:"; tail -n 40 "$build/cmake.log"; exit 1; }
  "$py" -c 'import tf2_msgs.msg' || { log "tf2_msgs built but not importable"; exit 1; }
  log "tf2_msgs built"
fi

"$py" -c 'import torch, rclpy, tf2_msgs.msg, spark3r, spark3r_ros' \
  || { log "environment check failed"; exit 1; }
log "ready: $venv"
