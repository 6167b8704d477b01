"""`moshi-grpc lm`: the Moshi LM as a batched streaming gRPC service (Step, Info)."""
