{{/* Names, labels and the derived settings every template shares. */}}

{{- define "fleetgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "fleetgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fleetgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "fleetgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: fleetgate
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations for any object (commonAnnotations plus extra). */}}
{{/* Written right after a top-level metadata's labels: `{{- include ... }}`. */}}
{{- define "fleetgate.annotations" -}}
{{- $all := merge (deepCopy (default dict .extra)) (deepCopy .root.Values.commonAnnotations) -}}
{{- if $all }}
  annotations:
    {{- toYaml $all | nindent 4 }}
{{- end }}
{{- end -}}

{{- define "fleetgate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{- define "fleetgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fleetgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fleetgate.secretName" -}}
{{- default (printf "%s-secrets" (include "fleetgate.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* "true" when the development Redis runs (no external Redis configured). */}}
{{- define "fleetgate.devRedis" -}}
{{- if and .Values.devRedis.enabled (not .Values.redis.urls) (not .Values.redis.existingSecret) -}}true{{- end -}}
{{- end -}}

{{- define "fleetgate.devRedisName" -}}
{{- printf "%s-dev-redis" (include "fleetgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "true" when the pods talk to some Redis. */}}
{{- define "fleetgate.hasRedis" -}}
{{- if or .Values.redis.urls .Values.redis.existingSecret (include "fleetgate.devRedis" .) -}}true{{- end -}}
{{- end -}}

{{/* The drain period in ms, falling back to the binary's default (30000). */}}
{{- define "fleetgate.drainMs" -}}
{{- $g := default dict .Values.config.gateway -}}
{{- int64 (default 30000 $g.drain_period_ms) -}}
{{- end -}}

{{/* Grace period: explicit, or 2 x drain + 15 s. */}}
{{- define "fleetgate.gatewayGraceSeconds" -}}
{{- if .Values.gateway.terminationGracePeriodSeconds -}}
{{- int64 .Values.gateway.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (div (mul 2 (include "fleetgate.drainMs" . | int64)) 1000) 15 -}}
{{- end -}}
{{- end -}}

{{/* Sessions per gateway pod: explicit, or devicesPerPod plus headroom. */}}
{{- define "fleetgate.maxConnections" -}}
{{- $g := default dict .Values.config.gateway -}}
{{- if $g.max_connections -}}
{{- int64 $g.max_connections -}}
{{- else -}}
{{- $s := .Values.gateway.sizing -}}
{{- div (mul (int64 $s.devicesPerPod) (add 100 (int64 $s.headroomPercent))) 100 -}}
{{- end -}}
{{- end -}}

{{/*
Resources of a gateway pod. Explicit resources win; otherwise memory from BENCHMARKS.md:
request = devicesPerPod x 5 KiB (idle, measured 4-4.7 KiB) + 64 MiB;
limit = max_connections x 16 KiB (busy sessions) + 128 MiB. No CPU limit: throttling a
gateway stretches every device's heartbeat and ack latency.
*/}}
{{- define "fleetgate.gatewayResources" -}}
{{- if .Values.gateway.resources -}}
{{- toYaml .Values.gateway.resources -}}
{{- else -}}
{{- $s := .Values.gateway.sizing -}}
{{- $req := add (div (mul (int64 $s.devicesPerPod) 5) 1024) 64 -}}
{{- $lim := add (div (mul (include "fleetgate.maxConnections" . | int64) 16) 1024) 128 -}}
requests:
  cpu: {{ $s.cpuRequest }}
  memory: {{ $req }}Mi
limits:
  memory: {{ $lim }}Mi
{{- end -}}
{{- end -}}

{{/* One TOML value: strings quoted (JSON escapes are valid TOML), numbers as integers. */}}
{{- define "fleetgate.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- . -}}
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) -}}
{{- int64 . -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "fleetgate.tomlValue" $v }}{{ end -}}]
{{- else -}}
{{- fail (printf "config: cannot write %v (%s) as TOML" . (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/* Keys of a map as TOML lines, skipping empty values (unset = the binary's default). */}}
{{- define "fleetgate.tomlTable" -}}
{{- range $k, $v := . }}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) (not (and (kindIs "string" $v) (eq $v ""))) }}
{{ $k }} = {{ include "fleetgate.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "fleetgate.secretsDir" -}}/etc/fleetgate/secrets{{- end -}}

{{- define "fleetgate.tlsDir" -}}/etc/fleetgate/tls{{- end -}}

{{/*
The TLS Secrets a role's pods mount and the variables naming the files in them, as JSON:
{"volumes": [{name, secretName, dir, items}], "env": [{name, value}]}. (dict "root" $ "role" r).
Only the listeners the role serves: the binary checks every key file it is told of at start,
so a path must not reach a pod that does not mount it. That is also why the paths are
variables of each Deployment rather than lines of the TOML file every pod shares (an empty
variable does not unset a path the file sets).
*/}}
{{- define "fleetgate.tls" -}}
{{- $t := .root.Values.tls -}}
{{- $dir := include "fleetgate.tlsDir" .root -}}
{{- $volumes := list -}}
{{- $env := list -}}
{{- $listeners := list -}}
{{- if ne .role "admin" }}{{ $listeners = append $listeners (list "public" $t.public.secretName "TLS") }}{{ end -}}
{{- if ne .role "gateway" }}{{ $listeners = append $listeners (list "admin" $t.admin.secretName "ADMIN_TLS") }}{{ end -}}
{{- $listeners = append $listeners (list "internal" $t.internal.secretName "INTERNAL_TLS") -}}
{{- range $l := $listeners }}
{{- $name := index $l 0 }}{{ $secret := index $l 1 }}{{ $var := index $l 2 }}
{{- if $secret }}
{{- $items := list "tls.crt" "tls.key" }}
{{- $env = append $env (dict "name" (printf "FLEETGATE_%s_CERT" $var) "value" (printf "%s/%s/tls.crt" $dir $name)) }}
{{- $env = append $env (dict "name" (printf "FLEETGATE_%s_KEY" $var) "value" (printf "%s/%s/tls.key" $dir $name)) }}
{{- if and (eq $name "public") $t.public.clientCa }}
{{- $items = append $items "ca.crt" }}
{{- $env = append $env (dict "name" "FLEETGATE_TLS_CLIENT_CA" "value" (printf "%s/public/ca.crt" $dir)) }}
{{- end }}
{{- $volumes = append $volumes (dict "name" (printf "tls-%s" $name) "secretName" $secret "dir" (printf "%s/%s" $dir $name) "items" $items) }}
{{- if eq $name "public" }}
{{- with $t.public.clientCaSecret }}
{{- $volumes = append $volumes (dict "name" "tls-client-ca" "secretName" . "dir" (printf "%s/client-ca" $dir) "items" (list "ca.crt")) }}
{{- $env = append $env (dict "name" "FLEETGATE_TLS_CLIENT_CA" "value" (printf "%s/client-ca/ca.crt" $dir)) }}
{{- end }}
{{- with $t.crlSecret }}
{{- $volumes = append $volumes (dict "name" "tls-crl" "secretName" . "dir" (printf "%s/crl" $dir) "items" (list "crl.pem")) }}
{{- $env = append $env (dict "name" "FLEETGATE_TLS_CRL" "value" (printf "%s/crl/crl.pem" $dir)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
{{- toJson (dict "volumes" $volumes "env" $env) -}}
{{- end -}}

{{/*
TLS combinations the chart cannot render correctly: refused with the reason, rather than pods
that fail their handshakes.
*/}}
{{- define "fleetgate.tlsChecks" -}}
{{- $p := .Values.tls.public -}}
{{- $clientCa := or $p.clientCa $p.clientCaSecret -}}
{{- if and $p.clientCa $p.clientCaSecret -}}
{{- fail "tls.public: set clientCa (ca.crt of secretName) or clientCaSecret, not both" -}}
{{- end -}}
{{- if and $clientCa (not $p.secretName) -}}
{{- fail "tls.public: a client CA (mTLS) needs the public listener's certificate: set tls.public.secretName" -}}
{{- end -}}
{{- if and .Values.tls.crlSecret (not $clientCa) -}}
{{- fail "tls.crlSecret: a CRL is checked against device certificates: set tls.public.clientCa or clientCaSecret" -}}
{{- end -}}
{{- if and $clientCa (or .Values.proxy.enabled .Values.ingress.enabled .Values.gatewayApi.enabled) -}}
{{- fail "tls.public with a client CA (mTLS): the device's TLS session must end at the gateway, and the proxy, ingress or Gateway API route in front would end it and cannot pass the device certificate on. Turn proxy, ingress and gatewayApi off and let devices reach gateway.service (type LoadBalancer) directly" -}}
{{- end -}}
{{- if and $p.secretName .Values.gatewayApi.enabled -}}
{{- fail "tls.public with gatewayApi: an HTTPRoute sends plain HTTP to the gateways unless a BackendTLSPolicy (CA and hostname) says otherwise, which this chart does not write. Terminate TLS at the Gateway and leave tls.public.secretName empty" -}}
{{- end -}}
{{- end -}}

{{/* Whether an optional secret file is present: inline content or declared in existingSecret. */}}
{{- define "fleetgate.hasSecretFile" -}}
{{- $s := .root.Values.secrets -}}
{{- if $s.existingSecret -}}
{{- if index $s.existingSecretHas .key -}}true{{- end -}}
{{- else if index $s .key -}}true{{- end -}}
{{- end -}}

{{/* The TOML config: the user's `config` plus what the chart owns. */}}
{{- define "fleetgate.configToml" -}}
{{- include "fleetgate.configTomlFor" (dict "root" . "role" "all") -}}
{{- end -}}

{{/*
The config as one role reads it: a gateway ignores [admin], an admin process ignores
[gateway]. Only the pods' checksums use the narrowed text, so that changing an admin-only
setting does not roll (and drain) the gateways; every pod mounts the whole file.
*/}}
{{- define "fleetgate.configTomlFor" -}}
{{- $omit := index (dict "gateway" "admin" "admin" "gateway" "all" "") .role -}}
{{- with .root -}}
{{- $c := deepCopy .Values.config -}}
{{- $gateway := default dict $c.gateway -}}
{{- $_ := set $gateway "max_connections" (include "fleetgate.maxConnections" . | int64) -}}
{{- $admin := default dict $c.admin -}}
{{- $dir := include "fleetgate.secretsDir" . -}}
{{- $k := .Values.secrets.keys -}}
{{- if include "fleetgate.hasSecretFile" (dict "root" . "key" "jwtKeys") -}}
{{- $_ := set $c "jwt_keys" (printf "%s/%s" $dir $k.jwtKeys) -}}
{{- end -}}
{{- $jwt := default dict $c.jwt -}}
{{- if include "fleetgate.hasSecretFile" (dict "root" . "key" "jwks") -}}
{{- $_ := set $jwt "jwks" (printf "%s/%s" $dir $k.jwks) -}}
{{- end -}}
{{- if include "fleetgate.hasSecretFile" (dict "root" . "key" "adminTokenKeys") -}}
{{- $_ := set $admin "token_keys" (printf "%s/%s" $dir $k.adminTokenKeys) -}}
{{- end -}}
{{- if include "fleetgate.hasSecretFile" (dict "root" . "key" "auditSigningKey") -}}
{{- $_ := set $admin "audit_signing_key" (printf "%s/%s" $dir $k.auditSigningKey) -}}
{{- end -}}
{{- $mqtt := default dict $c.mqtt -}}
{{- if include "fleetgate.hasSecretFile" (dict "root" . "key" "mqttPassword") -}}
{{- $_ := set $mqtt "password_file" (printf "%s/%s" $dir $k.mqttPassword) -}}
{{- end -}}
{{- $_ := set $c "listen" (printf "0.0.0.0:%d" (int64 .Values.ports.public)) -}}
{{- $_ := set $c "admin_listen" (printf "0.0.0.0:%d" (int64 .Values.ports.admin)) -}}
{{- $_ := set $c "internal_listen" (printf "0.0.0.0:%d" (int64 .Values.ports.internal)) -}}
{{- if and (not .Values.redis.existingSecret) .Values.redis.urls -}}
{{- $_ := set $c "redis_urls" .Values.redis.urls -}}
{{- else if include "fleetgate.devRedis" . -}}
{{- $_ := set $c "redis_urls" (list (printf "redis://%s:6379" (include "fleetgate.devRedisName" .))) -}}
{{- end -}}
# Rendered by the fleetgate chart from `config` and the chart's own settings.
{{- include "fleetgate.tomlTable" $c }}
{{- $tables := dict "gateway" $gateway "admin" $admin "bus" (default dict $c.bus) "mqtt" $mqtt "tls" (default dict $c.tls) "jwt" $jwt "access" (default dict $c.access) }}
{{- range $section := without (list "gateway" "admin" "bus" "mqtt" "tls" "jwt" "access") $omit }}
{{- with index $tables $section }}
[{{ $section }}]
{{- include "fleetgate.tomlTable" . }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
Pod-level checksums: pods roll when the config or the secrets they read change. Gateway pods
read only the JWT keys, the user token keys and the MQTT password, so an admin API key or audit key rotation
does not drain every device. The JWKS file and the TLS Secrets are re-read while running, so
no pod sums them: a key or certificate renewal must not drain the devices.
(dict "root" $ "role" "gateway").
*/}}
{{- define "fleetgate.checksums" -}}
{{- $s := .root.Values.secrets -}}
{{- $gw := dict "existingSecret" $s.existingSecret "jwtKeys" $s.jwtKeys "has" $s.existingSecretHas.jwtKeys "key" $s.keys.jwtKeys "adminTokenKeys" $s.adminTokenKeys "hasTokens" $s.existingSecretHas.adminTokenKeys "mqttPassword" $s.mqttPassword "hasMqtt" $s.existingSecretHas.mqttPassword -}}
{{- $read := ternary $gw (omit $s "jwks") (eq .role "gateway") -}}
checksum/config: {{ include "fleetgate.configTomlFor" . | sha256sum }}
checksum/secrets: {{ toJson $read | sha256sum }}
{{- end -}}

{{/* `from:` of the devices' port: the proxy when it runs, else publicFrom (empty = anyone). */}}
{{- define "fleetgate.publicFrom" -}}
{{- if .Values.proxy.enabled -}}
from:
  - podSelector:
      matchLabels:
        {{- include "fleetgate.selectorLabels" (dict "root" . "component" "proxy") | nindent 8 }}
  {{- with .Values.networkPolicy.publicFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- else if .Values.networkPolicy.publicFrom -}}
from:
  {{- toYaml .Values.networkPolicy.publicFrom | nindent 2 }}
{{- end -}}
{{- end -}}
