"""Concept encoding on the tiny model: hand-worked token ids and positions,
aligned slices against separate encodings and the released position rule,
templates, guides, batching, deduplication and truncation."""

import warnings

import jax
import numpy as np
import pytest

from scapre_jax import models
from scapre_jax import text
from scapre_jax import tiny

from scapre_jax import reference as ref

# The tiny vocabulary (tiny.py) is CLIP-ordered: 256 byte symbols, the same
# 256 with "</w>" (ids 256-511), 300 merges (512-811), then BOS and EOS. The
# byte symbols start with the printable ASCII "!".."~", so a one-letter word
# "x" is the single token "x</w>" with id 256 + ord("x") - ord("!").
BOS, EOS = 812, 813
SEQ = 77


def letter(ch: str) -> int:
  return 256 + ord(ch) - ord("!")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_text")
  return {v: models.load_model(tiny.write_tiny_model(root / v, variant=v))
          for v in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def model(tiny_models):
  return tiny_models["sd1"]


@pytest.fixture(scope="module")
def model64(tiny_models):
  """The sd1 model with a float64 text encoder: encodings from different
  programs (batch sizes) compared in float64 agree to ~1e-16, so these tests
  do not depend on how a CPU rounds float32 matrix products."""
  return models.load_model(tiny_models["sd1"].path, text_dtype="float64")


def encode_alone(model, prompt):
  return text.encode_prompts(model, [prompt])[0][0]


def assert_close64(got, want):
  """float64 encodings equal to 1e-10 of the largest value."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * float(np.abs(want).max()))


# -- tokenization, worked by hand ----------------------------------------------------


@pytest.mark.parametrize("variant,pad", [("sd1", EOS), ("sd2", 0)])
def test_hand_worked_tokens(tiny_models, variant, pad):
  tokenizer = tiny_models[variant].tokenizer
  assert tokenizer.model_max_length == SEQ
  assert tokenizer.convert_ids_to_tokens([BOS, EOS, letter("x")]) == [
      "<|startoftext|>", "<|endoftext|>", "x</w>"]
  ids, lengths = text.tokenize(tokenizer, ["", " ", "x z", "X  Z", "a b c d", "!"],
                               max_length=SEQ)
  head = lambda *tokens: list(tokens) + [pad] * (SEQ - len(tokens))
  expected = [
      head(BOS, EOS),  # "": n = 2, e0 is row 1 (the EOS)
      head(BOS, EOS),  # " ": the unconditional guide encodes like ""
      head(BOS, letter("x"), letter("z"), EOS),  # 2 tokens: n = 4, c = row 2
      head(BOS, letter("x"), letter("z"), EOS),  # lower-cased, spaces collapsed
      head(BOS, *map(letter, "abcd"), EOS),
      # "!" is "!</w>" = 256 for SD 1; SD 2's tokenizer keeps its pad token
      # "!" whole (special tokens are split out before BPE): id 0, still
      # counted by the attention mask.
      head(BOS, 256 if pad == EOS else 0, EOS),
  ]
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_array_equal(lengths, [2, 2, 4, 4, 6, 3])


def test_aligned_slices_match_the_released_rule():
  for n_old in range(3, SEQ + 1):
    for n_new in range(2, SEQ + 1):
      f_o, f_n, start_old, stop_old, start_new, stop_new = ref.released_token_positions(
          n_old, n_new, seq_len=SEQ)
      got = text.aligned_slices(n_old, n_new, seq_len=SEQ)
      assert got == (start_old, start_new, stop_old - start_old), (n_old, n_new)
      assert stop_new - start_new == got[2] == SEQ - max(f_o, f_n)
  # Hand-worked: "x z" (n = 4) against " " (n = 2), "y" (n = 3), "a b c d" (n = 6).
  assert text.aligned_slices(4, 2) == (2, 0, 75)
  assert text.aligned_slices(4, 3) == (2, 1, 75)
  assert text.aligned_slices(4, 6) == (2, 4, 73)
  with pytest.raises(ValueError, match=">= 2"):
    text.aligned_slices(1, 2)


# -- encoding ---------------------------------------------------------------------


def test_encode_prompts_shapes_and_separate_encoding(model, model64):
  prompts = ["x z", "", "van gogh", "a photo of a tench"]
  embeddings, lengths = text.encode_prompts(model, prompts)
  assert embeddings.shape == (4, SEQ, 32) and embeddings.dtype == np.float32
  # "van" and "gogh" are merges of the tiny BPE: van</w> + go + g + h</w>.
  np.testing.assert_array_equal(lengths[:3], [4, 2, 6])
  assert lengths[3] == len(model.tokenizer("a photo of a tench").input_ids)
  # A batch of one runs other matmul kernels, so the comparison is in float64.
  embeddings, lengths64 = text.encode_prompts(model64, prompts)
  np.testing.assert_array_equal(lengths64, lengths)
  for row, prompt in zip(embeddings, prompts):
    assert_close64(row, encode_alone(model64, prompt))
  # The same as the Flax encoder called directly, without attention mask.
  ids, _ = text.tokenize(model.tokenizer, prompts, max_length=SEQ)
  direct = np.asarray(model64.text_encoder(ids, params=model64.text_params)[0])
  assert_close64(embeddings, direct)


def test_batching_invariance_and_one_compilation(model, model64):
  prompts = [f"{a} {b}" for a in "abcdefg" for b in "xyz"]  # 21 distinct prompts
  before = text._run_encoder._cache_size()
  small, lengths_small = text.encode_prompts(model, prompts, batch_size=2)
  compiled = text._run_encoder._cache_size() - before
  assert compiled <= 1  # 11 batches of 2, one program
  large, lengths_large = text.encode_prompts(model, prompts, batch_size=64)
  np.testing.assert_array_equal(lengths_small, lengths_large)
  # Two batch sizes are two programs: compared in float64.
  assert_close64(text.encode_prompts(model64, prompts, batch_size=2)[0],
                 text.encode_prompts(model64, prompts, batch_size=64)[0])
  again = text._run_encoder._cache_size()
  reversed_, _ = text.encode_prompts(model, prompts[::-1], batch_size=64)
  assert text._run_encoder._cache_size() == again  # same shapes: no recompile
  # With one batch size, a prompt's embedding does not depend on its
  # batch-mates, bit for bit: a set encodes alike alone or in a sets file.
  np.testing.assert_array_equal(reversed_[::-1], large)
  subset, _ = text.encode_prompts(model, prompts[3:5], batch_size=64)
  np.testing.assert_array_equal(subset, large[3:5])
  with pytest.raises(ValueError, match="batch_size"):
    text.encode_prompts(model, prompts, batch_size=0)


def test_duplicates_are_encoded_once(model, monkeypatch):
  seen = []
  original = text.encode_ids

  def spy(model, ids, **kwargs):
    seen.append(ids.shape[0])
    return original(model, ids, **kwargs)

  monkeypatch.setattr(text, "encode_ids", spy)
  # "" and " " tokenize alike, so they count as one prompt.
  embeddings, lengths = text.encode_prompts(model, ["x", "y", "x", "", " ", "y"])
  assert seen == [3]
  np.testing.assert_array_equal(embeddings[0], embeddings[2])
  np.testing.assert_array_equal(embeddings[3], embeddings[4])
  np.testing.assert_array_equal(lengths, [3, 3, 3, 2, 2, 3])
  empty, _ = text.encode_prompts(model, [])
  assert empty.shape == (0, SEQ, 32)


def test_truncation_warns_once_naming_the_prompt(model):
  long = "w " + " ".join(["q"] * 100)  # 101 tokens + BOS + EOS
  with pytest.warns(UserWarning, match=r"1 prompt\(s\).*'w q q q.*\.\.\.' \(103 tokens\)") as record:
    _, lengths = text.encode_prompts(model, ["x", long, long])
  assert len([w for w in record if "truncated" in str(w.message)]) == 1
  assert list(lengths) == [3, SEQ, SEQ]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text.encode_prompts(model, [" ".join(["q"] * 75)])  # exactly 77 tokens: no warning
  # A truncated concept keeps its last kept token: c = row 75, L_j = 2.
  with pytest.warns(UserWarning, match="truncated"):
    inputs = text.build_concept_inputs(model, [long]).inputs
    (row, _), _ = text.encode_prompts(model, [long, " "])
  assert inputs.old_seqs.shape[1] == 2
  np.testing.assert_array_equal(np.asarray(inputs.concept_vecs[0]), row[75])
  np.testing.assert_array_equal(np.asarray(inputs.old_seqs[0]), row[75:])


# -- concept inputs -----------------------------------------------------------------


def _check_pair(inputs, j, old_full, new_full, n_old, n_new):
  """Row j of `inputs` against the released slices of full sequences."""
  _, _, start_old, stop_old, start_new, stop_new = ref.released_token_positions(
      int(n_old), int(n_new), seq_len=SEQ)
  length = stop_old - start_old
  mask = np.asarray(inputs.seq_mask[j])
  assert mask[:length].all() and not mask[length:].any()
  np.testing.assert_array_equal(np.asarray(inputs.old_seqs[j, :length]),
                                old_full[start_old:stop_old])
  np.testing.assert_array_equal(np.asarray(inputs.new_seqs[j, :length]),
                                new_full[start_new:stop_new])
  assert not np.asarray(inputs.old_seqs[j, length:]).any()
  assert not np.asarray(inputs.new_seqs[j, length:]).any()
  np.testing.assert_array_equal(np.asarray(inputs.concept_vecs[j]), old_full[n_old - 2])


def test_unguided_and_guided_inputs(model, model64):
  concepts = ["x z", "van gogh", "q"]
  guides = ["", "a b c d", "y"]  # blank -> " "
  request = text.build_concept_inputs(model, concepts, guides=guides)
  assert request.prompts == concepts and request.concepts == concepts
  assert request.guides == [" ", "a b c d", "y"] and request.preserve == []
  inputs = request.inputs
  # One batch holds every prompt: compare against it for exact equality.
  full, lengths = text.encode_prompts(model, concepts + request.guides + [""])
  np.testing.assert_array_equal(lengths, [4, 6, 3, 2, 6, 3, 2])
  # far: max(2, 0) = 2, max(4, 4) = 4, max(1, 1) = 1 -> L_j 75, 73, 76.
  np.testing.assert_array_equal(np.asarray(inputs.seq_mask).sum(1), [75, 73, 76])
  assert inputs.old_seqs.shape == (3, 76, 32)
  for j in range(3):
    _check_pair(inputs, j, full[j], full[3 + j], lengths[j], lengths[3 + j])
  np.testing.assert_array_equal(np.asarray(inputs.empty_vec), full[6][1])
  # Unconditional guide: Y_j starts at BOS of E(" ") = E("").
  np.testing.assert_array_equal(np.asarray(inputs.new_seqs[0, :75]), full[6][:75])
  assert inputs.preserve_seqs.shape[0] == 0
  for name in ("concept_vecs", "empty_vec", "old_seqs", "new_seqs"):
    assert getattr(inputs, name).dtype == np.float32
  # And against separate encodings of each prompt (other programs: float64).
  inputs = text.build_concept_inputs(model64, concepts, guides=guides).inputs
  for name in ("concept_vecs", "empty_vec", "old_seqs", "new_seqs", "preserve_seqs"):
    assert getattr(inputs, name).dtype == np.float64
  assert_close64(inputs.old_seqs[1, :73], encode_alone(model64, "van gogh")[4:77])
  assert_close64(inputs.new_seqs[0, :75], encode_alone(model64, "")[0:75])


def test_default_guide_is_unconditional(model):
  request = text.build_concept_inputs(model, ["x z"])
  assert request.guides == [" "]
  for guides in (" ", "", ["\t"]):
    guided = text.build_concept_inputs(model, ["x z"], guides=guides)
    assert guided.guides == [" "]
    jax.tree.map(np.testing.assert_array_equal, request.inputs, guided.inputs)


def test_templates_and_guides_per_concept(model):
  templates = ["photo of {}", "{concept} art"]
  request = text.build_concept_inputs(model, [" x z ", "q"], templates=templates,
                                      guides=["dog", "y"])
  assert request.concepts == ["x z", "q"]
  assert request.prompts == ["x z", "photo of x z", "x z art", "q", "photo of q", "q art"]
  assert request.guides == ["dog"] * 3 + ["y"] * 3
  inputs = request.inputs
  assert inputs.num_concepts == 6
  full, lengths = text.encode_prompts(model, request.prompts + request.guides + [""])
  for j in range(6):
    _check_pair(inputs, j, full[j], full[6 + j], lengths[j], lengths[6 + j])
  # Named template lists and one guide per erased prompt.
  art = text.build_concept_inputs(model, ["q"], templates="art", guides=[""] * 6)
  assert art.prompts == ["q"] + [t.format("q") for t in text.TEMPLATES["art"]]
  assert art.guides == [" "] * 6
  assert text.TEMPLATES["object"] == ["image of {}", "photo of {}", "portrait of {}",
                                      "picture of {}", "painting of {}"]
  assert text.TEMPLATES["art"] == ["painting by {}", "art by {}", "artwork by {}",
                                   "picture by {}", "style of {}"]


def test_preserve_sequences_are_whole(model):
  request = text.build_concept_inputs(model, "x z", preserve=["tench", ""])
  inputs = request.inputs
  assert request.preserve == ["tench", ""]
  assert inputs.preserve_seqs.shape == (2, SEQ, 32)
  assert np.asarray(inputs.preserve_mask).all()
  full, _ = text.encode_prompts(model, ["x z", " ", "tench", ""])
  np.testing.assert_array_equal(np.asarray(inputs.preserve_seqs), full[2:])


def test_last_token_rows(model):
  """token_rows="last": one row per prompt, E(p)[n(p) - 2], worked by hand:
  "x z" has n = 4 (row 2), "a b c d" n = 6 (row 4), a blank guide and ""
  n = 2 (row 0, the start-of-text token)."""
  request = text.build_concept_inputs(model, ["x z", "q"], guides=["a b c d", ""],
                                      preserve=["", "b c d"], token_rows="last")
  inputs = request.inputs
  full, lengths = text.encode_prompts(model, ["x z", "q", "a b c d", " ", "", "b c d"])
  np.testing.assert_array_equal(lengths, [4, 3, 6, 2, 2, 5])
  assert inputs.old_seqs.shape == inputs.new_seqs.shape == (2, 1, 32)
  assert inputs.preserve_seqs.shape == (2, 1, 32)
  assert np.asarray(inputs.seq_mask).all() and np.asarray(inputs.preserve_mask).all()
  np.testing.assert_array_equal(np.asarray(inputs.old_seqs[:, 0]), [full[0][2], full[1][1]])
  np.testing.assert_array_equal(np.asarray(inputs.new_seqs[:, 0]), [full[2][4], full[3][0]])
  np.testing.assert_array_equal(np.asarray(inputs.preserve_seqs[:, 0]),
                                [full[4][0], full[5][3]])
  # The start-of-text row is the same for every prompt (causal attention).
  np.testing.assert_array_equal(full[3][0], full[0][0])
  # c_j and e0 do not depend on the row choice.
  aligned = text.build_concept_inputs(model, ["x z", "q"], guides=["a b c d", ""])
  np.testing.assert_array_equal(inputs.concept_vecs, aligned.inputs.concept_vecs)
  np.testing.assert_array_equal(inputs.empty_vec, aligned.inputs.empty_vec)
  with pytest.raises(ValueError, match="unknown token_rows 'first'"):
    text.build_concept_inputs(model, ["x z"], token_rows="first")


def test_guide_templates_and_preserve_empty(model):
  request = text.build_concept_inputs(
      model, ["x", "y"], guides=["dog", ""], templates=["photo of {}", "{} art"],
      guide_templates=True, preserve=["q"], preserve_empty=True)
  assert request.prompts == ["x", "photo of x", "x art", "y", "photo of y", "y art"]
  # A blank guide fills in as "" ("photo of ": its last token is "of").
  assert request.guides == ["dog", "photo of dog", "dog art", " ", "photo of ", " art"]
  assert text.expand_guides(["dog", ""], ["x", "y"], ["photo of {}", "{} art"],
                            guide_templates=True) == request.guides
  assert request.preserve == ["", "q"]
  full, _ = text.encode_prompts(model, ["", "q"])
  np.testing.assert_array_equal(np.asarray(request.inputs.preserve_seqs), full)
  # Guides given one per erased prompt are used as they are.
  per_prompt = text.build_concept_inputs(model, ["x"], guides=["a", "b"],
                                         templates=["of {}"], guide_templates=True)
  assert per_prompt.guides == ["a", "b"]


def test_one_encoding_call_per_request(model, monkeypatch):
  calls = []
  original = text.encode_prompts
  monkeypatch.setattr(text, "encode_prompts",
                      lambda m, p, **kw: calls.append(list(p)) or original(m, p, **kw))
  text.build_concept_inputs(model, ["x", "y"], guides="z", preserve=["q"],
                            templates=["photo of {}"])
  assert calls == [["x", "photo of x", "y", "photo of y", "z", "z", "z", "z", "q", ""]]


def test_sd2_variant(tiny_models):
  model = tiny_models["sd2"]
  request = text.build_concept_inputs(model, ["x z", "!"], guides=["", "y"],
                                      preserve=["q"])
  inputs = request.inputs
  assert inputs.d_in == 64
  full, lengths = text.encode_prompts(model, ["x z", "!", " ", "y", ""])
  np.testing.assert_array_equal(lengths, [4, 3, 2, 3, 2])
  _check_pair(inputs, 0, full[0], full[2], 4, 2)
  _check_pair(inputs, 1, full[1], full[3], 3, 3)
  np.testing.assert_array_equal(np.asarray(inputs.empty_vec), full[4][1])


def test_errors(model):
  with pytest.raises(ValueError, match="empty concept list"):
    text.build_concept_inputs(model, [])
  with pytest.raises(ValueError, match=r"blank concept at position\(s\) \[1\]"):
    text.build_concept_inputs(model, ["x", "  "])
  with pytest.raises(ValueError, match="got 2 guides for 3 concepts and 3 erased"):
    text.build_concept_inputs(model, ["x", "y", "z"], guides=["a", "b"])
  with pytest.raises(ValueError, match="got 3 guides for 1 concepts and 2 erased"):
    text.build_concept_inputs(model, ["x"], guides=["a", "b", "c"], templates=["of {}"])
  with pytest.raises(ValueError, match="placeholder"):
    text.build_concept_inputs(model, ["x"], templates=["photo of"])
  with pytest.raises(ValueError, match="one of"):
    text.build_concept_inputs(model, ["x"], templates="photo of {}")
  with pytest.raises(ValueError, match="not a string"):
    text.build_concept_inputs(model, ["x", 3])
  with pytest.raises(ValueError, match="one string"):
    text.encode_prompts(model, "x")
