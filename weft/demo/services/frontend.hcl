# The demo's HTTP frontend. It calls greeter through its sidecar at 127.0.0.1:19101.
service {
  name = "frontend"
  id   = "frontend-1"
  port = 19100
  tags = ["demo", "http"]
  meta = {
    protocol = "http"
  }

  check {
    id       = "frontend-http"
    name     = "frontend /healthz"
    http     = "http://127.0.0.1:19100/healthz"
    interval = "2s"
    timeout  = "1s"
  }

  connect {
    sidecar_service {
      port = 21100
      proxy {
        upstreams = [
          {
            destination_name = "greeter"
            local_bind_port  = 19101
          }
        ]
      }
    }
  }
}
