"""Chat templates: a Hugging Face tokenizer's Jinja template -> the prompt text.

Rendered the way transformers' `apply_chat_template` renders it (a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, the loop-controls extension, a `tojson` that does not escape HTML, and
the `raise_exception` / `strftime_now` helpers), so the same template gives the same text.  Templates
come from checkpoints, i.e. untrusted: the sandbox is not optional.
"""

from __future__ import annotations

import datetime
import functools
import json


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  try:
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
  except ImportError as e:  # pragma: no cover - in requirements.txt
    raise ImportError("a chat template needs jinja2 (pip install 'jinja2>=3.1.6')") from e

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"chat template: Jinja syntax error at line {e.lineno}: {e.message}") from None


def render_chat_template(template: str, messages: list, *, add_generation_prompt: bool = True, tools=None,
                         documents=None, **kwargs) -> str:
  """messages [{"role": ..., "content": ...}] -> text; kwargs (bos_token, eos_token, ...) reach the template."""
  for m in messages:
    if not isinstance(m, dict) or "role" not in m:
      raise ValueError(f"chat messages must be dicts with a 'role' (and 'content'), got {m!r}")
  return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                   documents=documents, **kwargs)
