"""A grpc.health.v1 probe: exit 0 when the service answers SERVING, 1 otherwise.

    python -m moshi_grpc.clients.health_probe --addr 127.0.0.1:50051 [--service NAME]

For container HEALTHCHECKs and docker-compose (Kubernetes uses its native gRPC probes). It
imports only grpc and the health stubs, so it starts fast enough to run every few seconds.
Health checks are exempt from the services' bearer-token auth, so no token is needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

OK, NOT_SERVING, UNREACHABLE = 0, 1, 2


def check(
    addr: str,
    service: str = "",
    timeout_s: float = 3.0,
    *,
    root_ca: bytes | None = None,
    tls: bool = False,
    server_name: str | None = None,
) -> tuple[int, str]:
    """(exit code, one-line reason) of one health Check against `addr`."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if tls or root_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_ca)
        channel = grpc.secure_channel(addr, creds, options=options)
    else:
        channel = grpc.insecure_channel(addr, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return UNREACHABLE, f"{addr}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    code = OK if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING
    return code, f"{addr} {service or '(server)'}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moshi_grpc.clients.health_probe",
        description="grpc.health.v1 Check: exit 0 if SERVING, 1 if not, 2 if unreachable.",
    )
    p.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the service")
    p.add_argument("--service", default="", help="service name to check ('' = whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--tls", action="store_true", help="TLS with the system root CAs")
    p.add_argument("--tls-ca", help="PEM root CA (implies --tls)")
    p.add_argument("--tls-server-name", help="expected name in the server certificate")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    root_ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    code, reason = check(
        args.addr,
        args.service,
        args.timeout,
        root_ca=root_ca,
        tls=args.tls,
        server_name=args.tls_server_name,
    )
    if not args.quiet:
        print(reason, file=sys.stdout if code == OK else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
