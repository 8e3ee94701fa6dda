"""Benchmarks of resnet_fused: op level (bench_ops), model level (bench_model) and the `make bench` driver (main)."""
