"""Benchmarks behind `moshi-grpc bench`: each prints figures and, where a reference exists, the ratio."""
