"""Batched generation: chunked prefill, then token-by-token decode, both `mx01.model.apply` with a cache.

    result = generate(params, [[1, 2, 3], [4, 5]], config=cfg, max_new_tokens=32,
                      sampling=SamplingConfig(temperature=0.8, top_p=0.95), rng=jax.random.key(0))
    result.tokens            # generated ids per prompt (up to and including a stop token)
    result.decode_tokens_per_s

Prompts of different lengths share a batch LEFT-padded (right-aligned); the
padding is masked (`token_mask`), so every row computes what an unpadded
forward over its own tokens computes, and the KV cache holds each row's
tokens from position 0 (padding takes no cache columns).  A prompt longer
than `prefill_chunk` is prefilled in chunks of that many columns (the padded
prompt is rounded up to a multiple of the chunk so one compiled chunk function
serves all of them): lightning states are carried from chunk to chunk and the
KV cache is filled as it goes.
Each decode step is one call of a jitted pure function
(params, cache, tokens, done, key) -> (next tokens, done, cache, logits).
Compilation happens before the timers start and is reported separately.

Sharded generation (`mesh=`, a `mx01.parallel.mesh.ParallelMesh`): the params are already placed on
the mesh (by the rules table, `rules.param_shardings`); the cache is split over heads like them
(`cache.cache_shardings`) and tokens, logits and keys are replicated.  The prefill and decode functions
are jitted with these shardings pinned and jax's SPMD partitioner (GSPMD) splits the computation, so
a model larger than one device serves with the same `model.apply` as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mx01 import model as model_lib
from mx01.config import SOFTMAX, ModelConfig
from mx01.inference import cache as cache_lib
from mx01.inference.sampling import SamplingConfig, sample_tokens
from mx01.ops import ModelOps


class PromptTooLongError(ValueError):
  """A prompt (plus the tokens to generate) does not fit the cache or the model's maximum length."""


@dataclasses.dataclass
class GenerationResult:
  tokens: list  # per prompt: generated ids (a stop token, if hit, is the last one)
  finish_reasons: list  # per prompt: "stop" or "length"
  prompt_lengths: list
  padded_prompt_len: int
  cache_len: Optional[int]  # KV-cache columns (None without softmax layers)
  compile_s: float
  prefill_s: float
  decode_s: float
  decode_steps: int
  prefill_tokens_per_s: float  # real (unpadded) prompt tokens / prefill seconds
  decode_tokens_per_s: float  # batch * decode steps / decode seconds
  logits: Optional[np.ndarray] = None  # [batch, steps, vocab]: the logits each token was drawn from


def plan_lengths(prompt_len: int, max_new_tokens: int, *, config: ModelConfig, prefill_chunk: int,
                 max_cache_len: Optional[int] = None) -> tuple[int, int, int]:
  """Checks the sizes; returns (padded prompt columns, prefill chunk, cache positions).

  The last new token is sampled, never fed back: a prompt of exactly
  max_seq_len tokens can still get one.  Raises PromptTooLongError naming the sizes and the fix.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  needed = prompt_len + max_new_tokens - 1  # positions the model sees
  if needed > config.max_seq_len:
    raise PromptTooLongError(
        f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} needs {needed} positions (the last "
        f"new token is never fed back), more than model.max_seq_len={config.max_seq_len}; shorten the prompt, "
        f"lower max_new_tokens, or raise model.max_seq_len (e.g. override model.max_seq_len={needed})")
  chunk = prompt_len if prompt_len <= prefill_chunk else prefill_chunk
  padded = -(-prompt_len // chunk) * chunk
  if max_cache_len is None:
    return padded, chunk, needed
  if prompt_len > max_cache_len:
    raise PromptTooLongError(
        f"prompt of {prompt_len} tokens is longer than the KV cache of max_cache_len={max_cache_len} positions; "
        f"raise max_cache_len to at least {needed} (prompt + max_new_tokens - 1), or shorten the prompt")
  if needed > max_cache_len:
    raise PromptTooLongError(
        f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} needs {needed} cache positions but "
        f"max_cache_len={max_cache_len}; raise max_cache_len to {needed} or lower max_new_tokens to "
        f"{max_cache_len - prompt_len + 1}")
  return padded, chunk, needed


def forward(params: dict, tokens, cache: dict, token_mask=None, *, config: ModelConfig,
            ops: Optional[ModelOps] = None, kv_block: int = 4096):
  """New tokens [b, c] through the model with the cache -> (last column's logits [b, vocab] float32, new cache)."""
  logits, aux = model_lib.apply(params, tokens, config=config, ops=ops, cache=cache, token_mask=token_mask,
                                last_only=True, kv_block=kv_block)
  return logits[:, 0], aux["cache"]


def make_decode_step(config: ModelConfig, sampling: SamplingConfig, *, stop_tokens: Sequence[int] = (),
                     pad_id: int = 0, ops: Optional[ModelOps] = None, kv_block: int = 4096):
  """A pure decode step (jit it): (params, cache, tokens [b], done [b], key) -> (next [b], done, cache, logits [b, V]).

  Rows already done emit `pad_id`; a row becomes done when it emits a stop token.
  """
  stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)

  def step(params, cache, tokens, done, key):
    logits, cache = forward(params, tokens[:, None], cache, config=config, ops=ops, kv_block=kv_block)
    nxt = jnp.where(done, pad_id, sample_tokens(logits, key, sampling))
    done = done | jnp.isin(nxt, stop)
    return nxt, done, cache, logits

  return step


