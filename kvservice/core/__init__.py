"""Pure-Python memory-manager core: no torch, Ray or gRPC may be imported here."""
