"""The CA's state in Consul KV: key material encrypted under a KEK, the public trust bundle, the cluster id.

- ``weft/ca/state``: the provider's state (keys included) as JSON, sealed with AES-256-GCM under the
  key-encryption key (KEK). The envelope names the algorithm, a KEK fingerprint (so a wrong KEK is
  reported as such) and the nonce; the associated data binds it to the key name and cluster id.
- ``weft/ca/roots``: the trust bundle, exactly in the shape of Consul's ``/v1/connect/ca/roots``, so
  that sidecars can read it even while no CA runs.
- ``weft/ca/cluster-id``: created once with ``cas=0``; every replica reads the same one. The trust
  domain is ``<cluster-id>.consul``.

The KEK comes from ``WEFT_CA_KEK`` or ``--kek-file``: 32 bytes, given raw, base64 or hex; a longer
passphrase is stretched with scrypt. ``-dev`` without a KEK uses a fixed, publicly known dev KEK and
the CA says so in a warning.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ca.backend import KEY_CLUSTER_ID, KEY_ROOTS, KEY_STATE, KV, KVEntry
from ca.identity import IdentityError, trust_domain_for, validate_cluster_id
from ca.provider import CAError, TrustBundle

KEK_ENV = "WEFT_CA_KEK"
_DEV_KEK_PASSPHRASE = b"weft-dev-insecure-kek: never use outside -dev"
_SCRYPT_SALT = b"weft/ca/kek/v1"
ENVELOPE_VERSION = 1


class KekError(CAError):
    """No KEK, an unusable KEK, or a KEK that does not open the stored state."""


@dataclass(frozen=True, slots=True)
class Kek:
    key: bytes
    source: str  # "env", "file:<path>", "dev" (for logs; never the key)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"weft-kek-id" + self.key).hexdigest()[:16]

    @property
    def insecure(self) -> bool:
        return self.source == "dev"


def kek_from_text(text: bytes, source: str) -> Kek:
    """Interpret KEK material: 32 raw bytes, base64 or hex of 32 bytes, or a passphrase (>= 16 chars)."""
    raw = text.strip()
    if len(text) == 32 and text != raw:  # raw bytes that happen to start/end with whitespace
        raw = text
    if not raw:
        raise KekError(f"the KEK from {source} is empty")
    if len(raw) == 32:
        return Kek(bytes(raw), source)
    for decode in (base64.b64decode, base64.urlsafe_b64decode, binascii.unhexlify):
        try:
            decoded = decode(raw)
        except (binascii.Error, ValueError):
            continue
        if len(decoded) == 32:
            return Kek(decoded, source)
    if len(raw) >= 16:
        return Kek(hashlib.scrypt(raw, salt=_SCRYPT_SALT, n=2**14, r=8, p=1, dklen=32), source)
    raise KekError(f"the KEK from {source} is too short: give 32 bytes (raw, base64 or hex) "
                   "or a passphrase of at least 16 characters")


def load_kek(kek_file: str | None, dev: bool, environ: dict[str, str] | None = None) -> Kek:
    """The KEK from ``--kek-file`` (first) or ``WEFT_CA_KEK``; the dev KEK with ``dev``; else KekError."""
    env = os.environ if environ is None else environ
    if kek_file:
        path = Path(kek_file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KekError(f"cannot read the KEK file {kek_file}: {exc.strerror}") from None
        return kek_from_text(data, f"file:{kek_file}")
    value = env.get(KEK_ENV)
    if value:
        return kek_from_text(value.encode(), KEK_ENV)
    if dev:
        return Kek(hashlib.sha256(_DEV_KEK_PASSPHRASE).digest(), "dev")
    raise KekError(f"no key-encryption key: set {KEK_ENV} or pass --kek-file (or run with -dev to use an "
                   "insecure built-in one)")


def seal(kek: Kek, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    ct = AESGCM(kek.key).encrypt(nonce, plaintext, aad)
    env = {"v": ENVELOPE_VERSION, "alg": "AES-256-GCM", "kek": kek.fingerprint,
           "nonce": base64.b64encode(nonce).decode(), "ct": base64.b64encode(ct).decode()}
    return json.dumps(env).encode()


def unseal(kek: Kek, envelope: bytes, aad: bytes) -> bytes:
    try:
        env = json.loads(envelope)
        if env.get("v") != ENVELOPE_VERSION or env.get("alg") != "AES-256-GCM":
            raise KekError(f"CA state envelope has unknown version/algorithm {env.get('v')!r}/{env.get('alg')!r}")
        nonce = base64.b64decode(env["nonce"])
        ct = base64.b64decode(env["ct"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KekError(f"CA state in KV is not a sealed envelope: {exc!r}") from None
    if env.get("kek") != kek.fingerprint:
        raise KekError(f"the CA state was sealed with another KEK (fingerprint {env.get('kek')}, this KEK "
                       f"is {kek.fingerprint}); start the CA with the KEK it was created with")
    try:
        return AESGCM(kek.key).decrypt(nonce, ct, aad)
    except InvalidTag:
        raise KekError("the CA state does not decrypt: it was altered, or belongs to another cluster") from None


class CAStore:
    """Reads and writes the CA's keys in KV; every write of the state is check-and-set."""

    def __init__(self, kv: KV, kek: Kek) -> None:
        self._kv = kv
        self._kek = kek
        self._state_index = 0

    @property
    def kv(self) -> KV:
        return self._kv

    async def cluster_id(self) -> str:
        """The cluster id, created once (``cas=0``) by whoever comes first."""
        for _ in range(5):
            entry = await self._kv.get(KEY_CLUSTER_ID)
            if entry is not None:
                value = entry.value.decode(errors="replace").strip()
                try:
                    return validate_cluster_id(value)
                except IdentityError as exc:
                    raise CAError(f"KV {KEY_CLUSTER_ID} holds an invalid cluster id: {exc}") from None
            if await self._kv.put(KEY_CLUSTER_ID, str(uuid.uuid4()).encode(), cas=0):
                continue  # read it back: the value that won is the one we return
        raise CAError(f"could not create or read {KEY_CLUSTER_ID}")

    async def trust_domain(self) -> str:
        return trust_domain_for(await self.cluster_id())

    def _aad(self, trust_domain: str) -> bytes:
        return f"{KEY_STATE}\x00{trust_domain}".encode()

    async def load_state(self, trust_domain: str) -> dict[str, Any] | None:
        """The decrypted provider state, or ``None`` when there is none yet; remembers its index."""
        entry = await self._kv.get(KEY_STATE)
        if entry is None:
            self._state_index = 0
            return None
        self._state_index = entry.modify_index
        doc = json.loads(unseal(self._kek, entry.value, self._aad(trust_domain)))
        if not isinstance(doc, dict):
            raise CAError("decrypted CA state is not an object")
        return doc

    async def save_state(self, trust_domain: str, state: dict[str, Any]) -> bool:
        """Write the state if nobody else did since we read it; False means we lost a race."""
        sealed = seal(self._kek, json.dumps(state).encode(), self._aad(trust_domain))
        if not await self._kv.put(KEY_STATE, sealed, cas=self._state_index):
            return False
        entry = await self._kv.get(KEY_STATE)
        self._state_index = entry.modify_index if entry is not None else 0
        return True

    async def publish_roots(self, bundle: TrustBundle) -> None:
        await self._kv.put(KEY_ROOTS, bundle.to_json().encode())

    async def read_roots(self) -> TrustBundle | None:
        return await read_roots(self._kv)


def parse_roots_entry(entry: KVEntry | None) -> TrustBundle | None:
    if entry is None:
        return None
    return TrustBundle.from_json(entry.value, entry.modify_index)


async def read_roots(kv: KV) -> TrustBundle | None:
    """The published trust bundle (readable without the KEK, and while no CA runs)."""
    return parse_roots_entry(await kv.get(KEY_ROOTS))