def generate(params: dict, prompts: Sequence[Sequence[int]], *, config: ModelConfig, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), rng: Optional[jax.Array] = None,
             stop_tokens: Sequence[int] = (), prefill_chunk: int = 2048, max_cache_len: Optional[int] = None,
             pad_id: int = 0, ops: Optional[ModelOps] = None, kv_block: int = 4096, return_logits: bool = False,
             sync_every: int = 8, mesh=None) -> GenerationResult:
  """Generates up to `max_new_tokens` tokens after each prompt (see the module docstring).

  params: float params or W8A16 params from `quantize.quantize_params`.
  rng: a PRNG key (required unless sampling is greedy); step i uses fold_in(rng, i).
  sync_every: decode steps between checks whether every row has stopped.
  mesh: a ParallelMesh the params are placed on (see the module docstring); None: one device.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if not sampling.greedy and rng is None:
    raise ValueError("sampling with temperature > 0 needs an explicit PRNG key: pass rng=jax.random.key(seed)")
  rng = jax.random.key(0) if rng is None else rng
  b = len(prompts)
  lengths = [len(p) for p in prompts]
  padded, chunk, cache_len = plan_lengths(max(lengths), max_new_tokens, config=config, prefill_chunk=prefill_chunk,
                                          max_cache_len=max_cache_len)
  tokens = np.full((b, padded), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, padded - len(p):] = np.asarray(p, np.int32)
  mask = np.arange(padded)[None, :] >= np.asarray([padded - n for n in lengths])[:, None]  # [b, padded]
  cache = cache_lib.init_cache(config, b, cache_len)

  prefill_pin = step_pin = first_pin = {}  # one device: jax places everything
  if mesh is not None:
    rep = mesh.sharding()
    cache_sh = cache_lib.cache_shardings(cache, mesh)
    cache = jax.device_put(cache, cache_sh)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    prefill_pin = dict(in_shardings=(param_sh, rep, cache_sh, rep), out_shardings=(rep, cache_sh))
    step_pin = dict(in_shardings=(param_sh, cache_sh, rep, rep, rep), out_shardings=(rep, rep, cache_sh, rep))
    first_pin = dict(in_shardings=(rep, rep), out_shardings=rep)
  prefill_fn = jax.jit(functools.partial(forward, config=config, ops=ops, kv_block=kv_block), donate_argnums=(2,),
                       **prefill_pin)
  step_fn = jax.jit(make_decode_step(config, sampling, stop_tokens=stop_tokens, pad_id=pad_id, ops=ops,
                                     kv_block=kv_block), donate_argnums=(1,), **step_pin)
  first_fn = jax.jit(lambda logits, key: sample_tokens(logits, key, sampling), **first_pin)
  stop = np.asarray(list(stop_tokens), np.int32)

  # Compile ahead of time so the timers measure execution only.
  t0 = time.perf_counter()
  chunk_tokens = jnp.asarray(tokens[:, :chunk])
  prefill_c = prefill_fn.lower(params, chunk_tokens, cache, jnp.asarray(mask[:, :chunk])).compile()
  done0 = jnp.zeros((b,), bool)
  tok0 = jnp.zeros((b,), jnp.int32)
  step_c = step_fn.lower(params, cache, tok0, done0, rng).compile() if max_new_tokens > 1 else None
  first_c = first_fn.lower(jnp.zeros((b, config.vocab_size), jnp.float32), rng).compile()
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  for c0 in range(0, padded, chunk):
    logits, cache = prefill_c(params, jnp.asarray(tokens[:, c0:c0 + chunk]), cache, jnp.asarray(mask[:, c0:c0 + chunk]))
  logits.block_until_ready()
  prefill_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  nxt = first_c(logits, jax.random.fold_in(rng, 0))
  done = jnp.isin(nxt, jnp.asarray(stop if stop.size else np.asarray([-1], np.int32)))
  out_tokens, out_logits = [nxt], [logits]
  steps = 0
  for i in range(1, max_new_tokens):
    nxt, done, cache, logits = step_c(params, cache, nxt, done, jax.random.fold_in(rng, i))
    out_tokens.append(nxt)
    if return_logits:
      out_logits.append(logits)
    steps += 1
    if i % sync_every == 0 and bool(jnp.all(done)):
      break
  generated = np.asarray(jnp.stack(out_tokens, axis=1))  # [b, n]
  decode_s = time.perf_counter() - t0

  result_tokens, reasons = [], []
  for row in generated:
    hits = np.nonzero(np.isin(row, stop))[0] if stop.size else []
    if len(hits):
      result_tokens.append(row[:hits[0] + 1].tolist())
      reasons.append("stop")
    else:
      result_tokens.append(row.tolist())
      reasons.append("length")
  has_kv = SOFTMAX in config.resolved_layer_types
  return GenerationResult(
      tokens=result_tokens, finish_reasons=reasons, prompt_lengths=lengths, padded_prompt_len=padded,
      cache_len=cache_len if has_kv else None, compile_s=compile_s, prefill_s=prefill_s, decode_s=decode_s,
      decode_steps=steps, prefill_tokens_per_s=sum(lengths) / max(prefill_s, 1e-9),
      decode_tokens_per_s=b * steps / max(decode_s, 1e-9),
      logits=np.asarray(jnp.stack(out_logits, axis=1)) if return_logits else None)
