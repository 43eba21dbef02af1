"""Wire contracts: the .proto files, their generated stubs (regenerate with
scripts/gen_protos.py), and the one table mapping error statuses to gRPC and HTTP."""
