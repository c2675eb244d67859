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

{{/* The rules the controller needs wherever it watches GonkaNodes (see manifests/base/rbac.yaml for the call behind each). */}}
{{- define "gonka-operator.controllerRules" -}}
- apiGroups: [gonka.ai]
  resources: [gonkanodes]
  verbs: [list, watch, patch]
- apiGroups: [gonka.ai]
  resources: [gonkanodes/status]
  verbs: [patch]
- apiGroups: [apps]
  resources: [daemonsets]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end -}}

{{/* Cluster-scoped by nature: cordoned nodes (drains) and the report stream's TokenReviews. */}}
{{- define "gonka-operator.clusterScopedRules" -}}
- apiGroups: [""]
  resources: [nodes]
  verbs: [list, watch]
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
{{- end -}}
