"""Generated gRPC stubs for the kvservice.v1 wire API (python -m kvservice.protogen)."""
