"""The committed generated stubs are exactly what scripts/gen_protos.py makes from the .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = {p.name: p.read_text() for p in gen.generate(tmp_path)}
    committed = {p.name: p.read_text() for p in (ROOT / "proto").glob("*_pb2*.py*")}
    assert fresh.keys() == committed.keys(), "stub files differ: run python3 scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run python3 scripts/gen_protos.py and commit the result"


def test_status_table_covers_every_error_status() -> None:
    import splitserve.engine.errors as ee
    import splitserve.kv_transfer.errors as ke
    from splitserve.proto.status import STATUSES

    for module in (ee, ke):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Exception) and hasattr(obj, "status"):
                assert obj.status in STATUSES, f"{obj.__name__}.status {obj.status!r} has no gRPC/HTTP mapping"
