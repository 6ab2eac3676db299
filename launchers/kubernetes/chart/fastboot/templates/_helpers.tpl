{{/* Names: "<release>" when it contains the chart's name, else "<release>-fastboot". */}}
{{- define "fastboot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fastboot.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fastboot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fastboot
{{- end -}}

{{/* Labels of one component's objects: include "fastboot.componentLabels" (list . "agent") */}}
{{- define "fastboot.componentLabels" -}}
{{ include "fastboot.labels" (index . 0) }}
app.kubernetes.io/name: fastboot-{{ index . 1 }}
{{- end -}}

{{/* Selector labels of one component: include "fastboot.selector" (list . "agent") */}}
{{- define "fastboot.selector" -}}
app.kubernetes.io/name: fastboot-{{ index . 1 }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
{{- end -}}

{{- define "fastboot.tokenSecret" -}}
{{- .Values.agentToken.existingSecret | default (printf "%s-agent-token" (include "fastboot.fullname" .)) -}}
{{- end -}}

{{/* The host type the router's models run on. */}}
{{- define "fastboot.routerHostType" -}}
{{- if .Values.router.buffer.hostType -}}
{{- .Values.router.buffer.hostType -}}
{{- else -}}
{{- required "set hostTypes (at least one host type)" (first (keys .Values.hostTypes | sortAlpha)) -}}
{{- end -}}
{{- end -}}

{{/* prometheus.io annotations: include "fastboot.scrape" (list .Values.agent.metrics PORT) */}}
{{- define "fastboot.scrape" -}}
prometheus.io/scrape: {{ (index . 0).scrape | toString | quote }}
prometheus.io/port: {{ index . 1 | toString | quote }}
prometheus.io/path: {{ (index . 0).path | quote }}
{{- end -}}

{{/*
TOML, written here because Helm's toToml prints every number of values.yaml as a float ("2.0"),
which the router's loader rightly refuses for integer keys. Whole numbers are written as
integers (the loader takes an integer for a float key too), strings as JSON strings (valid TOML
basic strings).
*/}}
{{- define "fastboot.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end -}}

{{- define "fastboot.toml.value" -}}
{{- if kindIs "string" . -}}
{{ toJson . }}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else if kindIs "float64" . -}}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "fastboot.toml.value" $v }}{{ end }}]
{{- else if kindIs "invalid" . -}}
{{ fail "TOML has no null: remove the key instead" }}
{{- else -}}
{{ . }}
{{- end -}}
{{- end -}}

{{/* A table: include "fastboot.toml.table" (list "dotted.name" DICT); sub-tables follow it. */}}
{{- define "fastboot.toml.table" -}}
{{- $name := index . 0 -}}
{{- $table := index . 1 }}
[{{ $name }}]
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if not (kindIs "map" $value) }}
{{ include "fastboot.toml.key" $key }} = {{ include "fastboot.toml.value" $value }}
{{- end }}
{{- end }}
{{- range $key := keys $table | sortAlpha }}
{{- $value := get $table $key }}
{{- if kindIs "map" $value }}
{{ include "fastboot.toml.table" (list (printf "%s.%s" $name (include "fastboot.toml.key" $key)) $value) }}
{{- end }}
{{- end }}
{{- end -}}
