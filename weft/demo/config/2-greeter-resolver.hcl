# Two subsets of greeter's instances, by the version in their service meta. A call without a
# subset goes to v1; when v1 has no healthy instance, its calls fail over to v2.
Kind          = "service-resolver"
Name          = "greeter"
DefaultSubset = "v1"
Subsets = {
  v1 = { Filter = "Service.Meta.version == v1" }
  v2 = { Filter = "Service.Meta.version == v2" }
}
Failover = {
  v1 = { ServiceSubset = "v2" }
}
