#!/usr/bin/env bash
# Renders manifests/ from the Helm chart, so plain YAML and Helm are one install story:
#   manifests/base/gonka-operator.yaml        helm template, default values (cluster scope)
#   manifests/namespaced/gonka-operator.yaml  the same with scope=namespace
# Both for the release `gonka-operator` in namespace gonka-system (kustomize can move them),
# without the chart's hooks (the uninstall hook is for `helm uninstall` only; without Helm, delete
# the GonkaNodes yourself first, see the README).
#
#   scripts/render-manifests.sh          # write them
#   scripts/render-manifests.sh --check  # fail if they differ from the chart (a test runs this)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helm=${HELM:-$("$root/e2e/controlplane/build.sh" helm | tail -1)/helm}
# The Kubernetes version the CRD and the chart are tested against (e2e/controlplane).
kube_version=$(awk '/^require k8s.io\/kubernetes /{print $3}' "$root/e2e/controlplane/kubernetes/go.mod")

render() {
  echo "# Generated from charts/gonka-operator by scripts/render-manifests.sh (make manifests): edit the chart."
  HELM_CACHE_HOME=$(mktemp -d) HELM_CONFIG_HOME=$(mktemp -d) HELM_DATA_HOME=$(mktemp -d) \
    "$helm" template gonka-operator "$root/charts/gonka-operator" --namespace gonka-system --no-hooks \
    --kube-version "$kube_version" "$@"
}

status=0
for variant in base namespaced; do
  args=()
  [ "$variant" = namespaced ] && args=(--set scope=namespace)
  out="$root/manifests/$variant/gonka-operator.yaml"
  if [ "${1:-}" = --check ]; then
    if ! diff -u "$out" <(render "${args[@]+"${args[@]}"}") >&2; then
      echo "render-manifests.sh: manifests/$variant/gonka-operator.yaml differs from the chart: run make manifests" >&2
      status=1
    fi
  else
    render "${args[@]+"${args[@]}"}" > "$out.tmp" && mv "$out.tmp" "$out"
  fi
done
exit $status
