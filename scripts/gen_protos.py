"""Regenerate the Python code for protos/ into gen/ (or another directory).

    python scripts/gen_protos.py            # write gen/
    python scripts/gen_protos.py --check    # fail if gen/ differs from a fresh build

The proto path mirrors the Python package (protos/shoal/storage/v1 -> shoal.storage.v1),
so generated imports work without rewriting. Output depends only on the pinned
grpcio-tools and mypy-protobuf versions.

Only Shoal's own files (protos/shoal/) are generated: the vendored google/rpc and
grpc/health files (protos/README.md) are for clients in other languages, and Python
gets them from googleapis-common-protos and grpcio-health-checking.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "shoal").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for leaf in sorted({p.parent for p in out.rglob("*.py")}):
        for directory in [leaf, *leaf.parents]:
            if directory == out:
                break
            (directory / "__init__.py").touch()
            (directory / "py.typed").touch()


def _files(root: Path) -> set[Path]:
    return {
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def differences(a: Path, b: Path) -> list[str]:
    files_a = _files(a)
    files_b = _files(b)
    diffs = sorted(str(p) for p in files_a ^ files_b)
    diffs += sorted(
        str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False)
    )
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        for cache in fresh.rglob("__pycache__"):
            shutil.rmtree(cache)
        if args.check:
            diffs = differences(fresh, GEN) if GEN.exists() else ["gen/ is missing"]
            if diffs:
                print("generated code is out of date (run `make proto`):", file=sys.stderr)
                for d in diffs:
                    print(f"  {d}", file=sys.stderr)
                return 1
            return 0
        if GEN.exists():
            shutil.rmtree(GEN)
        shutil.copytree(fresh, GEN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
