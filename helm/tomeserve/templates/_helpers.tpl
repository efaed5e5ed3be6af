{{/* Names and labels. */}}
{{- define "tomeserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tomeserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tomeserve.labels" -}}
{{ include "tomeserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tomeserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tomeserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tomeserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Seconds the pod needs after SIGTERM: the server's grace and drain plus 15 s for the process to exit. */}}
{{- define "tomeserve.terminationGracePeriodSeconds" -}}
{{- add .Values.server.shutdownGraceSeconds .Values.server.drainTimeoutSeconds 15 -}}
{{- end -}}

{{/*
Container resources: the user's requests and limits without any key named like the GPU resource, then the GPU
count as both request and limit. One key per name whatever the user sets (null, empty, or the GPU key itself).
*/}}
{{- define "tomeserve.resources" -}}
{{- $gpu := .Values.gpu.resourceName -}}
{{- $resources := .Values.resources | default dict -}}
{{- $requests := omit ($resources.requests | default dict) $gpu -}}
{{- $limits := omit ($resources.limits | default dict) $gpu -}}
{{- if gt (int .Values.gpu.count) 0 -}}
{{- $_ := set $requests $gpu (int .Values.gpu.count) -}}
{{- $_ := set $limits $gpu (int .Values.gpu.count) -}}
{{- end -}}
{{- with $requests }}
requests:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $limits }}
limits:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The model volume: exactly one source, chosen by modelStorage.type (the schema allows only these). */}}
{{- define "tomeserve.modelVolume" -}}
{{- $s := .Values.modelStorage -}}
- name: models
{{- if eq $s.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "tomeserve.fullname" . }}-models
    readOnly: true
{{- else if eq $s.type "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ required "modelStorage.existingClaim must name a PersistentVolumeClaim when modelStorage.type is existingClaim" $s.existingClaim }}
    readOnly: true
{{- else if eq $s.type "hostPath" }}
  hostPath:
    path: {{ $s.hostPath.path }}
    type: {{ $s.hostPath.type }}
{{- else if eq $s.type "emptyDir" }}
  emptyDir:
    {{- with $s.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- else }}
{{- fail (printf "modelStorage.type %q: must be pvc, existingClaim, hostPath or emptyDir" $s.type) }}
{{- end }}
{{- end -}}

{{/* tomeserve-cli health over TLS (native gRPC probes speak plaintext only). $service: "" or "liveness". */}}
{{- define "tomeserve.tlsProbeCommand" -}}
{{- $ := index . 0 -}}
{{- $service := index . 1 -}}
{{- $timeout := index . 2 -}}
- /opt/tomeserve/bin/tomeserve-cli
- --target
- {{ printf "127.0.0.1:%d" (int $.Values.ports.grpc) | quote }}
- --tls-server-name
- {{ $.Values.tls.serverName | quote }}
- --tls-ca
- /etc/tomeserve/tls/{{ $.Values.tls.caKey }}
{{- if $.Values.tls.mtls }}
- --tls-cert
- /etc/tomeserve/tls/tls.crt
- --tls-key
- /etc/tomeserve/tls/tls.key
{{- end }}
- --timeout
- {{ sub $timeout 1 | max 1 | quote }}
- health
{{- if $service }}
- --service
- {{ $service }}
{{- end }}
{{- end -}}
