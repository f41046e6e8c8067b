# The Weft demo on Nomad: frontend (HTTP) -> greeter (gRPC) -> store (gRPC), each with its sidecar.
#
# Every group runs the app and, next to it, a Weft sidecar task started first
# (lifecycle prestart + sidecar: it runs for the life of the allocation). The group's `service`
# block registers the app in Consul (provider "consul", with a real health check; no TTL checks in
# Nomad service blocks); the sidecar finds that registration, registers itself as the app's
# connect-proxy (`<id>-sidecar-proxy`, with its own TTL check, through the agent API) and listens
# on the public mTLS port. The app listens on 127.0.0.1 only and reaches its upstream through the
# sidecar's local port; ports and upstreams are those of weft/demo/services/*.hcl|json.
#
# Needs: the control plane (control-plane.nomad.hcl) running, raw_exec enabled on the clients, Weft
# installed at var.weft / var.python on every client, and intentions:
#   weft intention allow frontend greeter && weft intention allow greeter store
# With Consul ACLs on: Nomad registers each group's service with the service's workload identity
# (`identity` in the service block), templates read Consul with the task's (identity "consul_default"),
# and each sidecar runs with a Consul token of its own, kept in a Nomad variable of its group
# (service identity of the service + policies weft-sidecar and weft-methods-<service>, deploy/acl/):
#   nomad var put nomad/jobs/weft-demo/store consul_token=...      (likewise greeter, frontend)
# Runtime settings from Consul KV (keyOrDefault: defaults apply when a key is absent):
#   weft/config/log-level            debug | info | warn | error (default info)
#   weft/config/demo/traffic-rps     requests/s of the traffic generator (default 2)

variable "weft" {
  type        = string
  default     = "/opt/weft/.venv/bin/weft"
  description = "absolute path of the weft executable on every client"
}

