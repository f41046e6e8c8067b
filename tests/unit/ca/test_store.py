from __future__ import annotations

import base64
from pathlib import Path

import pytest

from ca.backend import KEY_CLUSTER_ID, KEY_ROOTS, KEY_STATE
from ca.builtin import BuiltinProvider
from ca.provider import CAConfig, TrustBundle
from ca.store import CAStore, KekError, kek_from_text, load_kek, seal, unseal

from .fakes import FakeKV

KEY = bytes(range(32))


def test_kek_sources(tmp_path: Path) -> None:
    b64 = base64.b64encode(KEY).decode()
    assert load_kek(None, False, {"WEFT_CA_KEK": b64}).key == KEY
    assert load_kek(None, False, {"WEFT_CA_KEK": KEY.hex()}).key == KEY
    f = tmp_path / "kek"
    f.write_bytes(KEY)
    assert load_kek(str(f), False, {}).key == KEY
    with pytest.raises(KekError, match="no key-encryption key"):
        load_kek(None, False, {})
    assert load_kek(None, True, {}).insecure
    with pytest.raises(KekError, match="too short"):
        kek_from_text(b"short", "x")
    with pytest.raises(KekError, match="cannot read"):
        load_kek(str(tmp_path / "missing"), False, {})
    assert len(kek_from_text(b"a long enough passphrase", "x").key) == 32


def test_seal_unseal() -> None:
    k1, k2 = kek_from_text(KEY, "a"), kek_from_text(bytes(32), "b")
    env = seal(k1, b"secret", b"aad")
    assert b"secret" not in env
    assert unseal(k1, env, b"aad") == b"secret"
    with pytest.raises(KekError, match="another KEK"):
        unseal(k2, env, b"aad")
    with pytest.raises(KekError, match="does not decrypt"):
        unseal(k1, env, b"other-aad")
    with pytest.raises(KekError, match="not a sealed envelope"):
        unseal(k1, b"{garbage", b"aad")


async def test_cluster_id_created_once() -> None:
    kv = FakeKV()
    a, b = CAStore(kv, kek_from_text(KEY, "a")), CAStore(kv, kek_from_text(KEY, "a"))
    ida = await a.cluster_id()
    assert await b.cluster_id() == ida
    assert (await a.trust_domain()).endswith(".consul")
    assert kv.data[KEY_CLUSTER_ID].modify_index == 2  # written once


async def test_state_round_trip_and_cas() -> None:
    from datetime import UTC, datetime

    kv = FakeKV()
    store = CAStore(kv, kek_from_text(KEY, "a"))
    td = await store.trust_domain()
    assert await store.load_state(td) is None
    p = BuiltinProvider()
    p.configure(CAConfig(), td, None, datetime.now(UTC))
    assert await store.save_state(td, p.state())
    assert b"PRIVATE KEY" not in kv.data[KEY_STATE].value
    other = CAStore(kv, kek_from_text(KEY, "a"))
    assert await other.load_state(td) == p.state()
    # a second writer that read before our write loses the race
    stale = CAStore(kv, kek_from_text(KEY, "a"))
    await stale.load_state(td)
    assert await store.save_state(td, p.state())
    assert not await stale.save_state(td, p.state())
    await store.publish_roots(p.bundle(3))
    published = TrustBundle.from_json(kv.data[KEY_ROOTS].value)
    assert published.root_ids == p.bundle(3).root_ids
    assert (await store.read_roots()) is not None
