{{/*
Names. The full name is cut to 40 characters: KubeRay derives longer names from it
(<name>-head-svc, <name>-prefill-worker-xxxxx) that must stay within 63.
*/}}
{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "splitserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "splitserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "splitserve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "router") */}}
{{- define "splitserve.selector" -}}
app.kubernetes.io/name: {{ include "splitserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "splitserve.componentLabels" -}}
{{ include "splitserve.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "splitserve.configName" -}}{{ include "splitserve.fullname" . }}-config{{- end -}}
{{- define "splitserve.secretName" -}}{{ include "splitserve.fullname" . }}-secrets{{- end -}}
{{- define "splitserve.redisName" -}}{{ include "splitserve.fullname" . }}-redis{{- end -}}
{{- define "splitserve.headService" -}}{{ include "splitserve.fullname" . }}-head-svc{{- end -}}

{{/* Whether either pool asks for GPUs: picks the cuda image and the cuda device. */}}
{{- define "splitserve.usesGpu" -}}
{{- if or (gt (float64 .Values.prefill.resources.gpu) 0.0) (gt (float64 .Values.decode.resources.gpu) 0.0) -}}true{{- end -}}
{{- end -}}

{{- define "splitserve.image" -}}
{{- $flavor := ternary "cuda" "cpu" (eq (include "splitserve.usesGpu" .) "true") -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag) -}}
{{- end -}}

{{- define "splitserve.device" -}}
{{- if ne .Values.model.device "auto" -}}{{ .Values.model.device }}
{{- else -}}{{ ternary "cuda" "cpu" (eq (include "splitserve.usesGpu" .) "true") }}{{- end -}}
{{- end -}}

{{- define "splitserve.clusterYamlPath" -}}/etc/splitserve/cluster.yaml{{- end -}}

{{/* Every splitserve process runs as the image's non-root user, under the runtime's default
seccomp profile (what Pod Security "restricted" asks). */}}
{{- define "splitserve.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/*
Pod annotations that roll a component when what it reads changes: cluster.yaml, and the secret
values given in the values (rotated keys, token, passwords; generated ones never change).
*/}}
{{- define "splitserve.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include "splitserve.secretInputs" . | sha256sum }}
{{- end -}}

{{- define "splitserve.secretInputs" -}}
{{ toJson (list .Values.auth .Values.redis.external.url .Values.ray.auth) }}
{{- end -}}

{{- define "splitserve.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "splitserve.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
A Secret value kept across upgrades: the given value, else what the live Secret already holds
(`lookup`), else a new random one. (dict "existing" <data map of the live Secret> "key" "cluster-token"
"given" "" "length" 48) -> the base64 value for the Secret's data.
*/}}
{{- define "splitserve.keptSecret" -}}
{{- if .given -}}
{{- .given | b64enc -}}
{{- else if hasKey .existing .key -}}
{{- index .existing .key -}}
{{- else -}}
{{- randAlphaNum (int .length) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* How many keys of a kind the Secret holds: the given ones, else one generated when asked. */}}
{{- define "splitserve.keyCount" -}}
{{- if .given -}}{{ len .given }}{{- else if .generate -}}1{{- else -}}0{{- end -}}
{{- end -}}

{{/* API keys (api-key-0 .. api-key-N-1) and admin keys (admin-key-0 ..) in the Secret. */}}
{{- define "splitserve.apiKeyCount" -}}
{{- include "splitserve.keyCount" (dict "given" .Values.auth.apiKeys "generate" .Values.auth.generateApiKey) -}}
{{- end -}}
{{- define "splitserve.adminKeyCount" -}}
{{- include "splitserve.keyCount" (dict "given" .Values.auth.adminKeys "generate" .Values.auth.generateAdminKey) -}}
{{- end -}}

{{/*
The environment that cluster.yaml's ${NAME} references read, from the Secret: for the controller
and the routers (the workers get what they need from the controller, through Ray).
*/}}
{{- define "splitserve.secretEnv" -}}
- name: SPLITSERVE_CLUSTER_TOKEN
  valueFrom: {secretKeyRef: {name: {{ include "splitserve.secretName" . }}, key: cluster-token}}
{{- range $i, $_ := until (int (include "splitserve.apiKeyCount" .)) }}
- name: SPLITSERVE_API_KEY_{{ $i }}
  valueFrom: {secretKeyRef: {name: {{ include "splitserve.secretName" $ }}, key: api-key-{{ $i }}}}
{{- end }}
{{- range $i, $_ := until (int (include "splitserve.adminKeyCount" .)) }}
- name: SPLITSERVE_ADMIN_KEY_{{ $i }}
  valueFrom: {secretKeyRef: {name: {{ include "splitserve.secretName" $ }}, key: admin-key-{{ $i }}}}
{{- end }}
{{- if .Values.redis.external.url }}
- name: SPLITSERVE_REDIS_URL
  valueFrom: {secretKeyRef: {name: {{ include "splitserve.secretName" . }}, key: redis-url}}
{{- else }}
- name: SPLITSERVE_REDIS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "splitserve.secretName" . }}, key: redis-password}}
{{- end }}
{{- end -}}

{{/* Ray's token authentication, on every Ray node and on the controller (a Ray client). */}}
{{- define "splitserve.rayAuthEnv" -}}
{{- if eq .Values.ray.auth "token" }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom: {secretKeyRef: {name: {{ include "splitserve.secretName" . }}, key: ray-token}}
{{- else }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end -}}

{{/* The model volume, and how to mount it, for the pods that run the model. */}}
{{- define "splitserve.modelVolume" -}}
{{- $s := .Values.model.source -}}
- name: model
{{- if eq $s.type "persistentVolumeClaim" }}
  persistentVolumeClaim: {claimName: {{ $s.claimName }}, readOnly: true}
{{- else if eq $s.type "hostPath" }}
  hostPath: {path: {{ $s.hostPath | quote }}, type: Directory}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "splitserve.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.source.mountPath }}
  readOnly: {{ ne .Values.model.source.type "tiny" }}
{{- end -}}

{{/* With model.source.type tiny: the init container that writes the checkpoint (same in every pod). */}}
{{- define "splitserve.modelInit" -}}
{{- if eq .Values.model.source.type "tiny" }}
initContainers:
  - name: model-init-tiny
    image: {{ include "splitserve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: [splitserve, model, init-tiny, {{ .Values.model.path | quote }}]
    securityContext: {{- include "splitserve.containerSecurity" . | nindent 6 }}
    resources:
      requests: {cpu: 500m, memory: 512Mi}
      limits: {cpu: "1", memory: 1Gi}
    volumeMounts: {{- include "splitserve.modelMount" . | trim | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Container resources: requests = limits (a guaranteed pod; Ray counts what it was given). */}}
{{- define "splitserve.resources" -}}
{{- $list := dict "cpu" (toString .cpu) "memory" (toString .memory) -}}
{{- if and (hasKey . "gpu") (gt (float64 (default 0 .gpu)) 0.0) -}}
{{- $_ := set $list "nvidia.com/gpu" (toString .gpu) -}}
{{- end -}}
requests: {{- toYaml $list | nindent 2 }}
limits: {{- toYaml $list | nindent 2 }}
{{- end -}}

{{/* Scheduling knobs of one component's values: nodeSelector and tolerations. */}}
{{- define "splitserve.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Checks that need arithmetic across values (the schema bounds each value alone). Every message
names the value to change.
*/}}
{{- define "splitserve.validate" -}}
{{- $p := .Values.prefill -}}
{{- $d := .Values.decode -}}
{{- $cp := float64 $p.cpDegree -}}
{{- if gt (mulf $cp $p.rank.gpus) (float64 $p.resources.gpu) -}}
{{- fail (printf "prefill.cpDegree=%v does not fit a prefill pod: the %v ranks of one prefill instance are placed on one node and need %v x prefill.rank.gpus (%v) = %v GPUs, but prefill.resources.gpu is %v (lower prefill.cpDegree or prefill.rank.gpus, or raise prefill.resources.gpu)" $p.cpDegree $p.cpDegree $p.cpDegree $p.rank.gpus (mulf $cp $p.rank.gpus) $p.resources.gpu) -}}
{{- end -}}
{{- if gt (mulf $cp $p.rank.cpus) (float64 $p.resources.cpu) -}}
{{- fail (printf "prefill.cpDegree=%v does not fit a prefill pod: the %v ranks of one prefill instance are placed on one node and need %v x prefill.rank.cpus (%v) = %v CPUs, but prefill.resources.cpu is %v (lower prefill.cpDegree or prefill.rank.cpus, or raise prefill.resources.cpu)" $p.cpDegree $p.cpDegree $p.cpDegree $p.rank.cpus (mulf $cp $p.rank.cpus) $p.resources.cpu) -}}
{{- end -}}
{{- if gt (float64 $d.worker.gpus) (float64 $d.resources.gpu) -}}
{{- fail (printf "decode.worker.gpus=%v does not fit a decode pod: decode.resources.gpu is %v" $d.worker.gpus $d.resources.gpu) -}}
{{- end -}}
{{- if gt (float64 $d.worker.cpus) (float64 $d.resources.cpu) -}}
{{- fail (printf "decode.worker.cpus=%v does not fit a decode pod: decode.resources.cpu is %v" $d.worker.cpus $d.resources.cpu) -}}
{{- end -}}
{{- $s := .Values.model.source -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $s.mountPath)) .Values.model.path) -}}
{{- fail (printf "model.path=%s is not under model.source.mountPath=%s, where the model volume is mounted" .Values.model.path $s.mountPath) -}}
{{- end -}}
{{- if and (eq $s.type "persistentVolumeClaim") (not $s.claimName) -}}
{{- fail "model.source.claimName: required with model.source.type persistentVolumeClaim" -}}
{{- end -}}
{{- if and (eq $s.type "hostPath") (not $s.hostPath) -}}
{{- fail "model.source.hostPath: required with model.source.type hostPath" -}}
{{- end -}}
{{- if eq (int .Values.router.httpPort) (int .Values.router.grpcPort) -}}
{{- fail (printf "router.grpcPort=%v must differ from router.httpPort" .Values.router.grpcPort) -}}
{{- end -}}
{{- range $pool := list "prefill" "decode" -}}
{{- if gt (int (index $.Values $pool).replicas) (int $.Values.cluster.maxReplicas) -}}
{{- fail (printf "%s.replicas=%v is above cluster.maxReplicas=%v (raise cluster.maxReplicas)" $pool (index $.Values $pool).replicas $.Values.cluster.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- /* on CUDA a worker that asks for no GPU is given one (the controller does that): count it */ -}}
{{- if eq (include "splitserve.device" .) "cuda" -}}
{{- $rankGpus := ternary 1.0 (float64 $p.rank.gpus) (eq (float64 $p.rank.gpus) 0.0) -}}
{{- if gt (mulf $cp $rankGpus) (float64 $p.resources.gpu) -}}
{{- fail (printf "model.device is cuda: each of the %v ranks of a prefill instance takes at least one GPU (%v in all), but prefill.resources.gpu is %v (raise prefill.resources.gpu, or lower prefill.cpDegree)" $p.cpDegree (mulf $cp $rankGpus) $p.resources.gpu) -}}
{{- end -}}
{{- $workerGpus := ternary 1.0 (float64 $d.worker.gpus) (eq (float64 $d.worker.gpus) 0.0) -}}
{{- if gt $workerGpus (float64 $d.resources.gpu) -}}
{{- fail (printf "model.device is cuda: a decode worker takes at least one GPU (%v), but decode.resources.gpu is %v (raise decode.resources.gpu)" $workerGpus $d.resources.gpu) -}}
{{- end -}}
{{- end -}}
{{- if eq (int .Values.workers.rpcPort) (int .Values.workers.kvPort) -}}
{{- fail (printf "workers.kvPort=%v must differ from workers.rpcPort" .Values.workers.kvPort) -}}
{{- end -}}
{{- $a := .Values.router.autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "router.autoscaling.minReplicas=%v is above router.autoscaling.maxReplicas=%v" $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- if le (float64 .Values.cluster.heartbeatTtlSeconds) (float64 .Values.cluster.heartbeatSeconds) -}}
{{- fail (printf "cluster.heartbeatTtlSeconds=%v must be above cluster.heartbeatSeconds=%v" .Values.cluster.heartbeatTtlSeconds .Values.cluster.heartbeatSeconds) -}}
{{- end -}}
{{- end -}}

{{/*
The Ray ports of a worker pod, fixed (Ray picks them at random otherwise) so that the
NetworkPolicy can let the Ray head reach these and nothing else; the head-to-worker traffic
Ray needs, none of it KV. Worker processes (actors) use minWorker..maxWorker.
*/}}
{{- define "splitserve.rayWorkerPorts" -}}
node-manager-port: 6380
object-manager-port: 6381
dashboard-agent-grpc-port: 6382
runtime-env-agent-port: 6383
dashboard-agent-listen-port: 52365
metrics-export-port: 8080
min-worker-port: 10002
max-worker-port: 19999
{{- end -}}

{{/* One Ray worker group: (dict "ctx" $ "group" "prefill" "pool" .Values.prefill "units" <custom resource units per pod>) */}}
{{- define "splitserve.workerGroup" -}}
{{- $ := .ctx -}}
{{- $pool := .pool -}}
- groupName: {{ .group }}
  replicas: {{ $pool.replicas }}
  minReplicas: {{ $pool.replicas }}
  maxReplicas: {{ $pool.replicas }}
  rayStartParams:
    num-cpus: {{ $pool.resources.cpu | quote }}
    num-gpus: {{ $pool.resources.gpu | quote }}
    # what pins the pool here: each worker (each CP rank) asks for one unit, only these pods have any
    resources: {{ printf "'{\"splitserve_%s\": %v}'" .group .units | quote }}
    {{- range $k, $v := include "splitserve.rayWorkerPorts" $ | fromYaml }}
    {{ $k }}: {{ $v | quote }}
    {{- end }}
  template:
    metadata:
      labels: {{- include "splitserve.componentLabels" (dict "ctx" $ "component" .group) | nindent 8 }}
    spec:
      automountServiceAccountToken: false
      securityContext: {{- include "splitserve.podSecurity" $ | nindent 8 }}
      {{- with include "splitserve.imagePullSecrets" $ | trim }}{{ . | nindent 6 }}{{ end }}
      {{- with include "splitserve.scheduling" $pool | trim }}{{ . | nindent 6 }}{{ end }}
      {{- with include "splitserve.modelInit" $ | trim }}{{ . | nindent 6 }}{{ end }}
      containers:
        - name: ray-worker
          image: {{ include "splitserve.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          env: {{- include "splitserve.rayAuthEnv" $ | trim | nindent 12 }}
          ports:
            - {name: rpc, containerPort: {{ $.Values.workers.rpcPort }}}
            {{- if eq .group "decode" }}
            - {name: kv, containerPort: {{ $.Values.workers.kvPort }}}
            {{- end }}
            - {name: metrics, containerPort: 8080}
          resources: {{- include "splitserve.resources" $pool.resources | nindent 12 }}
          lifecycle:
            preStop:
              exec: {command: [ray, stop]}
          securityContext: {{- include "splitserve.containerSecurity" $ | nindent 12 }}
          volumeMounts:
            - {name: dshm, mountPath: /dev/shm}
            {{- include "splitserve.modelMount" $ | trim | nindent 12 }}
      volumes:
        - name: dshm
          emptyDir: {medium: Memory, sizeLimit: {{ $pool.shmSize }}}
        {{- include "splitserve.modelVolume" $ | trim | nindent 8 }}
{{- end -}}
