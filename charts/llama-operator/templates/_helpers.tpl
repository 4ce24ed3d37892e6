{{/* Names, labels and small computed values shared by the templates. */}}

{{- define "llama-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: object name prefix, at most 63 characters (a DNS label, usable in Service names). */}}
{{- define "llama-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llama-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment selector is immutable). */}}
{{- define "llama-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llama-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llama-operator.labels" -}}
helm.sh/chart: {{ include "llama-operator.chart" . }}
{{ include "llama-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llama-operator
{{- end }}

{{- define "llama-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llama-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image, by digest when one is given (repository:tag@digest). */}}
{{- define "llama-operator.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- if .Values.image.digest }}{{ $ref = printf "%s@%s" $ref .Values.image.digest }}{{ end }}
{{- $ref }}
{{- end }}

{{/* Webhook objects' names, and the DNS names its certificate must cover. */}}
{{/* Service names are DNS labels (63 characters): shorten the prefix, never the suffix. */}}
{{- define "llama-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "llama-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "llama-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "llama-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "llama-operator.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "llama-operator.fullname" .) }}
{{- end }}

{{- define "llama-operator.webhookDNSNames" -}}
{{- $svc := include "llama-operator.webhookServiceName" . -}}
- {{ $svc }}
- {{ $svc }}.{{ .Release.Namespace }}
- {{ $svc }}.{{ .Release.Namespace }}.svc
- {{ $svc }}.{{ .Release.Namespace }}.svc.cluster.local
{{- end }}

{{/* Where the operator reads tls.crt/tls.key (the default of LLAMA_OPERATOR_WEBHOOK_CERT_DIR). */}}
{{- define "llama-operator.webhookCertDir" -}}
/var/run/llama-operator/webhook-certs
{{- end }}
