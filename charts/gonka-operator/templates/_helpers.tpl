{{/* The release's base name: `<release>` when it already says gonka-operator, else `<release>-gonka-operator`. */}}
{{- define "gonka-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gonka-operator.selectorLabels" -}}
app.kubernetes.io/name: gonka-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gonka-operator.labels" -}}
{{ include "gonka-operator.selectorLabels" . }}
app.kubernetes.io/part-of: gonka
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "gonka-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "gonka-operator.daemonImage" -}}
{{ .Values.daemonImage.repository }}:{{ .Values.daemonImage.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "gonka-operator.daemonImageVllm" -}}
{{ .Values.daemonImage.vllmRepository }}:{{ .Values.daemonImage.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The rules the controller needs wherever it watches GonkaNodes; each says which call needs it (the e2e tests run the operator with exactly these rights). */}}
{{- define "gonka-operator.controllerRules" -}}
# The controller's watch of GonkaNodes; the finalizer is added and removed with a JSON patch.
- apiGroups: [gonka.ai]
  resources: [gonkanodes]
  verbs: [list, watch, patch]
# Status, written with server-side apply.
- apiGroups: [gonka.ai]
  resources: [gonkanodes/status]
  verbs: [patch]
# Owned objects: watched (owns; apply.rs compares with the watch's copy and skips writes when
# it already matches), read only on a miss, written with server-side apply (an apply that
# creates needs create).
- apiGroups: [apps]
  resources: [daemonsets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch]
# The PodDisruptionBudget that follows PoC windows, owned like the others (apply.rs
# apply_disruption_budget).
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch]
# The ML nodes' NetworkPolicy (spec.networkNode.mlNodeApiFrom; default-deny without it), applied
# like the other owned objects.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch]
# Events (kube's Recorder creates an event, then patches its series).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Registration and reports: which ML-node pods are ready, on which node, at which IP; rollouts
# held out of PoC windows replace pods themselves (the DaemonSet is OnDelete then).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, delete]
{{- end -}}

{{/* spec.networkNode.credentialsSecretRef and .mtlsSecretRef: read in the GonkaNode's own
namespace, used only when the Secret's owner labelled it gonka.ai/network-node-credentials=true.
Granted per namespace (secretNamespaces), so RBAC and not only the operator's code decides whose
Secrets it can read. */}}
{{- define "gonka-operator.secretRules" -}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end -}}

{{/* Cluster-scoped by nature. */}}
{{- define "gonka-operator.clusterScopedRules" -}}
# Drains and scale-downs: a watch of the nodes (cordons, autoscalers' taints, deletion); an ML
# node on one that is going is disabled. During PoC windows the nodes hosting ML nodes carry
# cluster-autoscaler's scale-down-disabled and Karpenter's do-not-disrupt annotations, written
# by server-side apply (patch), each GonkaNode under its own field manager, nothing else; so
# is the label joined.gonka.ai/<uid> of the nodes a capped GonkaNode (spec.capacity) lets join.
- apiGroups: [""]
  resources: [nodes]
  verbs: [list, watch, patch]
# The report stream: node-daemons authenticate with their pod's projected ServiceAccount token,
# which the operator checks with a TokenReview.
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
{{- end -}}
