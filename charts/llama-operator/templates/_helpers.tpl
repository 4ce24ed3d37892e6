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

{{- /*
The webhook's TLS (helm-generated mode): the CA and serving certificate, computed once per render and kept in
.Values._webhookTLS so that webhook.yaml (the Secret, the ValidatingWebhookConfiguration) and crds.yaml (the CRDs'
conversion webhook) carry the same CA: genCA is random, calling it twice would give two. Looked up from the
existing Secret when there is one, so upgrades do not rotate it.
*/}}
{{- define "llama-operator.webhookTLS" -}}
{{- if not (hasKey .Values "_webhookTLS") }}
{{- $fullname := include "llama-operator.fullname" . }}
{{- $svcName := include "llama-operator.webhookServiceName" . }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "llama-operator.webhookSecretName" .) }}
{{- if and $existing (index ($existing.data | default dict) "ca.crt") }}
{{- $_ := set .Values "_webhookTLS" (dict "ca" (index $existing.data "ca.crt") "crt" (index $existing.data "tls.crt") "key" (index $existing.data "tls.key")) }}
{{- else }}
{{- $days := int .Values.webhook.selfSigned.validityDays }}
{{- $ca := genCA (printf "%s-webhook-ca" $fullname) $days }}
{{- $dns := fromYamlArray (include "llama-operator.webhookDNSNames" .) }}
{{- $cert := genSignedCert (printf "%s.%s.svc" $svcName .Release.Namespace) nil $dns $days $ca }}
{{- $_ := set .Values "_webhookTLS" (dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc)) }}
{{- end }}
{{- end }}
{{- end }}
