{{/* Names and labels shared by every template. */}}

{{- define "llmserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, used for the operator's own objects. */}}
{{- define "llmserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "llmserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "llmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llmserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "llmserve.leaseName" -}}
{{- include "llmserve.fullname" . }}
{{- end }}

{{/* The ConfigMap holding the prometheus-adapter rules (prometheusAdapter.rules). */}}
{{- define "llmserve.prometheusAdapterConfigName" -}}
{{- .Values.prometheusAdapter.rules.name | default (printf "%s-prometheus-adapter" (include "llmserve.fullname" .)) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The validation of spec.rollout.analysis.prometheus.url: the operator fetches no URL a tenant picks,
only its own Prometheus (prometheus.url, scheme://host[:port] exactly) or one on an allowed origin
(prometheus.allowedUrls: scheme://host:port exactly, or scheme://host on any port). No userinfo.
The operator checks the same (--prometheus-allowed-url) for objects stored before a change.
*/}}
{{- define "llmserve.prometheusUrlValidation" -}}
{{- $conditions := list }}
{{- $shown := list }}
{{- with .Values.prometheus.url }}
{{- $u := urlParse . }}
{{- $conditions = append $conditions (printf "(url(self).getScheme() == '%s' && url(self).getHost() == '%s')" $u.scheme $u.host) }}
{{- $shown = append $shown (printf "%s://%s" $u.scheme $u.host) }}
{{- end }}
{{- range .Values.prometheus.allowedUrls }}
{{- $u := urlParse . }}
{{- if regexMatch ":[0-9]+$" $u.host }}
{{- $conditions = append $conditions (printf "(url(self).getScheme() == '%s' && url(self).getHost() == '%s')" $u.scheme $u.host) }}
{{- $shown = append $shown (printf "%s://%s" $u.scheme $u.host) }}
{{- else }}
{{- $conditions = append $conditions (printf "(url(self).getScheme() == '%s' && url(self).getHostname() == '%s')" $u.scheme (trimAll "[]" $u.host)) }}
{{- $shown = append $shown (printf "%s://%s:<any port>" $u.scheme $u.host) }}
{{- end }}
{{- end }}
x-kubernetes-validations:
  {{- /* Comparisons, not string concatenation: the API server's cost estimate of the latter is unbounded. */}}
  - rule: {{ printf "isURL(self) && !self.matches('^[^/]*//[^/]*@') && (%s)" (default "false" ($conditions | join " || ")) | quote }}
    {{- if $shown }}
    message: {{ printf "must be the operator's Prometheus or on an allowed origin (%s; chart values prometheus.url and prometheus.allowedUrls): the operator fetches no other URL" ($shown | join ", ") | quote }}
    {{- else }}
    message: "the chart allows no per-service Prometheus (chart values prometheus.url and prometheus.allowedUrls are empty): leave it unset; the operator fetches no URL a tenant picks"
    {{- end }}
{{- end }}

