{{/*
Shared names, labels and the agent configuration of the pycilium chart.
*/}}

{{/* Fixed paths: the agent's state dir (same path on host and in the container, because the CNI
plugin on the host reaches the agent's socket there) and the mounted ConfigMap. */}}
{{- define "pycilium.stateDir" -}}/var/run/pycilium{{- end -}}
{{- define "pycilium.configDir" -}}/etc/pycilium/config{{- end -}}
{{- define "pycilium.hostCniConfDir" -}}/host{{ .Values.cni.confPath }}{{- end -}}
{{- define "pycilium.hostCniBinDir" -}}/host{{ .Values.cni.binPath }}{{- end -}}
{{- define "pycilium.bpfStateDir" -}}{{ trimSuffix "/" .Values.bpf.root }}/pycilium{{- end -}}

{{- define "pycilium.chart" -}}
{{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels: immutable in a DaemonSet, so kept minimal. */}}
{{- define "pycilium.selectorLabels" -}}
k8s-app: pycilium
app.kubernetes.io/name: pycilium-agent
{{- end -}}

{{- define "pycilium.labels" -}}
helm.sh/chart: {{ include "pycilium.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pycilium
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "pycilium.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- .Values.image.repository }}:{{ $tag }}
{{- with .Values.image.digest }}@{{ . }}{{ end -}}
{{- end -}}

{{- define "pycilium.serviceAccountName" -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}

{{/* NodePort range "min,max" -> list of two int64. */}}
{{- define "pycilium.nodePortRange" -}}
{{- $parts := splitList "," .Values.nodePort.range -}}
{{- $min := first $parts | trim | int64 -}}
{{- $max := last $parts | trim | int64 -}}
{{- if or (lt $min 1) (gt $max 65535) (ge $min $max) -}}
{{- fail (printf "nodePort.range %q: expected \"min,max\" with 1 <= min < max <= 65535" .Values.nodePort.range) -}}
{{- end -}}
{{- printf "%d,%d" $min $max -}}
{{- end -}}

{{/*
Agent settings that may only come from extraConfig: every key of AgentConfig (agent/config.py)
except per-node keys (node-name, node-ip, pod-cidr, kubeconfig), the keys the chart sets itself and
the socket paths (the host's CNI plugin and `helm test` expect them in the state dir).
tests/chart checks that this list only names real AgentConfig keys.
*/}}
{{- define "pycilium.extraConfigKeys" -}}
bpf-snat-port-min
bpf-snat-port-max
bpf-ipcache-map-max
bpf-ct-timeout-regular-tcp
bpf-ct-timeout-regular-tcp-syn
bpf-ct-timeout-regular-tcp-fin
bpf-ct-timeout-regular-any
conntrack-gc-max-interval
identity-gc-interval
identity-gc-grace
prometheus-bind-address
monitor-trace
{{- end -}}

{{/* Checks of value combinations the schema cannot express. */}}
{{- define "pycilium.validate" -}}
{{- $host := .Values.k8sServiceHost | toString -}}
{{- $port := .Values.k8sServicePort | toString -}}
{{- if and .Values.kubeProxyReplacement (or (eq $host "") (eq $port "")) -}}
{{- fail "kubeProxyReplacement=true needs k8sServiceHost and k8sServicePort: without kube-proxy the agent must reach the API server directly (the kubernetes Service is only programmed once the agent runs). Example: --set k8sServiceHost=192.168.1.10 --set k8sServicePort=6443" -}}
{{- end -}}
{{- if and (ne $host "") (eq $port "") -}}
{{- fail "k8sServiceHost is set but k8sServicePort is not: set both (e.g. --set k8sServicePort=6443)" -}}
{{- end -}}
{{- if and (eq $host "") (ne $port "") -}}
{{- fail "k8sServicePort is set but k8sServiceHost is not: set both" -}}
{{- end -}}
{{- if and .Values.prometheus.enabled (eq (int64 .Values.prometheus.port) (int64 .Values.healthPort)) -}}
{{- fail (printf "prometheus.port and healthPort are both %d: the agent serves them on different listeners" (int64 .Values.healthPort)) -}}
{{- end -}}
{{- if and .Values.prometheus.serviceMonitor.enabled (not .Values.prometheus.enabled) -}}
{{- fail "prometheus.serviceMonitor.enabled=true needs prometheus.enabled=true" -}}
{{- end -}}
{{- if and .Values.cni.exclusive (not .Values.cni.install) -}}
{{- fail "cni.exclusive=true needs cni.install=true: the agent can only take over the CNI configuration it writes" -}}
{{- end -}}
{{- if eq (clean .Values.cni.binPath) (clean .Values.cni.confPath) -}}
{{- fail "cni.binPath and cni.confPath must be different directories" -}}
{{- end -}}
{{- $_ := include "pycilium.nodePortRange" . -}}
{{- end -}}

{{/*
The agent's configuration: keys are AgentConfig field aliases (agent/config.py), values strings.
Integers go through int64 so that large values never render as 1e+06.
*/}}
{{- define "pycilium.agentConfig" -}}
{{- include "pycilium.validate" . -}}
{{- $ports := splitList "," (include "pycilium.nodePortRange" .) -}}
{{- $c := dict -}}
{{- if .Values.k8sServiceHost -}}
{{- $_ := set $c "k8s-service-host" (.Values.k8sServiceHost | toString) -}}
{{- $_ := set $c "k8s-service-port" (.Values.k8sServicePort | int64 | toString) -}}
{{- end -}}
{{- if .Values.devices -}}
{{- $_ := set $c "devices" (join "," .Values.devices) -}}
{{- end -}}
{{- $_ := set $c "cluster-pool-ipv4-cidr" .Values.ipam.clusterPoolIPv4PodCIDR -}}
{{- $_ := set $c "service-cidr" .Values.serviceCIDR -}}
{{- $_ := set $c "ipam-mode" .Values.ipam.mode -}}
{{- $_ := set $c "routing-mode" .Values.routingMode -}}
{{- $_ := set $c "tunnel-protocol" .Values.tunnelProtocol -}}
{{- $_ := set $c "tunnel-port" (.Values.tunnelPort | int64 | toString) -}}
{{- $_ := set $c "mtu" (.Values.MTU | int64 | toString) -}}
{{- $_ := set $c "kube-proxy-replacement" (.Values.kubeProxyReplacement | toString) -}}
{{- $_ := set $c "bpf-lb-algorithm" .Values.loadBalancer.algorithm -}}
{{- $_ := set $c "bpf-lb-maglev-table-size" (.Values.maglev.tableSize | int64 | toString) -}}
{{- $_ := set $c "node-port-min" (index $ports 0) -}}
{{- $_ := set $c "node-port-max" (index $ports 1) -}}
{{- $_ := set $c "service-no-backend-response" .Values.serviceNoBackendResponse -}}
{{- $_ := set $c "enable-ipv4-masquerade" (.Values.bpf.masquerade | toString) -}}
{{- $_ := set $c "bpf-ct-global-tcp-max" (.Values.bpf.ctTcpMax | int64 | toString) -}}
{{- $_ := set $c "bpf-ct-global-any-max" (.Values.bpf.ctAnyMax | int64 | toString) -}}
{{- $_ := set $c "bpf-nat-global-max" (.Values.bpf.natMax | int64 | toString) -}}
{{- $_ := set $c "bpf-lb-map-max" (.Values.bpf.lbMapMax | int64 | toString) -}}
{{- $_ := set $c "bpf-policy-map-max" (.Values.bpf.policyMapMax | int64 | toString) -}}
{{- $_ := set $c "conntrack-gc-interval" (.Values.conntrackGCInterval | int64 | toString) -}}
{{- $_ := set $c "enable-policy" .Values.policyEnforcementMode -}}
{{- $_ := set $c "bpf-root" (include "pycilium.bpfStateDir" .) -}}
{{- $_ := set $c "state-dir" (include "pycilium.stateDir" .) -}}
{{- $_ := set $c "proc-sys-root" "/host/proc/sys" -}}
{{- $_ := set $c "cgroup-root" .Values.cgroup.hostRoot -}}
{{- $_ := set $c "cni-conf-dir" (include "pycilium.hostCniConfDir" .) -}}
{{- $_ := set $c "cni-conf-name" .Values.cni.confFileName -}}
{{- $_ := set $c "cni-log-file" .Values.cni.logFile -}}
{{- $_ := set $c "cni-exclusive" (.Values.cni.exclusive | toString) -}}
{{- $_ := set $c "write-cni-conf-when-ready" (.Values.cni.install | toString) -}}
{{- $_ := set $c "health-port" (.Values.healthPort | int64 | toString) -}}
{{- $_ := set $c "health-bind-address" "127.0.0.1" -}}
{{- $_ := set $c "prometheus-serve-port" (ternary (.Values.prometheus.port | int64 | toString) "0" .Values.prometheus.enabled) -}}
{{- $_ := set $c "log-level" (ternary "debug" "info" .Values.debug.enabled) -}}
{{- $_ := set $c "log-format" .Values.logOptions.format -}}
{{- $allowed := splitList "\n" (include "pycilium.extraConfigKeys" .) -}}
{{- range $k, $v := .Values.extraConfig -}}
{{- if hasKey $c $k -}}
{{- fail (printf "extraConfig.%s: this agent setting is derived from the chart's values; set the corresponding value instead" $k) -}}
{{- end -}}
{{- if not (has $k $allowed) -}}
{{- fail (printf "extraConfig.%s: not an agent setting the chart lets you set (allowed: %s)" $k (join ", " $allowed)) -}}
{{- end -}}
{{- if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) -}}
{{- $v = int64 $v -}}
{{- end -}}
{{- $_ := set $c $k (toString $v) -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{/* State-wiping flags read by the clean-state init container (kept out of pycilium-config, whose
keys are exactly the agent's settings). */}}
{{- define "pycilium.initConfig" -}}
clean-pycilium-state: {{ .Values.cleanState | toString | quote }}
clean-pycilium-bpf-state: {{ .Values.cleanBpfState | toString | quote }}
{{- end -}}
