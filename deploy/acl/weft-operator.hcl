# Consul ACL policy for the operator commands: `weft status`, `weft top`, `weft intention`,
# `weft register` (the registrations need service:write on the services too), `weft ca roots`:
#   consul acl policy create -name weft-operator -rules @deploy/acl/weft-operator.hcl
# `weft ca rotate` needs operator = "write" in addition.
key_prefix "weft/" {
  policy = "read" # trust bundle, compiled tables, methods
}
key_prefix "weft/intentions/" {
  policy = "write" # weft intention allow|deny|delete
}
service_prefix "" {
  policy     = "read"
  intentions = "write" # weft intention ... --native
}
node_prefix "" {
  policy = "read"
}
