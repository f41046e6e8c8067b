# Consul ACL policy of `weft policy serve` (its CONSUL_HTTP_TOKEN):
#   consul acl policy create -name weft-policy -rules @deploy/acl/weft-policy.hcl
#   consul acl token create -description "weft policy" -policy-name weft-policy
key_prefix "weft/intentions/" {
  policy = "read" # intentions kept in KV
}
key_prefix "weft/policy/" {
  policy = "write" # the compiled tables and the leader lock
}
session_prefix "" {
  policy = "write" # the leader lock's session, on this node
}
service "weft-policy" {
  policy = "write" # its registration and TTL check
}
service_prefix "" {
  policy     = "read"
  intentions = "read" # native intentions (service-intentions config entries)
}
node_prefix "" {
  policy = "read"
}
