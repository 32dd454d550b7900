"""recipes.generate --checkpoint: a Hugging Face folder in, text out, against transformers' greedy generate.

The models are random, small and irregular (6 heads sharing 3 or 2 K/V heads, both layer kinds out of
order, block_size 16 so prompts and generations end in partial blocks, DeepNorm factors != 1, init std
0.02, full rotary so that transformers and mx01 agree), saved with transformers' `save_pretrained`
beside a byte-level BPE tokenizer built here with the `tokenizers` library.  Greedy tokens must be
equal token for token (float32: logits agree to ~1e-6, far below the gaps between the top two).
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402

from mx01.data.tokenizers import HFTokenizer  # noqa: E402
from recipes import generate  # noqa: E402

NEW = 24
MAX_LEN = 64  # max_position_embeddings -> model.max_seq_len
SPECIALS = ["<s>", "</s>", "<pad>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "lightning attention with a mixture of experts"]
TEMPLATE = ("{% for message in messages %}{{ bos_token + message['role'] + '\\n' + message['content'] + eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
# 26 and 3 tokens (checked below): a left-padded batch; the longer one spans a block and ends mid-block.
PROMPTS = ["the quick brown fox jumps over the lazy dog and then", "a fox"]


def _hf_config(**kw):
  base = dict(
      vocab_size=300, hidden_size=44, intermediate_size=36, num_hidden_layers=5, num_attention_heads=6,
      num_key_value_heads=3, head_dim=10, num_local_experts=5, num_experts_per_tok=2, block_size=16,
      layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention", "linear_attention"],
      full_attn_alpha_factor=1.7, full_attn_beta_factor=1.1, linear_attn_alpha_factor=1.3,
      linear_attn_beta_factor=0.9, mlp_alpha_factor=1.5, mlp_beta_factor=0.8, initializer_range=0.02,
      max_position_embeddings=MAX_LEN)
  base.update(kw)
  cfg = transformers.MiniMaxConfig(**base)
  cfg._attn_implementation = "eager"
  cfg._experts_implementation = "eager"  # torch's grouped GEMM wants 16-byte strides, which these shapes lack
  return cfg


def _write_tokenizer(folder, eos_ids=None):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 20, trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(dict(
      bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=TEMPLATE,
      tokenizer_class="PreTrainedTokenizerFast")))
  if eos_ids is not None:
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
  return tok


def _folder(tmp_path_factory, name, seed, **kw):
  torch.manual_seed(seed)
  hf = transformers.MiniMaxForCausalLM(_hf_config(**kw)).eval()
  folder = tmp_path_factory.mktemp(name)
  hf.save_pretrained(folder)
  _write_tokenizer(folder, eos_ids=[])  # no eos: every row runs to the length (a test below sets one)
  return hf, folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return _folder(tmp_path_factory, "ckpt", 0)


def _hf_greedy(hf, ids, new=NEW, eos=None):
  """transformers' greedy continuation of one unpadded prompt."""
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
  return out[0, len(ids):].tolist()


def _run(capsys, folder, *flags, prompts=PROMPTS, new=NEW):
  rc = generate.main(["--checkpoint", str(folder), "--prompt", *prompts, "--max-new-tokens", str(new), "--json",
                      *flags])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert f"loading {folder}: " in err and "(100%)" in err  # the load's progress ends with its last line
  return json.loads(out)


def test_greedy_batch_matches_transformers_token_for_token(checkpoint, capsys):
  hf, folder = checkpoint
  tok = HFTokenizer(str(folder))
  ids = [tok.encode(p).tolist() for p in PROMPTS]
  assert [len(i) for i in ids] == [26, 3]
  got = _run(capsys, folder)
  assert got["prompt_token_ids"] == ids and got["weights"] == "float32" and got["devices"] == 1
  want = [_hf_greedy(hf, i) for i in ids]
  assert got["token_ids"] == want
  assert got["finish_reasons"] == ["length", "length"]
  # Text out through the folder's tokenizer (transformers' own tokenizer decodes the same ids alike).
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert got["completions"] == [ref_tok.decode(w) for w in want]

  # transformers' batched generate, given the left-padded batch and its attention_mask: its prefill honours
  # the mask (first tokens agree with the unpadded runs), but later tokens of the padded row drift from its
  # own unpadded run (seen with transformers 5.24), so the unpadded runs are the reference above.
  width = max(map(len, ids))
  batch = torch.tensor([[0] * (width - len(i)) + i for i in ids])
  mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
  with torch.no_grad():
    padded = hf.generate(input_ids=batch, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                         eos_token_id=None, pad_token_id=0)[:, width:].tolist()
  assert padded[0] == want[0]  # the row without padding
  assert [row[0] for row in padded] == [w[0] for w in want]


