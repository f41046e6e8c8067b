"""Conversions between the CA's protobuf messages (ca.v1) and `ca.provider` types, shared by the CA's
server and every client (GrpcCA on grpc.aio, the sidecar's own client); no grpc import here.
"""

from __future__ import annotations

from typing import Any

from ca.provider import TrustBundle
from ca.v1 import ca_pb2


def bundle_from_pb(pb: ca_pb2.TrustBundle) -> TrustBundle:
    doc: dict[str, Any] = {
        "ActiveRootID": pb.active_root_id,
        "TrustDomain": pb.trust_domain,
        "Roots": [
            {"ID": r.id, "Name": r.name, "SerialNumber": r.serial_number, "SigningKeyID": r.signing_key_id,
             "ExternalTrustDomain": pb.cluster_id, "NotBefore": r.not_before, "NotAfter": r.not_after,
             "RootCert": r.root_cert, "IntermediateCerts": list(r.intermediate_certs), "Active": r.active,
             "PrivateKeyType": r.private_key_type, "PrivateKeyBits": r.private_key_bits,
             "CreateIndex": r.create_index, "ModifyIndex": r.modify_index}
            for r in pb.roots
        ],
    }
    return TrustBundle.from_consul(doc, pb.index)
