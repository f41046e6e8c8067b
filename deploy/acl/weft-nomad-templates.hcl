# Consul ACL policy for the templates of the Nomad jobs (nomad/*.nomad.hcl): what the tasks' workload
# identity tokens need to render `keyOrDefault "weft/config/..."` and `service "greeter|any"`.
# With `nomad setup consul`, tasks log in through the binding rule that gives them the role
# nomad-<namespace>-tasks; add this policy to that role:
#   consul acl policy create -name weft-nomad-templates -rules @deploy/acl/weft-nomad-templates.hcl
#   consul acl role update -name nomad-default-tasks -policy-name weft-nomad-templates   (or role create)
key_prefix "weft/config/" {
  policy = "read"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
