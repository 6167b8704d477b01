"""The three deployables (installed as `moshi_grpc.services`): `codec`, `lm`, `gateway`,
their shared serving layer `common`, and `up`, which runs all three on loopback."""
