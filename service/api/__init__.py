"""Generated protobuf/gRPC code for the zerotrain API (``make generate``).

The ``.proto`` sources live in ``protos/zerotrain/v1``; the generated modules
are importable as ``zerotrain.service.api.zerotrain.v1.job_service_pb2`` and
``zerotrain.service.api.zerotrain.v1.job_service_pb2_grpc``.
"""
