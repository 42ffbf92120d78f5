{{- define "meshsign.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshsign.fullname" -}}
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

{{- define "meshsign.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "meshsign.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "meshsign.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshsign.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshsign.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshsign.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Whether the local cluster's tokens go to its TokenReview API. */}}
{{- define "meshsign.needsTokenReview" -}}
{{- if and .Values.kubernetes.enabled (eq .Values.kubernetes.tokens "tokenreview") }}true{{ end }}
{{- end }}

{{- define "meshsign.needsPods" -}}
{{- if and .Values.kubernetes.enabled .Values.kubernetes.trustedNodeAccounts }}true{{ end }}
{{- end }}

{{- define "meshsign.needsRoots" -}}
{{- if and .Values.kubernetes.enabled .Values.kubernetes.rootCertificates.enabled }}true{{ end }}
{{- end }}

{{/*
meshsign's configuration file, built as a dict and written with toYaml, so
what is rendered is always well-formed YAML. Keys are meshsign's (see the
configuration reference in the repository's README.md).
*/}}
{{- define "meshsign.config" -}}
{{- $fullname := include "meshsign.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $dns := list (printf "%s.%s.svc" $fullname $ns) (printf "%s.%s.svc.cluster.local" $fullname $ns) -}}
{{- $dns = concat $dns .Values.serverTLS.extraDnsNames -}}
{{- $tls := dict "dns_names" $dns "ip_addresses" .Values.serverTLS.ipAddresses "cert_ttl" .Values.serverTLS.certTTL -}}
{{- if .Values.serverTLS.existingSecret -}}
{{- $_ := set $tls "cert_file" "/etc/meshsign/tls/tls.crt" -}}
{{- $_ := set $tls "key_file" "/etc/meshsign/tls/tls.key" -}}
{{- end -}}
{{- $authn := dict "client_certificates" .Values.authn.clientCertificates "clock_skew" .Values.authn.clockSkew -}}
{{- if .Values.authn.jwt -}}
{{- $_ := set $authn "jwt" .Values.authn.jwt -}}
{{- end -}}
{{- $cfg := dict
  "listen" (printf "0.0.0.0:%v" .Values.service.grpcPort)
  "trust_domain" .Values.trustDomain
  "trust_domain_aliases" .Values.trustDomainAliases
  "state_dir" "/var/lib/meshsign"
  "server_tls" $tls
  "ca" (dict "dir" .Values.ca.mountPath "reload_interval" .Values.ca.reloadInterval)
  "authn" $authn
  "monitoring" (dict "listen" (printf "0.0.0.0:%v" .Values.service.metricsPort))
-}}
{{- if .Values.policy }}{{ $_ := set $cfg "policy" .Values.policy }}{{ end -}}
{{- if .Values.limits }}{{ $_ := set $cfg "limits" .Values.limits }}{{ end -}}
{{- if .Values.rateLimits }}{{ $_ := set $cfg "rate_limits" .Values.rateLimits }}{{ end -}}
{{- if .Values.audit.enabled -}}
{{- $_ := set $cfg "audit" (merge (dict "dir" "/var/lib/meshsign/audit") .Values.audit.settings) -}}
{{- end -}}
{{- if .Values.kubernetes.enabled -}}
{{- $k := .Values.kubernetes -}}
{{- $local := dict "id" $k.clusterId "aliases" $k.clusterAliases "in_cluster" true "tokens" $k.tokens -}}
{{- if eq $k.tokens "jwt" }}{{ $_ := set $local "jwt_issuer" (required "kubernetes.localJwtIssuer is required with kubernetes.tokens=jwt" $k.localJwtIssuer) }}{{ end -}}
{{- $clusters := list $local -}}
{{- range $k.remoteClusters -}}
{{- $c := dict "id" (required "kubernetes.remoteClusters[].id is required" .id) "aliases" (.aliases | default list) "kubeconfig" (printf "/etc/meshsign/remote/%s/%s" .id (.kubeconfigKey | default "kubeconfig")) "tokens" (.tokens | default "tokenreview") -}}
{{- if eq (.tokens | default "tokenreview") "jwt" }}{{ $_ := set $c "jwt_issuer" (required "kubernetes.remoteClusters[].jwtIssuer is required with tokens=jwt" .jwtIssuer) }}{{ end -}}
{{- $clusters = append $clusters $c -}}
{{- end -}}
{{- $tr := $k.tokenReview -}}
{{- $kube := dict
  "clusters" $clusters
  "token_review" (dict "audiences" $tr.audiences "cache_ttl" $tr.cacheTTL "cache_size" $tr.cacheSize "timeout" $tr.timeout "max_concurrent" $tr.maxConcurrent)
  "trusted_node_accounts" $k.trustedNodeAccounts
-}}
{{- if $k.rootCertificates.enabled -}}
{{- $r := $k.rootCertificates -}}
{{- $_ := set $kube "root_certificates" (dict "configmap" $r.configmap "namespace_selector" $r.namespaceSelector "cluster_trust_bundle" $r.clusterTrustBundle "lease_namespace" $ns "lease_name" $r.leaseName "lease_duration" $r.leaseDuration "resync" $r.resync) -}}
{{- end -}}
{{- $_ := set $cfg "kubernetes" $kube -}}
{{- end -}}
{{- toYaml (mergeOverwrite $cfg .Values.extraConfig) }}
{{- end }}
