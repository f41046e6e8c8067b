"""`weft dev`'s mesh on one machine: its plan (:mod:`devmesh.plan`, pure), its processes
(:mod:`devmesh.processes`), readiness probes (:mod:`devmesh.probes`), the state file other commands
read to find it (:mod:`devmesh.state`), and the assembly that starts and stops it all
(:mod:`devmesh.mesh`). Only the CLI (`weft`) imports it; it talks to Consul through `catalog`."""
