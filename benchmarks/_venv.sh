# Sourced by the benchmark-only setup scripts (setup_llamacpp.sh, setup_vllm.sh): make_venv DIR
# creates the venv DIR (beside this file) if it is missing, activates it, quiets pip, defines
# `pipq` (pip -q without its "is ignored" noise) and upgrades pip. Tests and CI never use these venvs.
make_venv() {
  local dir=$1
  if [ ! -x "$dir/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$dir"
  fi
  # shellcheck disable=SC1091
  . "$dir/bin/activate"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  pipq() { pip -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
  pipq install --upgrade pip
}
