"""The edge gRPC protocol (``cmdfed_edge.proto``) and its generated Python code (committed;
tests/edge/test_service.py checks it matches the proto)."""