variable "python" {
  type        = string
  default     = "/opt/weft/.venv/bin/python"
  description = "the Python that has Weft installed (runs the demo apps)"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "consul_addr" {
  type    = string
  default = "127.0.0.1:8500"
}

job "weft-demo" {
  datacenters = var.datacenters
  type        = "service"

  group "store" {
    count = 1

    network {
      port "app" {}
      port "sidecar" {}
      port "admin" {}
    }

    service {
      name     = "store"
      provider = "consul"

      # Nomad registers it with this service's workload identity (a Consul service identity token)
      identity {
        aud = ["consul.io"]
        ttl = "1h"
      }

      port     = "app"
      address  = "127.0.0.1"
      meta = {
        protocol = "grpc"
      }

      check {
        name         = "store gRPC health"
        type         = "grpc"
        port         = "app"
        grpc_use_tls = false
        interval     = "5s"
        timeout      = "2s"
      }
    }

    task "sidecar" {
      driver       = "raw_exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      config {
        command = var.weft
        args = [
          "sidecar",
          "--sidecar-for", "${SIDECAR_FOR}",
          "--public-port", "${NOMAD_PORT_sidecar}",
          "--admin-port", "${NOMAD_PORT_admin}",
          "--log-level", "${WEFT_LOG_LEVEL}",
        ]
      }

      env {
        CONSUL_HTTP_ADDR = var.consul_addr
        PYTHONUNBUFFERED = "1"
      }

      # its templates read Consul (the service's registration, KV settings) with this task's workload identity
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }

      # its own Consul token (for its registration and the CA), from the group's Nomad variable
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/weft-demo/store" }}CONSUL_HTTP_TOKEN={{ .consul_token }}{{ end }}
        EOT
        destination = "secrets/consul.env"
        env         = true
        perms       = "0600"
        change_mode = "restart"
      }

      # The ID Nomad gave the group's service registration (it contains the allocation ID).
      template {
        data        = <<-EOT
          {{ range service "store|any" }}{{ if .ID | regexMatch (env "NOMAD_ALLOC_ID") }}SIDECAR_FOR={{ .ID }}{{ end }}{{ end }}
          WEFT_LOG_LEVEL={{ keyOrDefault "weft/config/log-level" "info" }}
        EOT
        destination = "local/sidecar.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = 200
        memory = 128
      }
    }

    task "app" {
      driver = "raw_exec"

      # its template reads Consul KV with this task's workload identity
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }


      config {
        command = var.python
        args    = ["-m", "weft.demo.store", "-host", "127.0.0.1", "-port", "${NOMAD_PORT_app}",
                   "-log-level", "${WEFT_LOG_LEVEL}"]
      }

      template {
        data        = "WEFT_LOG_LEVEL={{ keyOrDefault \"weft/config/log-level\" \"info\" }}\n"
        destination = "local/app.env"
        env         = true
      }

      resources {
        cpu    = 100
        memory = 96
      }
    }
  }

  group "greeter" {
    # Scale out on several clients (each instance binds the store upstream on 127.0.0.1:19201, so at
    # most one per client): raise count and add constraint { operator = "distinct_hosts" value = "true" }.
    count = 1

    network {
      port "app" {}
      port "sidecar" {}
      port "admin" {}
    }

    service {
      name     = "greeter"
      provider = "consul"

      # Nomad registers it with this service's workload identity (a Consul service identity token)
      identity {
        aud = ["consul.io"]
        ttl = "1h"
      }

      port     = "app"
      address  = "127.0.0.1"
      meta = {
        protocol = "grpc"
      }

      check {
        name         = "greeter gRPC health"
        type         = "grpc"
        port         = "app"
        grpc_use_tls = false
        interval     = "5s"
        timeout      = "2s"
      }
    }

    task "sidecar" {
      driver       = "raw_exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      config {
        command = var.weft
        args = [
          "sidecar",
          "--sidecar-for", "${SIDECAR_FOR}",
          "--public-port", "${NOMAD_PORT_sidecar}",
          "--admin-port", "${NOMAD_PORT_admin}",
          "--upstream", "store:19201",
          "--log-level", "${WEFT_LOG_LEVEL}",
        ]
      }

      env {
        CONSUL_HTTP_ADDR = var.consul_addr
        PYTHONUNBUFFERED = "1"
      }

      # its templates read Consul (the service's registration, KV settings) with this task's workload identity
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }

      # its own Consul token (for its registration and the CA), from the group's Nomad variable
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/weft-demo/greeter" }}CONSUL_HTTP_TOKEN={{ .consul_token }}{{ end }}
        EOT
        destination = "secrets/consul.env"
        env         = true
        perms       = "0600"
        change_mode = "restart"
      }

      template {
        data        = <<-EOT
          {{ range service "greeter|any" }}{{ if .ID | regexMatch (env "NOMAD_ALLOC_ID") }}SIDECAR_FOR={{ .ID }}{{ end }}{{ end }}
          WEFT_LOG_LEVEL={{ keyOrDefault "weft/config/log-level" "info" }}
        EOT
        destination = "local/sidecar.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = 200
        memory = 128
      }
    }

    task "app" {
      driver = "raw_exec"

      # its template reads Consul KV with this task's workload identity
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }


      config {
        command = var.python
        args    = ["-m", "weft.demo.greeter", "-host", "127.0.0.1", "-port", "${NOMAD_PORT_app}",
                   "-log-level", "${WEFT_LOG_LEVEL}"]
      }

      env {
        STORE_ADDR = "127.0.0.1:19201"
      }

      template {
        data        = "WEFT_LOG_LEVEL={{ keyOrDefault \"weft/config/log-level\" \"info\" }}\n"
        destination = "local/app.env"
        env         = true
      }

      resources {
        cpu    = 100
        memory = 96
      }
    }
  }

  group "frontend" {
    count = 1

    network {
      port "app" {}
      port "sidecar" {}
      port "admin" {}
    }

    service {
      name     = "frontend"
      provider = "consul"

      # Nomad registers it with this service's workload identity (a Consul service identity token)
      identity {
        aud = ["consul.io"]
        ttl = "1h"
      }

      port     = "app"
      address  = "127.0.0.1"
      meta = {
        protocol = "http"
      }

      check {
        name     = "frontend /healthz"
        type     = "http"
        port     = "app"
        path     = "/healthz"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "sidecar" {
      driver       = "raw_exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      config {
        command = var.weft
        args = [
          "sidecar",
          "--sidecar-for", "${SIDECAR_FOR}",
          "--public-port", "${NOMAD_PORT_sidecar}",
          "--admin-port", "${NOMAD_PORT_admin}",
          "--upstream", "greeter:19101",
          "--log-level", "${WEFT_LOG_LEVEL}",
        ]
      }

      env {
        CONSUL_HTTP_ADDR = var.consul_addr
        PYTHONUNBUFFERED = "1"
      }

      # its templates read Consul (the service's registration, KV settings) with this task's workload identity
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }

      # its own Consul token (for its registration and the CA), from the group's Nomad variable
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/weft-demo/frontend" }}CONSUL_HTTP_TOKEN={{ .consul_token }}{{ end }}
        EOT
        destination = "secrets/consul.env"
        env         = true
        perms       = "0600"
        change_mode = "restart"
      }

      template {
        data        = <<-EOT
          {{ range service "frontend|any" }}{{ if .ID | regexMatch (env "NOMAD_ALLOC_ID") }}SIDECAR_FOR={{ .ID }}{{ end }}{{ end }}
          WEFT_LOG_LEVEL={{ keyOrDefault "weft/config/log-level" "info" }}
        EOT
        destination = "local/sidecar.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = 200
        memory = 128
      }
    }

    task "app" {
      driver = "raw_exec"

      # its template reads Consul KV with this task's workload identity
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }


      config {
        command = var.python
        args    = ["-m", "weft.demo.frontend", "-host", "127.0.0.1", "-port", "${NOMAD_PORT_app}",
                   "-log-level", "${WEFT_LOG_LEVEL}"]
      }

      env {
        GREETER_ADDR = "127.0.0.1:19101"
      }

      template {
        data        = "WEFT_LOG_LEVEL={{ keyOrDefault \"weft/config/log-level\" \"info\" }}\n"
        destination = "local/app.env"
        env         = true
      }

      resources {
        cpu    = 100
        memory = 96
      }
    }

    # The gentle traffic generator, next to the frontend it calls (plain HTTP on loopback).
    task "traffic" {
      driver = "raw_exec"

      # its template reads Consul KV with this task's workload identity
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }


      lifecycle {
        hook    = "poststart"
        sidecar = true
      }

      config {
        command = var.python
        args    = ["-m", "weft.demo.traffic", "-url", "http://127.0.0.1:${NOMAD_PORT_app}", "-rps", "${TRAFFIC_RPS}"]
      }

      template {
        data        = "TRAFFIC_RPS={{ keyOrDefault \"weft/config/demo/traffic-rps\" \"2\" }}\n"
        destination = "local/traffic.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = 50
        memory = 64
      }
    }
  }
}
