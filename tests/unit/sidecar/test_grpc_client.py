"""The sidecar's own gRPC client: response parsing of one call (sidecar.grpc_client._Call, no sockets)."""

from __future__ import annotations

import struct

from sidecar.grpc_client import INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE, UNIMPLEMENTED, RpcError, _Call


def _framed(msg: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(msg)) + msg


def _drain(call: _Call) -> list[object]:
    out: list[object] = []
    while not call.queue.empty():
        out.append(call.queue.get_nowait())
    return out


def test_messages_split_across_frames_then_ok_trailers() -> None:
    call = _Call(1024)
    call.on_headers([(b":status", b"200"), (b"content-type", b"application/grpc")], False)
    data = _framed(b"one") + _framed(b"two")
    call.on_data(data[:4], False)
    call.on_data(data[4:10], False)
    call.on_data(data[10:], False)
    call.on_headers([(b"grpc-status", b"0")], True)
    assert _drain(call) == [b"one", b"two", None]


def test_error_status_with_percent_encoded_message() -> None:
    call = _Call(1024)
    call.on_headers([(b":status", b"200"), (b"grpc-status", b"12"), (b"grpc-message", b"no%20such%20method")], True)
    [err] = _drain(call)
    assert isinstance(err, RpcError) and err.code == UNIMPLEMENTED and err.details == "no such method"
    assert err.name == "UNIMPLEMENTED"


def test_http_status_without_grpc_status_maps_like_grpc() -> None:
    call = _Call(1024)
    call.on_headers([(b":status", b"503")], True)
    [err] = _drain(call)
    assert isinstance(err, RpcError) and err.code == UNAVAILABLE


def test_oversized_compressed_and_truncated_responses_fail_the_call() -> None:
    big = _Call(4)
    big.on_headers([(b":status", b"200")], False)
    big.on_data(_framed(b"12345"), False)
    [err] = _drain(big)
    assert isinstance(err, RpcError) and err.code == RESOURCE_EXHAUSTED
    compressed = _Call(1024)
    compressed.on_headers([(b":status", b"200")], False)
    compressed.on_data(_framed(b"x", flag=1), False)
    [err] = _drain(compressed)
    assert isinstance(err, RpcError) and err.code == INTERNAL
    cut = _Call(1024)
    cut.on_headers([(b":status", b"200")], False)
    cut.on_data(_framed(b"x"), True)
    last = _drain(cut)[-1]
    assert isinstance(last, RpcError) and last.code == INTERNAL
