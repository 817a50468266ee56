{{/* Names, labels and small helpers shared by the templates. */}}

{{- define "apm-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Base name of every object: the release name when it already says apm-csi. */}}
{{- define "apm-csi.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "apm-csi.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "apm-csi.nodeName" -}}{{ include "apm-csi.fullname" . }}-node{{- end -}}
{{- define "apm-csi.webhookName" -}}{{ include "apm-csi.fullname" . }}-webhook{{- end -}}
{{- define "apm-csi.webhookTLSSecret" -}}{{ include "apm-csi.webhookName" . }}-tls{{- end -}}

{{- define "apm-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "apm-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: apm-csi
{{- end -}}

{{/* Selector labels of a component: pass (list $ "component"). */}}
{{- define "apm-csi.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "apm-csi.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
An image reference: repository:tag, or repository:tag@digest when a digest is set, so that the
tag stays readable and the digest is what the runtime pulls. Pass (list $ .Values.images.x "x").
A tag is required (the chart never renders an untagged or :latest image).
*/}}
{{- define "apm-csi.image" -}}
{{- $ := index . 0 -}}
{{- $img := index . 1 -}}
{{- $tag := $img.tag | default $.Chart.AppVersion -}}
{{- if eq $tag "latest" -}}
{{- fail (printf "images.%s.tag: \"latest\" is not allowed: images are pinned; set a version tag (and optionally images.%s.digest)" (index . 2) (index . 2)) -}}
{{- end -}}
{{- if $img.digest -}}
{{- printf "%s:%s@%s" $img.repository $tag $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* kubelet's root dir, without a trailing slash. */}}
{{- define "apm-csi.kubeletDir" -}}
{{- .Values.kubeletDir | trimSuffix "/" -}}
{{- end -}}

{{/* The CSI socket's directory and path on the host (kubelet's convention). */}}
{{/* The CSI driver name is fixed: pods already running name it in their volumes. With
datadogDropIn.enabled the node plugin is Datadog's driver, k8s.csi.datadoghq.com. */}}
{{- define "apm-csi.driverName" -}}
{{- if (.Values.datadogDropIn | default dict).enabled -}}k8s.csi.datadoghq.com{{- else -}}csi.apm-csi.io{{- end -}}
{{- end -}}

{{/* The webhook is installed unless the node plugin stands in for Datadog's CSI driver (the
Datadog Cluster Agent writes the pods' volumes then). Empty string when off. */}}
{{- define "apm-csi.webhookEnabled" -}}
{{- if not (.Values.datadogDropIn | default dict).enabled -}}true{{- end -}}
{{- end -}}

{{- define "apm-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (include "apm-csi.kubeletDir" .) (include "apm-csi.driverName" .) -}}
{{- end -}}
{{- define "apm-csi.csiSocket" -}}
{{- printf "%s/csi.sock" (include "apm-csi.pluginDir" .) -}}
{{- end -}}

{{/* Namespaces the webhook must never see: kube-system, its own, and the configured ones. */}}
{{- define "apm-csi.excludedNamespaces" -}}
{{- $ns := list "kube-system" .Release.Namespace -}}
{{- range .Values.webhook.excludedNamespaces -}}
{{- $ns = append $ns . -}}
{{- end -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{/*
A number or quantity for a flag: YAML numbers reach templates as float64, which print as
1e+09; integers are printed whole, strings (quantities such as 2Gi) as they are.
*/}}
{{- define "apm-csi.number" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ . | int64 }}{{- end -}}
{{- end -}}

{{/*
GOMEMLIMIT for the node plugin: node.goMemLimit if set, else 90% of
node.resources.limits.memory when that is given in Mi or Gi (GOMEMLIMIT takes bytes or
MiB/GiB suffixes, not Kubernetes quantities); empty (no limit) otherwise.
*/}}
{{- define "apm-csi.goMemLimit" -}}
{{- if .Values.node.goMemLimit -}}
{{ .Values.node.goMemLimit }}
{{- else -}}
{{- $mem := "" -}}
{{- with .Values.node.resources }}{{ with .limits }}{{ with .memory }}{{ $mem = toString . }}{{ end }}{{ end }}{{ end -}}
{{- if hasSuffix "Mi" $mem -}}
{{ div (mul (trimSuffix "Mi" $mem | int64) 9) 10 }}MiB
{{- else if hasSuffix "Gi" $mem -}}
{{ div (mul (trimSuffix "Gi" $mem | int64) 9216) 10 }}MiB
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Every hostdir entry, as a JSON list: node.hostDirs plus, with node.datadogAgentSockets.enabled,
the Datadog Agent's socket entries (read-only, every namespace; with writableDirectory the
directory entries are writable and the single-socket entries are left out, since the node plugin
refuses an entry inside a writable one: a pod could replace the socket with a link). The node plugin's and the webhook's configurations and the
DaemonSet's host mounts are all rendered from this one list.
*/}}
{{- define "apm-csi.hostDirs" -}}
{{- $all := list -}}
{{- range .Values.node.hostDirs }}{{ $all = append $all . }}{{ end -}}
{{- $dd := .Values.node.datadogAgentSockets | default dict -}}
{{- /* Datadog's driver serves the Agent's sockets: the drop-in always has the entries. */ -}}
{{- if or $dd.enabled (.Values.datadogDropIn | default dict).enabled -}}
{{- $dir := $dd.path | default "/var/run/datadog" -}}
{{- $every := list "*" -}}
{{- range list "apm-socket-dir" "dsd-socket-dir" -}}
{{- $all = append $all (dict "name" . "path" $dir "type" "Directory" "readOnly" (not $dd.writableDirectory) "namespaces" $every) -}}
{{- end -}}
{{- if not $dd.writableDirectory -}}
{{- $all = append $all (dict "name" "apm-socket" "path" (printf "%s/apm.socket" $dir) "type" "Socket" "readOnly" true "namespaces" $every) -}}
{{- $all = append $all (dict "name" "dsd-socket" "path" (printf "%s/dsd.socket" $dir) "type" "Socket" "readOnly" true "namespaces" $every) -}}
{{- end -}}
{{- end -}}
{{- toJson $all -}}
{{- end -}}
