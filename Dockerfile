# zerotrain: the gRPC service, and the Ray head/worker image (same code on every node).
#
#   docker build -t zerotrain .                                   # CPU torch (default)
#   docker build -t zerotrain:cuda --build-arg TORCH_VARIANT=cu126 .   # CUDA torch
#
# torch's version is the pin in constraints.txt; TORCH_VARIANT only picks the
# wheel index (cpu, cu126, ...). The DeepSpeed engine (optional) needs a derived
# image with `pip install .[deepspeed]` and a C++ toolchain. See deploy/README.md.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY constraints.txt pyproject.toml setup.py README.md ./
COPY optim ./optim
COPY service ./service
COPY protos ./protos
# torch first, from the variant's index, at the constraints pin; then the project.
RUN pip install --no-cache-dir --constraint constraints.txt \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        --extra-index-url https://pypi.org/simple torch \
    && pip install --no-cache-dir --constraint constraints.txt .

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="zerotrain" \
      org.opencontainers.image.description="Distributed training service: ZeRO-sharded Adamax/Nadam on Ray, driven over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 zerotrain \
    && useradd --system --uid 10001 --gid zerotrain --create-home --home-dir /home/zerotrain zerotrain \
    && mkdir -p /data \
    && chown zerotrain:zerotrain /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ZEROTRAIN_HEALTH_ADDRESS=127.0.0.1:50052
WORKDIR /home/zerotrain
USER 10001:10001
VOLUME ["/data"]
# Mount the API tokens file at /etc/zerotrain/tokens.yaml (format: service/auth.py).
# gRPC API, health port (plaintext grpc.health.v1 for probes, outside the API's budget),
# Prometheus /metrics
EXPOSE 50051 50052 9464
HEALTHCHECK --interval=15s --timeout=6s --start-period=60s --retries=3 \
    CMD ["python", "-m", "zerotrain.service.health", "--timeout", "5"]
ENTRYPOINT ["python", "-m", "zerotrain.service"]
CMD ["serve", "--address=0.0.0.0:50051", "--health-port=50052", "--metrics-port=9464", \
     "--data-dir=/data", "--tokens-file=/etc/zerotrain/tokens.yaml"]
