#!/usr/bin/env bash
# Static checks of the install path (deploy/, vagrant/, the image definition), run by `make test`.
# Nothing here boots a VM or builds an image: no container engine or hypervisor on these machines.
#   1. shellcheck on every shell script of the repository
#   2. `vagrant validate` of vagrant/Vagrantfile (Debian's vagrant package validates without a box)
#   3. every YAML manifest and scenario file parses; the Vagrant scenario reads the tekton data
#   4. tests/tests/deploy_manifest.rs: the manifests in k8s-openapi types, against the built
#      warren-node (WARREN_BIN_DIR) and applied with kubectl to the lab's API stand-in
# A step that cannot run says SKIPPED and why; any failure makes the script exit 1.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
failures=()
skipped=()

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*"; failures+=("$1"); }
skip() { printf 'SKIPPED: %s\n' "$*"; skipped+=("$1"); }

# Installs a Debian package when its command is missing (root and apt-get needed).
ensure() {
  local cmd=$1 pkg=$2
  command -v "$cmd" >/dev/null && return 0
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing $pkg (Debian package) for $cmd"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null 2>&1; }
  fi
  command -v "$cmd" >/dev/null
}

step "1. shellcheck"
if ensure shellcheck shellcheck; then
  mapfile -t scripts < <(
    {
      git ls-files -co --exclude-standard -- '*.sh' 2>/dev/null
      # Scripts without the .sh suffix, found by their shebang.
      git ls-files -co --exclude-standard -- scripts vagrant deploy 2>/dev/null \
        | while read -r f; do [[ -f "$f" ]] && head -c 64 "$f" | grep -qE '^#!.*\b(ba)?sh\b' && echo "$f"; done
    } | grep -v -e '^target' -e '/\.vagrant/' | sort -u
  )
  if ((${#scripts[@]} == 0)); then
    fail "shellcheck: no scripts found (is this a git checkout?)"
  elif shellcheck -x "${scripts[@]}"; then
    echo "shellcheck clean: ${#scripts[@]} scripts"
  else
    fail "shellcheck"
  fi
else
  skip "shellcheck: not installed and could not be installed (apt-get install shellcheck)"
fi

step "2. vagrant validate"
if ensure vagrant vagrant; then
  dot=$(mktemp -d)
  # Its own dotfile dir: validating must not create vagrant/.vagrant or a bootstrap token there.
  if (cd vagrant && VAGRANT_DOTFILE_PATH=$dot vagrant validate --ignore-provider); then
    for mode in ipvs iptables; do
      (cd vagrant && VAGRANT_DOTFILE_PATH=$dot WARREN_PROXY_MODE=$mode vagrant validate --ignore-provider >/dev/null) \
        || fail "vagrant validate with WARREN_PROXY_MODE=$mode"
    done
    # A misspelt mode must stop `vagrant up` before any VM boots.
    if (cd vagrant && VAGRANT_DOTFILE_PATH=$dot WARREN_PROXY_MODE=ipsv vagrant validate --ignore-provider >/dev/null 2>&1); then
      fail "vagrant validate accepted WARREN_PROXY_MODE=ipsv"
    fi
  else
    fail "vagrant validate"
  fi
  rm -rf "$dot"
else
  skip "vagrant validate: Debian's vagrant package is not installed and could not be installed"
fi

step "3. YAML parses"
if python3 -c 'import yaml' 2>/dev/null; then
  mapfile -t yamls < <(git ls-files -co --exclude-standard -- 'deploy/*.yaml' 'tests/scenarios/*.yaml' \
    'tests/scenarios/**/*.yaml' 2>/dev/null | sort -u)
  if python3 - "${yamls[@]}" <<'PY'; then
import sys, yaml
bad = 0
for path in sys.argv[1:]:
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        kinds = [d.get("kind", "-") for d in docs if isinstance(d, dict)]
        print(f"ok  {path}: {len(docs)} document(s) {' '.join(kinds)}")
    except Exception as e:  # every parse error is reported, not only the first
        print(f"BAD {path}: {e}")
        bad += 1
sys.exit(1 if bad else 0)
PY
    :
  else
    fail "YAML parse"
  fi
  data=tests/scenarios/tekton
  if [[ -f $data/scenario.yaml ]]; then
    # Everything vagrant/scenario.sh reads, read the way it reads it.
    ok=1
    for sub in info sources paths experiments cluster; do
      python3 vagrant/scenario_data.py --dir "$data" "$sub" >/dev/null || ok=0
    done
    while IFS=$'\t' read -r exp _; do
      for mode in ipvs iptables; do
        n=$(python3 vagrant/scenario_data.py --dir "$data" expected "$mode" "$exp" | wc -l)
        ((n > 0)) || { echo "no expected cells for $mode/$exp"; ok=0; }
      done
    done < <(python3 vagrant/scenario_data.py --dir "$data" experiments)
    if ((ok)); then echo "vagrant/scenario.sh can read $data"; else fail "scenario data for vagrant/scenario.sh"; fi
  else
    skip "tekton scenario data: $data/scenario.yaml not there yet"
  fi
else
  skip "YAML parse: python3 with PyYAML is missing (apt-get install python3-yaml)"
fi

step "4. deploy manifest test (cargo test -p integration-tests --test deploy_manifest)"
if [[ -z "${WARREN_BIN_DIR:-}" ]]; then
  echo "note: WARREN_BIN_DIR is not set: the manifest is not run against the built warren-node"
  echo "      (make test sets it; or: WARREN_BIN_DIR=\$PWD/target/release $0)"
fi
if cargo test --release -p integration-tests --test deploy_manifest -- --test-threads=2; then
  :
else
  fail "deploy_manifest test"
fi

printf '\n'
((${#skipped[@]})) && printf 'skipped: %s\n' "${skipped[@]}"
if ((${#failures[@]})); then
  printf 'check-install: FAILED: %s\n' "${failures[*]}"
  exit 1
fi
echo "check-install: ok"
