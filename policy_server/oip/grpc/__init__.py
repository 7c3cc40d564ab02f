"""OIP over gRPC: the service `inference.GRPCInferenceService` (inference.proto) that
tritonclient.grpc and KServe's client call, unary and streaming.

`messages` turns the protocol's messages into the protocol-neutral values and back, `service`
answers the calls, `stream` runs one ModelStreamInfer call, `status` turns errors into gRPC
codes, `server` starts and stops it in the app's lifespan. `inference_pb2*.py` are generated
from inference.proto by `make proto`: not edited by hand.
"""
