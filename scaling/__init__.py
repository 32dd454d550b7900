"""Scaling: FLOP accounting and compute-optimal scaling-law fits.

* `scaling.flops`   - the FLOP model of mx01 (parameters, FLOPs per token, 6ND, MFU).
* `scaling.measure` - measured FLOPs of JAX functions (jaxpr matmul count, XLA cost analysis).
* `scaling.fit`     - Chinchilla approaches 1-3, L(C) per architecture, crossovers, bootstrap intervals.
* `scaling.data`    - the public Chinchilla runs and sweep CSV readers.
"""
