# The demo's greeter (gRPC: unary SayHello, server-streaming SayHelloStream), version v1.
# It calls store through its sidecar at 127.0.0.1:19201. greeter-v2.hcl is its canary; the
# service-resolver in ../config selects each version by Service.Meta.version.
service {
  name = "greeter"
  id   = "greeter-1"
  port = 19200
  tags = ["demo", "grpc"]
  meta = {
    protocol = "grpc"
    version  = "v1"
  }

  check {
    id           = "greeter-grpc"
    name         = "greeter gRPC health"
    grpc         = "127.0.0.1:19200"
    grpc_use_tls = false
    interval     = "2s"
    timeout      = "1s"
  }

  connect {
    sidecar_service {
      port = 21200
      proxy {
        upstreams = [
          {
            destination_name = "store"
            local_bind_port  = 19201
          }
        ]
      }
    }
  }
}
