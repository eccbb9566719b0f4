"""Concept sets from the command line and from JSONL files: parsing, the
built-in lists and their look-alikes, and every refusal with its line."""

import json
import warnings

import pytest

from builders import BAD_SETS_FILES
from scapre_jax import requests


def test_builtin_lists_and_comma_lists():
  lists = requests.builtin_lists()
  assert {"imagenette-10", "imagenet-diverse-50", "imagenet-confuse-15", "art-50",
          "nsfw"} <= set(lists)
  assert len(requests.parse_concepts("imagenette-10")) == 10
  assert requests.parse_concepts(" imagenette-10 ") == lists["imagenette-10"]
  assert requests.parse_concepts(" a, b ,, c") == ("a", "b", "c")
  assert requests.parse_concepts(["a ", " b"]) == ("a", "b")
  with pytest.raises(ValueError, match="string or a list of strings"):
    requests.parse_concepts(["a", 3])


@pytest.mark.parametrize("text,message", [
    ("imagenette10", "did you mean imagenette-10\\?"),
    ("Art 50", "did you mean art-50\\?"),
    ("imagenete-10", "did you mean imagenette-10\\?"),
    ("parachute, nsfw", "'nsfw' is a built-in list: give it alone"),
])
def test_list_lookalikes_are_refused(text, message):
  with pytest.raises(ValueError, match=message):
    requests.parse_concepts(text)


def test_a_concept_given_twice_is_erased_once_with_a_warning():
  with pytest.warns(UserWarning, match="'cat' given more than once"):
    assert requests.parse_concepts("cat, dog, cat") == ("cat", "dog")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning without a repeat
    assert requests.parse_concepts("cat, dog") == ("cat", "dog")


def test_concept_set_checks_its_fields():
  s = requests.ConceptSet("a-1.b_2", ("x",), guides=("y",), templates=("photo of {}",))
  assert s.to_dict() == {"name": "a-1.b_2", "concepts": ["x"], "guides": ["y"],
                         "preserve": [], "preset": "scapre", "templates": ["photo of {}"],
                         "others": []}
  for name in ("", "../x", "-x", "a" * 129, "a b"):
    with pytest.raises(ValueError, match="names the output files"):
      requests.ConceptSet(name, ("x",))
  with pytest.raises(ValueError, match="blank concept at position\\(s\\) \\[1\\]"):
    requests.ConceptSet("s", ("x", "  "))
  with pytest.raises(ValueError, match="unknown preset 'fast'"):
    requests.ConceptSet("s", ("x",), preset="fast")


def test_set_from_dict():
  s = requests.set_from_dict({"name": "n", "concepts": "a, b", "guides": "g",
                              "preserve": ["p"], "templates": ["{} art"]},
                             default_preset="uce")
  assert (s.concepts, s.guides, s.preserve, s.preset, s.templates) == (
      ("a", "b"), ("g",), ("p",), "uce", ("{} art",))
  assert requests.set_from_dict({"name": "n", "concepts": "art-50"}).concepts == (
      requests.builtin_lists()["art-50"])
  for entry, message in [([1], "expected a JSON object, got list"),
                         ({"concepts": ["a"]}, "missing 'name'"),
                         ({"name": "n"}, "missing 'concepts'"),
                         ({"name": "n", "concepts": ["a"], "guides": [1]},
                          "guides must be a string or a list of strings")]:
    with pytest.raises(ValueError, match=message):
      requests.set_from_dict(entry)


@pytest.mark.parametrize("text,message", BAD_SETS_FILES + [
    ("# only a comment\n\n", "holds no sets"),
])
def test_bad_sets_files_name_file_and_line(tmp_path, text, message):
  path = tmp_path / "sets.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    requests.load_sets_file(path)


def test_sets_file_with_comments_and_default_preset(tmp_path):
  path = tmp_path / "sets.jsonl"
  path.write_text("# customers\n" + "\n".join(json.dumps(e) for e in [
      {"name": "a", "concepts": ["x"]}, {"name": "b", "concepts": ["y"], "preset": "uce"}]))
  a, b = requests.load_sets_file(path, default_preset="scapre-small")
  assert (a.name, a.preset, b.name, b.preset) == ("a", "scapre-small", "b", "uce")
  path.write_bytes(b"\xff\xfe")
  with pytest.raises(ValueError, match="not UTF-8"):
    requests.load_sets_file(path)
  with pytest.raises(ValueError, match="cannot read sets file"):
    requests.load_sets_file(tmp_path / "missing.jsonl")


def test_model_argument_before_any_work(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
  (tmp_path / "models").mkdir()
  assert requests.looks_like_hub_id("runwayml/stable-diffusion-v1-5")
  assert not requests.looks_like_hub_id("./sd15")
  assert not requests.looks_like_hub_id("models/sd15")  # ./models is a folder here
  assert not requests.looks_like_hub_id("a/b/c")
  requests.check_model_argument(None)
  requests.check_model_argument(str(tmp_path / "models"))  # exists
  with pytest.raises(ValueError, match="--model runwayml/stable-diffusion-v1-5 is neither "
                     "a local folder nor in the Hugging Face cache"):
    requests.check_model_argument("runwayml/stable-diffusion-v1-5")
  with pytest.raises(ValueError, match="--model models/sd15: no such model folder"):
    requests.check_model_argument("models/sd15")
