# Consul ACL policy every sidecar's token carries, next to the service identity of its service
# (which grants service:write on <service> and <service>-sidecar-proxy, read on all services and
# nodes) and a one-line policy for the methods table of its service:
#   consul acl policy create -name weft-sidecar -rules @deploy/acl/weft-sidecar.hcl
#   consul acl policy create -name weft-methods-web -rules 'key "weft/methods/web" { policy = "write" }'
#   consul acl token create -description "web sidecar" -service-identity web \
#       -policy-name weft-sidecar -policy-name weft-methods-web
key "weft/ca/roots" {
  policy = "read" # the trust bundle
}
key_prefix "weft/policy/compiled/" {
  policy = "read" # the compiled tables it enforces
}
key_prefix "weft/methods/" {
  policy = "read" # its upstreams' gRPC methods
}
agent_prefix "" {
  policy = "read" # the datacenter from /v1/agent/self (or set CONSUL_DATACENTER)
}
