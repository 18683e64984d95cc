"""The committed generated code matches the .proto sources and imports cleanly."""

from __future__ import annotations

import re
import subprocess
import sys

from zerotrain.service.api import generate


def test_committed_code_matches_protos():
    drifted = generate.drifted_files()
    assert drifted == [], f"regenerate with `make generate`; out of date: {drifted}"


def test_drift_is_detected(tmp_path):
    generate.generate(tmp_path)
    package = tmp_path / "zerotrain" / "service" / "api" / "zerotrain" / "v1"
    (package / "job_service_pb2.py").write_text("# tampered\n")
    (package / "job_service_pb2_grpc.py").unlink()
    assert generate.drifted_files(package) == ["job_service_pb2.py", "job_service_pb2_grpc.py"]


def test_generator_version_stamps_are_not_drift(tmp_path):
    generate.generate(tmp_path)
    package = tmp_path / "zerotrain" / "service" / "api" / "zerotrain" / "v1"
    pb2 = package / "job_service_pb2.py"
    text = pb2.read_text()
    stamped = re.sub(r"# Protobuf Python Version: .*", "# Protobuf Python Version: 99.0.0", text)
    assert stamped != text
    pb2.write_text(stamped)
    assert generate.drifted_files(package) == []
    pb2.write_text(stamped.replace("zerotrain.v1", "zerotrain.v2"))
    assert generate.drifted_files(package) == ["job_service_pb2.py"]


def test_generated_imports_are_package_absolute():
    # A fresh interpreter importing the installed package (-P: not the checkout's root).
    code = (
        "from zerotrain.service.api.zerotrain.v1 import job_service_pb2 as pb, job_service_pb2_grpc as rpc\n"
        "assert pb.DESCRIPTOR.package == 'zerotrain.v1'\n"
        "names = [m.name for m in pb.DESCRIPTOR.services_by_name['JobService'].methods]\n"
        "print(','.join(names))\n"
        "assert hasattr(rpc, 'JobServiceStub')\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == [
        "SubmitJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
        "StreamLogs",
        "ReportMetrics",
    ]


def test_proto_documents_batch_size_as_the_runtime_uses_it():
    """``TrainingSpec.batch_size`` is per worker (service/spec.py and the runtime), not global."""
    proto = (generate.PROTO_DIR / "job_service.proto").read_text()
    block = proto[proto.index("message TrainingSpec") :]
    comment = block[: block.index("optional int32 batch_size")].rsplit(";", 1)[-1]
    assert "per worker" in comment and "split across workers" not in comment, comment
