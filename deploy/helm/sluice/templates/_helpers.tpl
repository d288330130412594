{{/* The release's base name. */}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sluice.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Deployments: the fused worker, or one per split stage. */}}
{{- define "sluice.stages" -}}
{{- if eq .Values.mode "fused" -}}
fused
{{- else if eq .Values.mode "split" -}}
gateway infer respond
{{- else -}}
{{- fail (printf "mode must be fused or split, got %q" .Values.mode) -}}
{{- end -}}
{{- end -}}

{{/* A stage's consumer group, as the worker names it (Settings.group_id). */}}
{{- define "sluice.group" -}}
{{- printf "%s-%s" .root.Values.topics.prefix .stage -}}
{{- end -}}

{{/* A stage's most replicas: more than partitions would idle. */}}
{{- define "sluice.maxReplicas" -}}
{{- min .Values.autoscaling.maxReplicas .Values.topics.partitions -}}
{{- end -}}

{{- define "sluice.saslSecret" -}}
{{- .Values.kafka.sasl.existingSecret | default (printf "%s-kafka" (include "sluice.fullname" .)) -}}
{{- end -}}

{{- define "sluice.sasl" -}}
{{- if or .Values.kafka.sasl.existingSecret .Values.kafka.sasl.password -}}true{{- end -}}
{{- end -}}

{{/* The time-lag query: the oldest unconsumed request's age over the group's partitions
     (every worker reports its whole group, so max also removes the copies). */}}
{{- define "sluice.timeLagQuery" -}}
max(sluice_consumer_time_lag_seconds{group="{{ include "sluice.group" . }}"})
{{- end -}}
