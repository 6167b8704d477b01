"""`moshi-grpc codec`: Mimi as a batched streaming gRPC service (Encode, Decode, Info)."""
