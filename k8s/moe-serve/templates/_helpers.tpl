{{- define "moe.fullname" -}}
{{- printf "%s" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "moe.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "moe.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moe.image" -}}
{{- if .Values.stockRay.enabled -}}{{ .Values.stockRay.image }}{{- else -}}{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}{{- end -}}
{{- end -}}

{{- define "moe.modelPath" -}}
{{ printf "%s/%s" .Values.model.mountPath .Values.model.dir }}
{{- end -}}

{{/* Checks that JSON schema cannot express. */}}
{{- define "moe.check" -}}
{{- $e := .Values.engine -}}
{{- if and (eq $e.layout "disaggregated") (ne (mod (int .Values.model.numExperts) (int $e.expertGroups)) 0) -}}
{{- fail (printf "engine.expertGroups (%d) must divide model.numExperts (%d)" (int $e.expertGroups) (int .Values.model.numExperts)) -}}
{{- end -}}
{{- if and (eq $e.layout "colocated") (ne (mod (int .Values.model.numExperts) (int $e.attentionWorkers)) 0) -}}
{{- fail (printf "engine.attentionWorkers (%d) is the expert-parallel size of the colocated layout and must divide model.numExperts (%d)" (int $e.attentionWorkers) (int .Values.model.numExperts)) -}}
{{- end -}}
{{- if and (eq .Values.model.source "existingClaim") (not .Values.model.existingClaim) -}}
{{- fail "model.existingClaim must name a PersistentVolumeClaim when model.source is existingClaim" -}}
{{- end -}}
{{- range $g := list "attentionWorkers" "expertWorkers" -}}
{{- $w := index $.Values $g -}}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) -}}
{{- fail (printf "%s.minReplicas (%d) must not exceed %s.maxReplicas (%d)" $g (int $w.minReplicas) $g (int $w.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if gt (int .Values.serve.autoscaling.minReplicas) (int .Values.serve.autoscaling.maxReplicas) -}}
{{- fail "serve.autoscaling.minReplicas must not exceed serve.autoscaling.maxReplicas" -}}
{{- end -}}
{{- end -}}

{{- define "moe.serveConfig" -}}
{{- $e := .Values.engine -}}
{{- $s := .Values.serve -}}
applications:
  - name: moe
    route_prefix: /
    import_path: deployments.app:build_app
    {{- if .Values.stockRay.enabled }}
    runtime_env:
      pip: {{ toJson .Values.stockRay.pip }}
    {{- end }}
    args:
      model: {{ include "moe.modelPath" . | quote }}
      served_model_name: {{ .Values.model.servedModelName | quote }}
      layout: {{ $e.layout }}
      attention_workers: {{ $e.attentionWorkers }}
      expert_groups: {{ $e.expertGroups }}
      dtype: {{ $e.dtype }}
      quantization: {{ $e.quantization | quote }}
      group_size: {{ $e.groupSize }}
      quantize_dense: {{ $e.quantizeDense }}
      {{- with .Values.lora.modules }}
      lora_modules:
        {{- range $name, $dir := . }}
        {{ $name }}: {{ printf "%s/%s" $.Values.lora.mountPath $dir | quote }}
        {{- end }}
      {{- end }}
      max_loras: {{ .Values.lora.maxLoras }}
      max_lora_rank: {{ .Values.lora.maxRank }}
      enable_lora_loading: {{ .Values.lora.enableLoading }}
      max_model_len: {{ $e.maxModelLen }}
      max_num_seqs: {{ $e.maxNumSeqs }}
      max_num_batched_tokens: {{ $e.maxNumBatchedTokens }}
      enable_prefix_caching: {{ $e.enablePrefixCaching }}
      enforce_eager: {{ $e.enforceEager }}
      {{- if $e.kvCacheBlocks }}
      kv_cache_blocks: {{ $e.kvCacheBlocks }}
      {{- end }}
      {{- if $e.kvCacheMemoryGib }}
      kv_cache_memory_gib: {{ $e.kvCacheMemoryGib }}
      {{- end }}
      gpu_memory_utilization: {{ $e.gpuMemoryUtilization }}
      block_size: {{ $e.blockSize }}
      accelerator: {{ $e.accelerator }}
      cpus_per_worker: {{ $e.cpusPerWorker }}
      comm_timeout_s: {{ $e.commTimeoutS }}
      exchange: {{ $e.exchange | default "auto" }}
      resume_timeout_s: {{ $e.resumeTimeoutS }}
      drain_timeout_s: {{ $e.drainTimeoutS }}
      attention_resource: attention_workers
      expert_resource: expert_workers
    deployments:
      - name: MoEEngine
        max_ongoing_requests: {{ $s.maxOngoingRequests }}
        max_queued_requests: {{ $s.maxQueuedRequests }}
        autoscaling_config:
          min_replicas: {{ $s.autoscaling.minReplicas }}
          max_replicas: {{ $s.autoscaling.maxReplicas }}
          target_ongoing_requests: {{ $s.autoscaling.targetOngoingRequests }}
          upscale_delay_s: {{ $s.autoscaling.upscaleDelayS }}
          downscale_delay_s: {{ $s.autoscaling.downscaleDelayS }}
      - name: OpenAIIngress
        max_ongoing_requests: {{ mul $s.maxOngoingRequests 4 }}
{{- end -}}

{{- define "moe.podSecurity" -}}
runAsNonRoot: {{ .Values.securityContext.runAsNonRoot }}
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "moe.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "moe.env" -}}
- name: RAY_SERVE_HTTP_HOST
  value: "0.0.0.0"
{{- /* Ray Serve's switches for every process of the cluster (cluster/serve_env.py) */}}
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: "0"
- name: RAY_SERVE_USE_GRPC_BY_DEFAULT
  value: "1"
{{- /* direct ingress: a pod's ingress replica serves the API on serve.port itself, and answers
     KubeRay's /-/healthz probe there; Serve's proxy stays on the head */}}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: "1"
- name: RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT
  value: {{ .Values.serve.port | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
  value: {{ add .Values.serve.port 100 | quote }}
- name: RAY_SERVE_PORT_QUARANTINE_S
  value: "0"
- name: RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
  value: "2"
{{- if .Values.apiKey.secretName }}
- name: MOE_SERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.secretName }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- end -}}

{{- define "moe.volumes" -}}
- name: model
{{- if eq .Values.model.source "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
{{- else if eq .Values.model.source "newClaim" }}
  persistentVolumeClaim:
    claimName: {{ include "moe.fullname" . }}-model
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.download.sizeLimit }}
{{- end }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: 16Gi
- name: tmp
  emptyDir: {}
{{- if .Values.lora.existingClaim }}
- name: lora
  persistentVolumeClaim:
    claimName: {{ .Values.lora.existingClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "moe.mounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
- name: shm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if .Values.lora.existingClaim }}
- name: lora
  mountPath: {{ .Values.lora.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Fetch the checkpoint (safetensors, configs and tokenizer only: never pickles) before Ray starts. */}}
{{- define "moe.initContainers" -}}
- name: fetch-model
  image: {{ include "moe.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "-c"]
  args:
    - |
      import os, pathlib
      from huggingface_hub import snapshot_download
      target = pathlib.Path({{ include "moe.modelPath" . | quote }})
      if not (target / "config.json").exists():
          snapshot_download({{ .Values.model.download.repoId | quote }}, revision={{ .Values.model.download.revision | quote }},
                            local_dir=str(target), token=os.environ.get("HF_TOKEN") or None,
                            allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
  env:
    - name: HF_HOME
      value: /tmp/hf
  {{- if .Values.model.download.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .Values.model.download.tokenSecret.name }}
          key: {{ .Values.model.download.tokenSecret.key }}
  {{- end }}
  securityContext:
    {{- include "moe.containerSecurity" . | nindent 4 }}
  volumeMounts:
    {{- include "moe.mounts" . | nindent 4 }}
{{- end -}}
