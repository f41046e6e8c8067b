"""Consul's conventions, written once for every part of Weft (see `consulkit.conventions`).

A package of its own, below everything else: the dev agent (a Consul server that imports nothing of
the mesh) and the mesh's packages (catalog, policies, sidecar, weft) all follow the same rules.
"""
