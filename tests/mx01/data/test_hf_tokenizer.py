"""Hugging Face tokenizer folders against transformers' AutoTokenizer (built locally, no network)."""

import json

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from mx01.data.tokenizers import HFTokenizer, TokenizerError, load_tokenizer  # noqa: E402

SPECIALS = ["<beginning_of_sentence>", "<end_of_sentence>", "<pad>", "<unk>", "<fim_prefix>"]
# The release's chat format, in the same spirit: role headers between special tokens.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'system ai_setting=assistant\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ bos_token + 'user name=user\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ bos_token + 'ai name=assistant\\n' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'ai name=assistant\\n' }}{% endif %}")
CORPUS = ["Lightning attention scales linearly with the sequence length.", "Mixture of experts: 32 experts, top 2.",
          "Ünïcode, 中文 and emoji 🚀 survive byte-level BPE.", "the quick brown fox jumps over the lazy dog " * 3]
TEXTS = ["<beginning_of_sentence>user name=user\nHello, wörld!<end_of_sentence>\n",
         "no specials here, 中文 🚀", "<pad><pad>x<fim_prefix>  two  spaces<end_of_sentence>"]
MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi 🚀"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2+2?"}]


def _trained():
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4, trainer)
  return tok


def _tokenizer_config(**kw):
  return dict(bos_token="<beginning_of_sentence>", eos_token="<end_of_sentence>", pad_token="<pad>", unk_token="<unk>",
              chat_template=TEMPLATE, model_max_length=1 << 20, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  tok = _trained()
  fast = tmp_path_factory.mktemp("fast")
  tok.save(str(fast / "tokenizer.json"))
  (fast / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer_class="PreTrainedTokenizerFast")))
  eos, pad = tok.token_to_id("<end_of_sentence>"), tok.token_to_id("<pad>")
  (fast / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, pad]}))
  gpt2 = tmp_path_factory.mktemp("gpt2")
  tok.model.save(str(gpt2))  # vocab.json + merges.txt
  added = {str(tok.token_to_id(s)): {"content": s, "special": True, "normalized": False, "lstrip": False,
                                     "rstrip": False, "single_word": False} for s in SPECIALS}
  (gpt2 / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(
      tokenizer_class="GPT2Tokenizer", added_tokens_decoder=added, add_prefix_space=False)))
  return {"tokenizer.json": fast, "vocab+merges": gpt2}


@pytest.mark.parametrize("kind", ["tokenizer.json", "vocab+merges"])
def test_ids_match_autotokenizer(folders, kind):
  ours = load_tokenizer(str(folders[kind]))
  ref = transformers.AutoTokenizer.from_pretrained(str(folders[kind]))
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == ref.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == text
  assert ours.encode(TEXTS[0])[0] == ours.bos_id == ref.bos_token_id  # a special token in the text is one id
  assert ours.vocab_size == len(ref)
  # The chat template renders and encodes as transformers' does.
  want = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert ours.apply_chat_template(MESSAGES) == want
  ref_ids = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
  ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
  assert ours.encode_chat(MESSAGES).tolist() == list(ref_ids)
  assert not ours.apply_chat_template(MESSAGES[:2], add_generation_prompt=False).endswith("assistant\n")


def test_eos_ids_from_generation_config_then_tokenizer_config(folders):
  fast = HFTokenizer(str(folders["tokenizer.json"]))
  eos, pad = fast.token_id("<end_of_sentence>"), fast.token_id("<pad>")
  assert fast.eos_ids == (eos, pad)  # generation_config.json lists both
  assert HFTokenizer(str(folders["vocab+merges"])).eos_ids == (eos,)  # tokenizer_config.json's eos_token
  assert fast.special_tokens["bos_token"] == "<beginning_of_sentence>"


def test_bad_files_give_one_line_errors(tmp_path, folders):
  (tmp_path / "tokenizer.json").write_text("{this is not a tokenizer")
  with pytest.raises(TokenizerError) as e:
    load_tokenizer(str(tmp_path))
  assert str(tmp_path / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(TokenizerError, match="no tokenizer.json, nor vocab.json"):
    load_tokenizer(str(empty))
  (empty / "tokenizer.json").write_bytes((folders["tokenizer.json"] / "tokenizer.json").read_bytes())
  (empty / "tokenizer_config.json").write_text("[1, 2")
  with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
    load_tokenizer(str(empty))
  (empty / "tokenizer_config.json").write_text("{}")
  with pytest.raises(TokenizerError, match="no chat template"):
    load_tokenizer(str(empty)).apply_chat_template(MESSAGES)
