{{/* The chart name. */}}
{{- define "cryomae.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name (object name prefix); the release name alone when it already contains the chart name. */}}
{{- define "cryomae.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The components, in start order (downstream first), as cryomae.service.app.SERVICES. */}}
{{- define "cryomae.components" -}}
writer trainer picker watcher
{{- end }}

{{/* Labels on every object. */}}
{{- define "cryomae.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "cryomae.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cryomae
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "picker"). */}}
{{- define "cryomae.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cryomae.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "cryomae.componentLabels" -}}
{{ include "cryomae.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image of a component: the CUDA image when it requests a GPU. */}}
{{- define "cryomae.image" -}}
{{- $c := index .root.Values .component }}
{{- $img := .root.Values.image }}
{{- if gt (int (default 0 $c.gpu)) 0 }}
{{- printf "%s:%s" $img.repository (default (printf "%s-cuda" .root.Chart.AppVersion) $img.gpuTag) }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* CRYOMAE_DEVICE of a component: its override, else cuda with a GPU, else cpu. */}}
{{- define "cryomae.device" -}}
{{- $c := index .root.Values .component }}
{{- if $c.device }}
{{- $c.device }}
{{- else if gt (int (default 0 $c.gpu)) 0 }}
{{- "cuda" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}

{{/* The volume source of one persistence entry: (dict "root" $ "name" "data"). */}}
{{- define "cryomae.volumeSource" -}}
{{- $p := index .root.Values.persistence .name }}
{{- if $p.existingClaim }}
persistentVolumeClaim:
  claimName: {{ $p.existingClaim }}
{{- else if $p.volume }}
{{- toYaml $p.volume }}
{{- else }}
persistentVolumeClaim:
  claimName: {{ include "cryomae.fullname" .root }}-{{ .name }}
{{- end }}
{{- end }}

{{/* The data roots (CRYOMAE_DATA_ROOTS), default the data volume's mount path. */}}
{{- define "cryomae.dataRoots" -}}
{{- if .Values.settings.dataRoots }}
{{- toJson .Values.settings.dataRoots }}
{{- else }}
{{- toJson (list .Values.persistence.data.mountPath) }}
{{- end }}
{{- end }}

{{/* The queue the pickers consume (cryomae.messaging.topology.MICROGRAPHS under the broker namespace). */}}
{{- define "cryomae.micrographsQueue" -}}
{{- printf "%s.micrographs" .Values.broker.namespace }}
{{- end }}
