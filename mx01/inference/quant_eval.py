"""Measures the W8A16 error on a small trained model.

    python -m mx01.inference.quant_eval --steps 100 [--preset tiny] [--out w8a16.json]

Trains the preset (byte tokens) for `--steps` steps with
`mx01.training.make_train_step` and AdamW on a byte corpus made of Python
standard-library sources (deterministic, no download), then evaluates held-out
windows three ways through `mx01.model.apply`: float32, bf16 (weights and
activations) and W8A16 (int8 attention/expert weights, bf16 activations).
Reports, against float32 and against bf16: the relative L2 error of the
logits, the max |logit difference|, the mean KL divergence of the next-token
distributions, top-1 agreement, and each variant's cross-entropy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mx01 import model as model_lib
from mx01 import presets, training
from mx01.inference import quantize


def stdlib_corpus(max_bytes: int = 4_000_000) -> np.ndarray:
  """Bytes of Python standard-library sources, in a fixed order: uint8 [n]."""
  import email
  import json as json_mod
  import logging
  import unittest
  chunks, total = [], 0
  for pkg in (json_mod, logging, email, unittest):
    root = os.path.dirname(pkg.__file__)
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
      dirnames.sort()
      for name in sorted(filenames):
        if name.endswith(".py"):
          with open(os.path.join(dirpath, name), "rb") as f:
            data = f.read()
          chunks.append(data)
          total += len(data)
          if total >= max_bytes:
            return np.frombuffer(b"".join(chunks), np.uint8)
  return np.frombuffer(b"".join(chunks), np.uint8)


def windows(corpus: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
  starts = rng.integers(0, len(corpus) - length, size=batch)
  return np.stack([corpus[s:s + length] for s in starts]).astype(np.int32)


def train(config, corpus: np.ndarray, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int = 0):
  params = model_lib.init(config, jax.random.key(seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr * 0.1)
  optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1)
  opt_state = optimizer.init(params)
  step_fn = jax.jit(training.make_train_step(config, None, optimizer))
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  for step in range(steps):
    tokens = windows(corpus, rng, batch_size, seq_len + 1)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(jnp.asarray(tokens))}
    params, opt_state, metrics = step_fn(params, opt_state, batch)
    if step % 25 == 0 or step == steps - 1:
      print(f"step {step:4d} loss {float(metrics['loss']):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
  return params, float(metrics["loss"])


def compare(params, config, tokens: np.ndarray) -> dict:
  """Logits of fp32 / bf16 / W8A16 on tokens [b, t + 1]; returns the error metrics."""
  inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])

  cfg32 = dataclasses.replace(config, compute_dtype="float32")
  cfg16 = dataclasses.replace(config, compute_dtype="bfloat16")

  def logits_of(p, cfg):
    return jax.jit(lambda p: model_lib.apply(p, inputs, config=cfg)[0])(p)

  variants = {
      "fp32": logits_of(params, cfg32),
      "bf16": logits_of(quantize.cast_floats(params, jnp.bfloat16), cfg16),
      "w8a16": logits_of(quantize.cast_floats(quantize.quantize_params(params), jnp.bfloat16), cfg16),
  }

  def ce(lg):
    logp = jax.nn.log_softmax(lg, -1)
    return float(-jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)))

  def errors(a, ref):
    lp_a, lp_r = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(ref, -1)
    return {
        "rel_l2": float(jnp.linalg.norm(a - ref) / jnp.linalg.norm(ref)),
        "max_abs": float(jnp.max(jnp.abs(a - ref))),
        "mean_kl": float(jnp.mean(jnp.sum(jnp.exp(lp_r) * (lp_r - lp_a), -1))),
        "top1_agree": float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(ref, -1))),
    }

  return {
      "cross_entropy": {k: ce(v) for k, v in variants.items()},
      "bf16_vs_fp32": errors(variants["bf16"], variants["fp32"]),
      "w8a16_vs_fp32": errors(variants["w8a16"], variants["fp32"]),
      "w8a16_vs_bf16": errors(variants["w8a16"], variants["bf16"]),
      "eval_tokens": int(inputs.size),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--eval-batch", type=int, default=8)
  ap.add_argument("--out", default=None, help="write the metrics as JSON here")
  args = ap.parse_args(argv)
  config = presets.get_preset(args.preset).model
  corpus = stdlib_corpus()
  split = int(len(corpus) * 0.9)
  params, final_loss = train(config, corpus[:split], steps=args.steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, lr=args.lr)
  eval_tokens = windows(corpus[split:], np.random.default_rng(123), args.eval_batch, args.seq_len + 1)
  metrics = compare(params, config, eval_tokens)
  q = quantize.quantize_params(params)
  metrics.update(preset=args.preset, steps=args.steps, final_train_loss=final_loss,
                 quantizable_bytes_bf16=quantize.param_bytes(quantize.cast_floats(params, jnp.bfloat16),
                                                             only_quantizable=True),
                 quantizable_bytes_w8=quantize.param_bytes(q, only_quantizable=True),
                 total_bytes_bf16=quantize.param_bytes(quantize.cast_floats(params, jnp.bfloat16)),
                 total_bytes_w8a16=quantize.param_bytes(quantize.cast_floats(q, jnp.bfloat16)))
  text = json.dumps(metrics, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return metrics


if __name__ == "__main__":
  sys.exit(main() and 0)
