"""docs/clients.md works as written: its grpcurl commands, run in order against a real
node with TLS the way grpcurl runs them (server reflection for the descriptors, the JSON
bodies parsed against them, the CA given with -cacert), all succeed; and its Python code
generation command produces importable modules."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.common.auth import basic_metadata
from tests.conftest import MakeNode
from tests.harness.node import PASSWORD, REPO, Node

DOC = REPO / "docs" / "clients.md"


def shell_blocks(section: str) -> list[str]:
    """The ```sh blocks of one ``## section`` of the doc, continuation lines joined."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"```sh\n(.*?)```", body, flags=re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def grpcurl_commands() -> list[list[str]]:
    commands = []
    for block in shell_blocks("grpcurl, with reflection"):
        for line in block.splitlines():
            if line.startswith("grpcurl "):
                commands.append(shlex.split(line))
    return commands


class Grpcurl:
    """What grpcurl does with the flags the doc uses, on a channel to one node."""

    def __init__(self, node: Node) -> None:
        files = node.certificate_files()
        assert files is not None
        credentials = grpc.ssl_channel_credentials(root_certificates=files[1].read_bytes())
        self.channels = {
            port: grpc.secure_channel(f"{node.host}:{port}", credentials) for port in (9925, 9926)
        }

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def run(self, argv: list[str]) -> Any:
        flags: dict[str, str] = {}
        positional: list[str] = []
        words = iter(argv[1:])
        for word in words:
            if word in ("-cacert", "-H", "-d"):
                flags[word] = next(words)
            else:
                positional.append(word)
        assert flags.get("-cacert") == "ca.crt", argv
        address, verb, *rest = positional
        channel = self.channels[int(address.rsplit(":", 1)[1])]
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        if verb == "list":
            return set(database.get_services())
        if verb == "describe":  # a service or a message, as the server resolves them
            database.FindFileContainingSymbol(rest[0])
            return rest[0]
        service, method_name = verb.split("/")
        method = pool.FindServiceByName(service).methods_by_name[method_name]
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(flags.get("-d", "{}"), request_class())
        metadata = basic_metadata("admin", PASSWORD) if flags.get("-H") == "$AUTH" else ()
        path = f"/{service}/{method_name}"
        if method.server_streaming:
            call: Any = channel.unary_stream(
                path, lambda m: m.SerializeToString(), reply_class.FromString
            )
            return list(call(request, metadata=metadata, timeout=30))
        call = channel.unary_unary(path, lambda m: m.SerializeToString(), reply_class.FromString)
        return call(request, metadata=metadata, timeout=30)


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    return make_node(
        services=("storage", "replicator", "admin"), config={"replication": {"securePort": 9933}}
    )


def test_grpcurl_commands_run_as_written(node: Node) -> None:
    commands = grpcurl_commands()
    assert len(commands) >= 10
    grpcurl = Grpcurl(node)
    try:
        results = {" ".join(argv[-2:]): grpcurl.run(argv) for argv in commands}
    finally:
        grpcurl.close()
    listed = results["127.0.0.1:9926 list"]
    assert {"shoal.storage.v1.StorageService", "grpc.health.v1.Health"} <= listed
    assert results["127.0.0.1:9926 grpc.health.v1.Health/Check"].status == 1  # SERVING
    found = results["127.0.0.1:9926 shoal.storage.v1.StorageService/SearchByValue"]
    records = [orjson.loads(r) for chunk in found for r in chunk.records]
    assert records == [{"id": 1, "name": "Penny", "breed": "pug"}]
    by_id = results["127.0.0.1:9926 shoal.storage.v1.StorageService/SearchById"]
    assert [orjson.loads(r)["name"] for chunk in by_id for r in chunk.records] == ["Penny"]
    status = results["127.0.0.1:9925 shoal.admin.v1.AdminService/ClusterStatus"]
    assert status.node_name == node.name
    executed = results["127.0.0.1:9925 shoal.admin.v1.AdminService/Execute"]
    assert executed.code == 0 and "dev" in orjson.loads(executed.result)


def python_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("\n## Python") : text.index("\n## Go")]
    blocks: list[str] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_python_generation_and_example_work(node: Node, tmp_path: Path) -> None:
    (tmp_path / "protos").symlink_to(REPO / "protos")
    block = next(b for b in shell_blocks("Python") if "grpc_tools.protoc" in b)
    for line in block.splitlines():
        argv = shlex.split(line)
        if argv[:2] == ["mkdir", "-p"]:
            (tmp_path / argv[2]).mkdir(parents=True)
        elif argv[:3] == ["python", "-m", "grpc_tools.protoc"]:
            done = subprocess.run(
                [sys.executable, *argv[1:]],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
    # The example, with the generated modules only (not Shoal's gen/), against the node.
    files = node.certificate_files()
    assert files is not None
    (tmp_path / "ca.crt").write_bytes(files[1].read_bytes())
    script = f"password = {PASSWORD!r}\n" + python_block().replace(
        "127.0.0.1:9926", node.address_of("storage")
    )
    ran = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = ['gen']\n{script}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert orjson.loads(ran.stdout.strip().replace("'", '"')) == [
        {"id": 1, "name": "Penny", "breed": "pug"}
    ]