def test_eos_from_the_checkpoint_stops_each_row(checkpoint, capsys, tmp_path):
  hf, folder = checkpoint
  import shutil
  copy = tmp_path / "ckpt"
  shutil.copytree(folder, copy)
  tok = HFTokenizer(str(folder))
  ids = [tok.encode(p).tolist() for p in PROMPTS]
  free = [_hf_greedy(hf, i) for i in ids]
  eos = free[0][5]  # row 0 meets it at step 5 at the latest; row 1 maybe never
  (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
  got = _run(capsys, copy)
  for row, reason, text, want_free, i in zip(got["token_ids"], got["finish_reasons"], got["completions"], free, ids):
    assert row == _hf_greedy(hf, i, eos=[eos])[:len(row)]
    if eos in want_free:
      stop = want_free.index(eos)
      assert row == want_free[:stop + 1] and reason == "stop" and text == tok.decode(want_free[:stop])
    else:
      assert row == want_free and reason == "length"
  assert got["finish_reasons"][0] == "stop"


def test_chat_template_wraps_each_prompt(checkpoint, capsys):
  hf, folder = checkpoint
  tok = HFTokenizer(str(folder))
  got = _run(capsys, folder, "--chat", prompts=["a fox"], new=4)
  want_ids = tok.encode_chat([{"role": "user", "content": "a fox"}]).tolist()
  ref = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert want_ids == ref.encode(ref.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=False,
                                                        add_generation_prompt=True), add_special_tokens=False)
  assert got["prompt_token_ids"] == [want_ids]
  assert got["token_ids"] == [_hf_greedy(hf, want_ids, new=4)]


def test_prompt_at_the_maximum_length_gets_one_token(checkpoint, capsys):
  hf, folder = checkpoint
  prompt = "7" * MAX_LEN  # digits are not in the tokenizer's corpus: one byte token each
  got = _run(capsys, folder, prompts=[prompt], new=1)
  assert len(got["prompt_token_ids"][0]) == MAX_LEN
  want = [_hf_greedy(hf, got["prompt_token_ids"][0], new=1)]
  assert got["token_ids"] == want
  # Prefilled in chunks that do not divide it: the chunk padding takes no cache positions.
  assert _run(capsys, folder, "--prefill-chunk", "48", prompts=[prompt], new=1)["token_ids"] == want
  rc = generate.main(["--checkpoint", str(folder), "--prompt", prompt, "--max-new-tokens", "2"])
  out, err = capsys.readouterr()
  assert rc == 2 and len(err.strip().splitlines()) == 1 and "max_seq_len=64" in err


@pytest.mark.slow
def test_sharded_generation_equals_one_device(tmp_path_factory, capsys, monkeypatch):
  """tensor=2, expert=2 on the emulated host devices: the same tokens as one device (and as transformers)."""
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 host devices (tests/conftest.py sets 8)")
  hf, folder = _folder(tmp_path_factory, "ckpt4", 2, num_key_value_heads=2, num_local_experts=4)
  one = _run(capsys, folder)
  seen = {}

  def spy(params, prompts, **kw):
    seen.update(params=params, mesh=kw["mesh"])
    return real(params, prompts, **kw)

  real = generate.generate
  monkeypatch.setattr(generate, "generate", spy)
  sharded = _run(capsys, folder, "--config.parallel.tensor=2", "--config.parallel.expert=2")
  monkeypatch.undo()
  assert one["devices"] == 1 and sharded["devices"] == 2
  # Each device holds half the experts and half the heads' projections.
  layer = seen["params"]["layers_0"]
  assert {s.data.shape for s in layer["moe"]["wo"].addressable_shards} == {(2, 36, 44)}
  assert {s.data.shape for s in layer["attn"]["out_proj"]["kernel"].addressable_shards} == {(30, 44)}
  assert sharded["token_ids"] == one["token_ids"] == [_hf_greedy(hf, i) for i in one["prompt_token_ids"]]
  w8_one = _run(capsys, folder, "--w8a16", new=8)
  w8_sharded = _run(capsys, folder, "--w8a16", "--config.parallel.tensor=2", "--config.parallel.expert=2", new=8)
  assert w8_one["weights"] == w8_sharded["weights"] == "w8a16"
  assert w8_sharded["token_ids"] == w8_one["token_ids"]


@pytest.mark.parametrize("flags,named", [
    (["--checkpoint", "/nonexistent/folder"], "--checkpoint"),
    (["--random-init", "--chat"], "--chat"),
    (["--checkpoint", "CKPT", "--stop", "quick brown"], "--stop"),
    (["--checkpoint", "CKPT", "--config.parallel.tensor=4"], "parallel"),
])
def test_bad_input_is_one_line(checkpoint, capsys, flags, named):
  flags = [str(checkpoint[1]) if f == "CKPT" else f for f in flags]
  rc = generate.main(flags + ["--prompt", "a fox", "--max-new-tokens", "2"])
  out, err = capsys.readouterr()
  assert rc == 2 and out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and named in lines[0], err


def test_load_progress_lines_are_throttled_and_end_at_the_total(monkeypatch):
  clock = iter([0.0, 1.0, 2.0, 12.0, 13.0])
  monkeypatch.setattr(generate.time, "monotonic", lambda: next(clock))
  lines = []
  progress = generate.load_progress("ck", every_s=10.0, log=lines.append)  # starts at t = 0
  progress("a", 1e9, 4e9)   # t = 1: within 10 s of the start, quiet
  progress("b", 2e9, 4e9)   # t = 2: quiet
  progress("c", 3e9, 4e9)   # t = 12: a line, with the rate and ETA
  progress("d", 4e9, 4e9)   # t = 13: the end always prints
  assert lines == ["loading ck: 3.00/4.00 GB (75%), 0.25 GB/s, ETA 4 s", "loading ck: 4.00/4.00 GB (100%), 0.31 GB/s"]
