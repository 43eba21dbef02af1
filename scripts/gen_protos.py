"""Regenerate the Python stubs of every .proto under proto/ (run from anywhere).

    python3 scripts/gen_protos.py            # write proto/*_pb2*.py(i)
    python3 scripts/gen_protos.py --out DIR  # write to DIR instead (the staleness test uses it)

The .proto files are compiled as `splitserve/proto/NAME.proto`, so the generated modules
import each other as `splitserve.proto.*` (the installed namespace) and register unique file
names in protobuf's descriptor pool.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "src" / "splitserve" / "proto"
        staged.mkdir(parents=True)
        protos = sorted((ROOT / "proto").glob("*.proto"))
        for p in protos:
            shutil.copy(p, staged / p.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        args = ["protoc", f"-I{Path(tmp) / 'src'}", f"-I{include}", f"--python_out={gen}", f"--grpc_python_out={gen}", f"--pyi_out={gen}"]
        args += [f"splitserve/proto/{p.name}" for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for f in sorted((gen / "splitserve" / "proto").glob("*_pb2*.py*")):
            shutil.copy(f, out / f.name)
            written.append(out / f.name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "proto", help="folder the stubs are written to")
    files = generate(parser.parse_args().out)
    print("\n".join(str(f) for f in files), file=sys.stderr)


if __name__ == "__main__":
    main()
