"""`tessera doctor` runs in-process, exits 0 and says what each finding means."""

import json
import socket

from launch.cli import main
from launch.doctor import check_ray


def test_doctor_text_and_json(capsys):
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    for name in ("torch", "GPUs", "NCCL", "gloo", "xformers", "diffusers", "Ray", "cores", "memory"):
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert "->" in text
    assert main(["doctor", "--json"]) == 0
    found = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert found["gloo"]["details"]["available"] is True
    assert found["cores"]["details"]["cores"] >= 1


def test_ray_address_reachability_without_starting_ray():
    with socket.socket() as server:  # something listening stands in for a cluster's GCS port
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert check_ray({"RAY_ADDRESS": f"127.0.0.1:{port}"}).details["reachable"] is True
    assert check_ray({"RAY_ADDRESS": f"127.0.0.1:{port}"}).details["reachable"] is False
    assert check_ray({}).details["address"] is None
