"""`moshi-grpc gateway`: the public Converse API; routing, admission, budgets, failover."""
