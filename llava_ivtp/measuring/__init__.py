"""Measuring: `flops` (`llava-ivtp flops`, counted on the real forward without weights), `analytic_flops` (the
closed-form counts) and `bench` (`llava-ivtp bench`, latency and memory of stock Llava against the pruning methods)."""
