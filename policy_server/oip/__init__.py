"""The Open Inference Protocol (KServe V2, the protocol of Triton and KServe), DESIGN.md section 12.

Protocol-neutral: `tensors` (datatypes, tensors and their codecs), `inference` (a request and its
answer as typed values), `models` (a policy seen as an OIP model: metadata, readiness, infer),
`errors`. The transports are `policy_server.http.oip_routes` (REST, JSON and the binary tensor
extension) and `policy_server.oip.grpc` (gRPC, unary and streaming).
"""
