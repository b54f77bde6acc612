"""Throughput and overhead measurements (not timed tests): `advmend bench`."""
