"""Scaling: FLOP accounting and compute-optimal scaling-law fits.

* `scaling.flops`   - the FLOP model of mx01 (parameters, FLOPs per token, 6ND, MFU).
* `scaling.measure` - measured FLOPs of JAX functions (jaxpr matmul count, XLA cost analysis).
* `scaling.fit`     - Chinchilla approaches 1-3, L(C) per architecture, crossovers, bootstrap intervals.
* `scaling.data`    - the public Chinchilla runs and sweep CSV readers.
* `scaling.corpus`  - the study's corpus: installed Python sources, deduplicated, held out by package.
* `scaling.isoflop` - the IsoFLOP plan of softmax / lightning / hybrid runs (`recipes.sweep --plan isoflop`).
* `scaling.compare` - per-kind fits with residual-bootstrap intervals, the paper's laws, verdicts per claim.
"""
