# Weft's control plane on Nomad: the CA and the policy service, two replicas each.
#
# One replica of each is active at a time (a Consul session lock on weft/ca/leader and
# weft/policy/leader); the other takes over when the active one dies.
# Both read CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN like Consul's own tools.
#
# No Nomad `service` blocks here: each replica registers itself (services weft-ca and weft-policy)
# through the agent API with a TTL check whose output says leader or standby, which a Nomad service
# block cannot carry (no TTL checks there); the CA also ties its leader session to that check, so a
# dead leader is replaced within the check's TTL. Sidecars find the CA as Consul service weft-ca.
#
# With Consul ACLs on, each process runs with its own Consul token (policies in deploy/acl/), and the
# templates read Consul with the task's workload identity (identity "consul_default"; see nomad/README.md).
# Before the first run, store the CA's key-encryption key and the two tokens as a Nomad variable:
#   nomad var put nomad/jobs/weft-control-plane ca_kek="$(head -c 32 /dev/urandom | base64)" \
#       ca_consul_token=<token with policy weft-ca> policy_consul_token=<token with policy weft-policy>
# Runtime settings come from Consul KV (keyOrDefault: the job starts with defaults when a key is absent):
#   weft/config/ca/leaf-ttl            leaf certificate lifetime (default 72h)
#   weft/config/policy/default-policy  allow | deny (default deny)
#   weft/config/log-level              debug | info | warn | error (default info)

variable "weft" {
  type        = string
  default     = "/opt/weft/.venv/bin/weft"
  description = "absolute path of the weft executable on every client"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "consul_addr" {
  type        = string
  default     = "127.0.0.1:8500"
  description = "the local Consul agent, as seen from the client"
}

job "weft-control-plane" {
  datacenters = var.datacenters
  type        = "service"

  group "ca" {
    count = 2

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      port "grpc" {}
    }


    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "ca" {
      driver       = "raw_exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      config {
        command = var.weft
        args = [
          "ca", "serve",
          "--listen", "${NOMAD_IP_grpc}:${NOMAD_PORT_grpc}",
          "--kek-file", "${NOMAD_SECRETS_DIR}/kek",
          "--leaf-ttl", "${WEFT_LEAF_TTL}",
          "--advertise", "${NOMAD_IP_grpc}:${NOMAD_PORT_grpc}",
          "--log-level", "${WEFT_LOG_LEVEL}",
        ]
      }

      # the templates below read Consul KV with this task's workload identity (Nomad 1.7+)
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }

      env {
        CONSUL_HTTP_ADDR = var.consul_addr
        PYTHONUNBUFFERED = "1"
      }

      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/weft-control-plane" }}{{ .ca_kek }}{{ end }}
        EOT
        destination = "secrets/kek"
        perms       = "0600"
        change_mode = "restart"
      }

      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/weft-control-plane" }}CONSUL_HTTP_TOKEN={{ .ca_consul_token }}{{ end }}
        EOT
        destination = "secrets/consul.env"
        env         = true
        perms       = "0600"
        change_mode = "restart"
      }

      template {
        data        = <<-EOT
          WEFT_LEAF_TTL={{ keyOrDefault "weft/config/ca/leaf-ttl" "72h" }}
          WEFT_LOG_LEVEL={{ keyOrDefault "weft/config/log-level" "info" }}
        EOT
        destination = "local/ca.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }

  group "policy" {
    count = 2

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      port "grpc" {}
    }


    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "policy" {
      driver       = "raw_exec"
      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      config {
        command = var.weft
        args = [
          "policy", "serve",
          "-grpc-addr", "${NOMAD_IP_grpc}:${NOMAD_PORT_grpc}",
          "-default-policy", "${WEFT_DEFAULT_POLICY}",
          "-advertise-addr", "${NOMAD_IP_grpc}",
          "-log-level", "${WEFT_LOG_LEVEL}",
        ]
      }

      # the templates below read Consul KV with this task's workload identity (Nomad 1.7+)
      identity {
        name = "consul_default"
        aud  = ["consul.io"]
        ttl  = "1h"
      }

      env {
        CONSUL_HTTP_ADDR = var.consul_addr
        PYTHONUNBUFFERED = "1"
      }

      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/weft-control-plane" }}CONSUL_HTTP_TOKEN={{ .policy_consul_token }}{{ end }}
        EOT
        destination = "secrets/consul.env"
        env         = true
        perms       = "0600"
        change_mode = "restart"
      }

      template {
        data        = <<-EOT
          WEFT_DEFAULT_POLICY={{ keyOrDefault "weft/config/policy/default-policy" "deny" }}
          WEFT_LOG_LEVEL={{ keyOrDefault "weft/config/log-level" "info" }}
        EOT
        destination = "local/policy.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
