# The greeter's canary: the same service, version v2 (the split in ../config sends it 10 % of
# calls, and every call with the header x-canary: 1). It calls store at 127.0.0.1:19211.
service {
  name = "greeter"
  id   = "greeter-2"
  port = 19210
  tags = ["demo", "grpc", "canary"]
  meta = {
    protocol = "grpc"
    version  = "v2"
  }

  check {
    id           = "greeter-2-grpc"
    name         = "greeter v2 gRPC health"
    grpc         = "127.0.0.1:19210"
    grpc_use_tls = false
    interval     = "2s"
    timeout      = "1s"
  }

  connect {
    sidecar_service {
      port = 21210
      proxy {
        upstreams = [
          {
            destination_name = "store"
            local_bind_port  = 19211
          }
        ]
      }
    }
  }
}
