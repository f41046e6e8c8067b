# Consul ACL policy of `weft ca serve` (its CONSUL_HTTP_TOKEN):
#   consul acl policy create -name weft-ca -rules @deploy/acl/weft-ca.hcl
#   consul acl token create -description "weft ca" -policy-name weft-ca
key_prefix "weft/ca/" {
  policy = "write" # sealed state, the trust bundle (roots), the cluster id, the leader lock
}
session_prefix "" {
  policy = "write" # the leader lock's session, on this node
}
service "weft-ca" {
  policy = "write" # its registration and TTL check; finding the other replicas
}
node_prefix "" {
  policy = "read" # health of the replicas' nodes
}
agent_prefix "" {
  policy = "read" # the datacenter from /v1/agent/self (unless --datacenter)
}
acl = "read" # the policies and roles of callers' tokens: who may get which identity
