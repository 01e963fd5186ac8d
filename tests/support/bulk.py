"""Large reads made small for tests: what a read over the JSON gateway reads over gRPC once it
finds many keys to come (`fleetd.registry.BULK_READ_KEYS`)."""

from __future__ import annotations

import pytest

from fleetd import etcd_grpc
from fleetd import registry as registry_module
from fleetd.etcd_kv import Unreachable


def bulk_pages(
    monkeypatch: pytest.MonkeyPatch, fail: bool = False, spared: object = None
) -> list[int]:
    """Counts the pages read over gRPC from here on by any transport but `spared` (each
    failing when `fail`), and makes any read with more than 50 keys to come a large one."""
    monkeypatch.setattr(registry_module, "BULK_READ_KEYS", 50)
    monkeypatch.setattr(registry_module, "SNAPSHOT_PAGE", 40)
    pages: list[int] = []
    read = etcd_grpc.GrpcTransport.range

    def counted(self: etcd_grpc.GrpcTransport, *args: object, **kwargs: object) -> object:
        if self is not spared:
            pages.append(1)
            if fail:
                raise Unreachable("made to fail")
        return read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(etcd_grpc.GrpcTransport, "range", counted)
    return pages
