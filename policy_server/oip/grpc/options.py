"""What the gRPC server is told (from Settings), apart from the server so that reading it does not import grpc."""

from dataclasses import dataclass


@dataclass(frozen=True)
class GrpcOptions:
    port: int
    shared_port: bool = False  # SO_REUSEPORT, for `serve --workers N`
    max_message_bytes: int = 1024 * 1024  # a request's size limit, as POLICY_SERVER_MAX_BODY_BYTES is REST's
