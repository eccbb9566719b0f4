"""`scapre-jax eval` on the tiny model: the shipped protocol, refusals before
any rendering, images equal to `scapre-jax generate`'s, resume and rerun
through the image cache, and eval.json worked out by hand from stand-in
scorers whose outputs the test fixes.

Every render uses 2 steps and the tiny model's 16 px, batch 8, so the file
compiles the sampler once.
"""

import json
import pathlib
import tomllib

import numpy as np
import pytest

from scapre_jax import cli, generate, io, models
from scapre_jax.config import EditConfig
from scapre_jax.evaluation import images, protocol, run

STEPS = 2


class Scripted:
  """A stand-in scorer that returns the next scripted answer per call (one
  call per model: base first, then each edit) and checks it got images."""

  def __init__(self, **answers):
    self.answers = {k: list(v) for k, v in answers.items()}
    self.shapes = []

  def _next(self, kind, imgs):
    imgs = np.asarray(imgs)
    assert imgs.dtype == np.uint8 and imgs.ndim == 4 and imgs.shape[-1] == 3
    self.shapes.append(imgs.shape)
    answer = self.answers[kind].pop(0)
    assert len(answer) == len(imgs)
    return answer

  def top1(self, imgs):
    return self._next("top1", imgs)

  def cosine(self, imgs, texts):
    assert len(texts) == len(imgs)
    return np.asarray(self._next("cosine", imgs))

  def zero_shot(self, imgs, class_names, template="a photo of a {}."):
    return np.asarray(self._next("zero_shot", imgs))

  def detect(self, imgs):
    return self._next("detect", imgs)

  def describe(self):
    return {"kind": "scripted"}


def _edit(path, model, scale, concepts, *, fingerprint=None):
  kernels = {p: np.asarray(k) * scale
             for p, k in models.cross_attention_kernels(model.unet_params).items()}
  meta = io.edit_metadata(concepts=concepts, guides=[" "], preserve=[], config=EditConfig(),
                          base_fingerprint=fingerprint or model.fingerprint)
  return str(io.write_edit_file(path, kernels, metadata=meta))


def _csv(path, header, rows):
  path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
  return str(path)


OBJECT_ROWS = [(0, "an image of a tench", "tench", 11), (1, "a tench in a net", "tench", 12),
               (2, "an image of a church", "church", 13), (3, "a church at night", "church", 14)]


@pytest.fixture(scope="module")
def objects_csv(tmp_path_factory):
  folder = tmp_path_factory.mktemp("prompts")
  return _csv(folder / "objects.csv", ["case_number", "prompt", "class", "evaluation_seed"],
              OBJECT_ROWS)


@pytest.fixture(scope="module")
def edit_files(tiny_model, tmp_path_factory):
  folder = tmp_path_factory.mktemp("edits")
  return {"zero": _edit(folder / "zero.safetensors", tiny_model, 0.0, ["Tench"]),
          "half": _edit(folder / "half.safetensors", tiny_model, 0.5,
                        ["tench", "church", "parachute"])}


def _config(tiny_dir, out, edits, suite="objects", **kw):
  return run.EvalConfig(edits=tuple(edits), suite=suite, out=str(out), model=str(tiny_dir),
                        steps=STEPS, **kw)


def _objects_scorer(n_edits):
  return Scripted(top1=[["tench", "goldfish", "church", "church"]]
                  + [["goldfish", "goldfish", "church", "cinema"]] * n_edits)


# -- the shipped protocol --------------------------------------------------------------


def test_shipped_prompt_files_load_with_the_released_caps():
  rows = protocol.load_rows(protocol.suite("objects"))
  classes = sorted({r.concept for r in rows})
  assert len(classes) == 10 and "tench" in classes and "golf ball" in classes
  assert len(rows) == 10 * 130  # imagenette.csv: 500 rows a class, capped at 130
  assert rows[0] == protocol.PromptRow("an image of a tench", "tench", 1174, 0)
  assert len(protocol.load_rows(protocol.suite("objects"), per_class=0)) == 5000
  art = protocol.load_rows(protocol.suite("artists"), "art_5")
  assert len(art) == 100 and {r.concept for r in art} >= {"Van Gogh", "Monet"}
  coco = protocol.load_rows(protocol.suite("coco"))
  assert len(coco) == 480 and [r.seed for r in coco[:3]] == [0, 1, 2]
  assert coco[0].prompt == "a dog looking at a kid in the stroller"
  # Every shipped file is matched by the package-data globs, so wheels hold them.
  pyproject = pathlib.Path(__file__).parent.parent / "pyproject.toml"
  globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["scapre_jax"]
  for name in protocol.SHIPPED.values():
    assert any(pathlib.PurePath("data", name).match(g) for g in globs), name


def test_nsfw_reads_an_i2p_csv_and_caps_it(tmp_path):
  path = _csv(tmp_path / "i2p.csv", ["prompt", "categories", "hard", "sd_seed", "sd_guidance_scale"],
              [(f"prompt {i}", "sexual", 1, 1000 + i, 7) for i in range(5)])
  rows = protocol.load_rows(protocol.suite("nsfw"), path, max_rows=3)
  assert [(r.prompt, r.seed, r.concept) for r in rows] == [
      ("prompt 0", 1000, None), ("prompt 1", 1001, None), ("prompt 2", 1002, None)]


@pytest.mark.parametrize("header,rows,message", [
    (["prompt", "class"], [("a", "b")], r"lacks column\(s\) evaluation_seed .*has prompt, class"),
    (["prompt", "class", "evaluation_seed"], [("a", "b", "x")], r"line 2: evaluation_seed"),
    (["prompt", "class", "evaluation_seed"], [("a", "b", -1)], r"line 2: evaluation_seed"),
    (["prompt", "class", "evaluation_seed"], [("", "b", 1)], r"line 2: empty prompt"),
])
def test_bad_csv_is_refused_naming_file_and_column(tmp_path, header, rows, message):
  path = _csv(tmp_path / "bad.csv", header, rows)
  with pytest.raises(ValueError, match=message) as err:
    protocol.load_rows(protocol.suite("objects"), path)
  assert "bad.csv" in str(err.value)


def test_erased_classes_come_from_the_edit_metadata(edit_files):
  [zero, half] = protocol.read_edits([edit_files["zero"], edit_files["half"]])
  classes = ["tench", "church", "golf ball"]
  assert protocol.erased_classes(zero.concepts, classes) == {"tench"}  # case ignored
  assert protocol.erased_classes(half.concepts, classes) == {"tench", "church"}


def test_edits_named_after_their_files_or_folders(tiny_model, edit_files, tmp_path):
  for folder in ("cats", "dogs"):
    (tmp_path / folder).mkdir()
    _edit(tmp_path / folder / "edit.safetensors", tiny_model, 1.0, [folder])
  edits = protocol.read_edits(
      [tmp_path / "cats" / "edit.safetensors", tmp_path / "dogs" / "edit.safetensors",
       edit_files["zero"]])
  assert [e.name for e in edits] == ["cats-edit", "dogs-edit", "zero"]
  with pytest.raises(ValueError, match="edit files with the same name"):
    protocol.read_edits([edit_files["zero"], edit_files["zero"]])
  assert protocol.edit_paths(edits_dir=tmp_path / "cats") == [tmp_path / "cats" / "edit.safetensors"]


# -- refusals, before anything renders ------------------------------------------------


@pytest.fixture
def no_render(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("rendering started before the input was checked")
  monkeypatch.setattr(images, "Renderer", refuse)


def test_bad_input_is_refused_before_rendering(tiny_dir, tiny_model, edit_files, objects_csv,
                                               tmp_path, no_render):
  scorer = {"classifier": _objects_scorer(1)}
  bad = _csv(tmp_path / "bad.csv", ["prompt", "evaluation_seed"], [("a", 1)])
  with pytest.raises(ValueError, match=r"bad.csv lacks column\(s\) class"):
    run.run(_config(tiny_dir, tmp_path / "o", [edit_files["zero"]], prompts=bad),
            scorers=scorer, progress=False)
  other = _edit(tmp_path / "other.safetensors", tiny_model, 1.0, ["tench"],
                fingerprint="0" * 64)
  with pytest.raises(ValueError, match=f"other.safetensors was made for .*{'0' * 64}"):
    run.run(_config(tiny_dir, tmp_path / "o", [edit_files["zero"], other],
                    prompts=objects_csv), scorers=scorer, progress=False)
  with pytest.raises(ValueError, match="unknown suite 'faces'"):
    _config(tiny_dir, tmp_path / "o", [edit_files["zero"]], suite="faces")
  with pytest.raises(ValueError, match="needs --classifier"):
    run.run(_config(tiny_dir, tmp_path / "o", [edit_files["zero"]], prompts=objects_csv),
            progress=False)
  with pytest.raises(ValueError, match="needs --clip"):
    run.run(_config(tiny_dir, tmp_path / "o", [edit_files["zero"]], suite="coco"),
            progress=False)
  assert not (tmp_path / "o" / run.EVAL_FILE).exists()


def test_cli_refusals_are_one_line_exit_2(tiny_dir, edit_files, tmp_path, capsys, no_render):
  bad = _csv(tmp_path / "bad.csv", ["prompt", "class"], [("a", "b")])
  argv = ["eval", "--model", str(tiny_dir), "--edit", edit_files["zero"], "--out",
          str(tmp_path / "o"), "--steps", "2"]
  cases = [
      (["--suite", "objects", "--prompts", bad], "lacks column(s) evaluation_seed"),
      (["--suite", "nsfw"], "suite nsfw ships no prompts: pass --prompts CSV"),
      (["--suite", "objects"], "needs --classifier"),
  ]
  for extra, message in cases:
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("scapre-jax eval: error: ") and message in err
    assert err.count("\n") == 1
  assert cli.main(["eval", "--model", str(tiny_dir), "--edits", str(tmp_path), "--suite",
                   "coco", "--out", str(tmp_path / "o")]) == 2
  assert "holds no edit files" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_:
    cli.main(argv + ["--suite", "faces"])
  assert exit_.value.code == 2


# -- images ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objects_run(tiny_dir, edit_files, objects_csv, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval") / "objects"
  config = _config(tiny_dir, out, [edit_files["zero"], edit_files["half"]], prompts=objects_csv)
  scorer = _objects_scorer(2)
  result = run.run(config, scorers={"classifier": scorer}, progress=False, say=None)
  return config, result, scorer


def _cached(config, edit=None):
  """The cached images of `edit` (None: base) for the config's rows."""
  spec = config.spec
  rows = protocol.load_rows(spec, config.prompts)
  context = images.model_context(config.model, steps=STEPS, guidance=7.5, size=16,
                                 dtype="float32")
  digest = None if edit is None else images.edit_digest(io.read_edit_file(edit)[0])
  cache = images.ImageCache(pathlib.Path(config.out) / run.IMAGES_DIR)
  return rows, [cache.get(images.content_key({**context, "edit": digest}, r.prompt, r.seed))
                for r in rows]


def test_base_images_equal_scapre_jax_generate(objects_run, tiny_dir):
  config, result, scorer = objects_run
  assert scorer.shapes == [(4, 16, 16, 3)] * 3  # base, zero, half
  rows, base = _cached(config)
  for row, image in zip(rows, base):
    expected = generate.generate_grid(tiny_dir, [row.prompt], steps=STEPS, seed=row.seed)
    np.testing.assert_array_equal(image, expected)
  _, zero = _cached(config, config.edits[0])
  assert all(not np.array_equal(a, b) for a, b in zip(base, zero))


def test_eval_json_worked_by_hand(objects_run):
  config, result, _ = objects_run
  on_disk = json.loads((pathlib.Path(config.out) / run.EVAL_FILE).read_text())
  assert on_disk == result
  zero, half = result["edits"]
  # Scripted top-1 labels, base: tench, goldfish, church, church (hits 1 0 1 1);
  # edited: goldfish, goldfish, church, cinema (hits 0 0 1 0).
  # "zero" erases tench (rows 0-1), keeps church (rows 2-3).
  assert zero["erased_classes"] == ["tench"] and zero["n_concepts"] == 1
  assert zero["metrics"] == {"erase_accuracy": {"base": 0.5, "edited": 0.0},
                             "keep_accuracy": {"base": 1.0, "edited": 0.5}}
  assert zero["per_concept"] == {
      "tench": {"erased": True, "rows": 2, "erase_accuracy": {"base": 0.5, "edited": 0.0}},
      "church": {"erased": False, "rows": 2, "keep_accuracy": {"base": 1.0, "edited": 0.5}}}
  # "half" erases both classes (parachute has no rows): nothing is kept.
  assert half["erased_classes"] == ["church", "tench"] and half["n_concepts"] == 3
  assert half["metrics"] == {"erase_accuracy": {"base": 0.75, "edited": 0.25},
                             "keep_accuracy": {"base": None, "edited": None}}
  assert result["settings"] == {
      "suite": "objects", "prompts": config.prompts, "per_class": 130, "max_rows": None,
      "steps": STEPS, "guidance": 7.5, "size": 16, "batch": 8, "dtype": "float32",
      "seed_rule": result["settings"]["seed_rule"]}
  assert result["images"] == {"rendered": 12, "cached": 0}
  table = (pathlib.Path(config.out) / run.TABLE_FILE).read_text()
  assert "| zero | 1 | 0.0 (50.0) | 50.0 (100.0) |" in table
  assert "| half | 3 | 25.0 (75.0) | - |" in table
  for name in ("zero", "half"):
    assert (pathlib.Path(config.out) / "grids" / f"{name}.png").stat().st_size > 1000


def test_rerun_renders_nothing_and_resume_equals_uninterrupted(
    objects_run, tiny_dir, edit_files, objects_csv, tmp_path, monkeypatch):
  config, result, _ = objects_run
  again = run.run(config, scorers={"classifier": _objects_scorer(2)}, progress=False, say=None)
  assert again["images"] == {"rendered": 0, "cached": 12}

  # Stopped after the first batch (the 4 base images), then resumed.
  out = tmp_path / "resumed"
  resumed_config = _config(tiny_dir, out, [edit_files["zero"], edit_files["half"]],
                           prompts=objects_csv)
  calls = []

  def stop():
    if len(calls) == 1:
      raise KeyboardInterrupt
    calls.append(1)
  with pytest.raises(KeyboardInterrupt):
    run.run(resumed_config, scorers={"classifier": _objects_scorer(2)}, progress=False,
            say=None, stop=stop)
  assert not (out / run.EVAL_FILE).exists()
  assert len(list((out / run.IMAGES_DIR).rglob("*.png"))) == 4
  resumed = run.run(resumed_config, scorers={"classifier": _objects_scorer(2)},
                    progress=False, say=None)
  assert resumed["images"] == {"rendered": 8, "cached": 4}
  for edit in (None, *config.edits):
    for a, b in zip(_cached(config, edit)[1], _cached(resumed_config, edit)[1]):
      np.testing.assert_array_equal(a, b)
  drop = ("images", "time_s")
  assert ({k: v for k, v in resumed.items() if k not in drop}
          == {k: v for k, v in result.items() if k not in drop})


# -- the other suites, by hand -----------------------------------------------------------


def test_artists_similarity_and_win_rate_by_hand(tiny_dir, edit_files, tmp_path):
  csv = _csv(tmp_path / "art.csv", ["case_number", "prompt", "class", "evaluation_seed"],
             [(0, "in the style of Tench", "Tench", 1), (1, "by Tench", "Tench", 2),
              (2, "in the style of Monet", "Monet", 3), (3, "by Monet", "Monet", 4)])
  scorer = Scripted(cosine=[[0.30, 0.25, 0.20, 0.10], [0.20, 0.30, 0.20, 0.05]])
  result = run.run(_config(tiny_dir, tmp_path / "o", [edit_files["zero"]], suite="artists",
                           prompts=csv), scorers={"clip": scorer}, progress=False, say=None)
  m = result["edits"][0]["metrics"]
  # Erased (Tench): mean cos 0.275 -> 0.25; edited below base in 1 of 2 rows.
  # Kept (Monet): 0.15 -> 0.125; 0.20 < 0.20 is no win, 0.05 < 0.10 is one.
  assert m["similarity"] == pytest.approx({"base": 0.275, "edited": 0.25})
  assert m["win_rate"] == {"base": None, "edited": 0.5}
  assert m["keep_similarity"] == pytest.approx({"base": 0.15, "edited": 0.125})
  assert m["keep_win_rate"] == {"base": None, "edited": 0.5}


def test_nsfw_rate_and_labels_by_hand(tiny_dir, edit_files, tmp_path):
  csv = _csv(tmp_path / "i2p.csv", ["prompt", "sd_seed"], [("p0", 5), ("p1", 6)])
  feet = lambda score: {"class": "FEET_EXPOSED", "score": score, "box": [0, 0, 1, 1]}
  face = {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]}
  scorer = Scripted(detect=[[[feet(0.6)], [face]], [[feet(0.5)], []]])
  result = run.run(_config(tiny_dir, tmp_path / "o", [edit_files["zero"]], suite="nsfw",
                           prompts=csv), scorers={"nudity": scorer}, progress=False, say=None)
  entry = result["edits"][0]
  # Base: image 0 has an exposed label above 0.5; edited: 0.5 is not above 0.5.
  assert entry["metrics"] == {"nudity_rate": {"base": 0.5, "edited": 0.0}}
  assert entry["nudity_labels"]["base"]["FEET_EXPOSED"] == 1
  assert sum(entry["nudity_labels"]["edited"].values()) == 0


def test_coco_clip_score_by_hand(tiny_dir, edit_files, tmp_path):
  prompts = tmp_path / "captions.txt"
  prompts.write_text("a bus on a road\n\na dog in a park\n")
  scorer = Scripted(cosine=[[0.30, 0.20], [0.10, -0.30]])
  result = run.run(_config(tiny_dir, tmp_path / "o", [edit_files["zero"]], suite="coco",
                           prompts=str(prompts)), scorers={"clip": scorer},
                   progress=False, say=None)
  # 100 x mean cosine, clamped at 0: base 25, edited max(-10, 0) = 0.
  assert result["edits"][0]["metrics"]["clip_score"] == pytest.approx(
      {"base": 25.0, "edited": 0.0})
  assert result["prompts"]["rows"] == 2  # the blank line is no prompt


def test_config_refuses_no_edits(tiny_dir, tmp_path):
  with pytest.raises(ValueError, match="no edit given"):
    _config(tiny_dir, tmp_path / "o", [])


# -- the real scorers (tiny random weights in the real layouts; NudeNet as shipped) ------


@pytest.fixture(scope="module")
def scorer_files(tmp_path_factory):
  from scapre_jax.evaluation import tiny_scorers
  folder = tmp_path_factory.mktemp("scorers")
  return {"clip": str(tiny_scorers.write_tiny_clip(folder / "clip")),
          "resnet": str(tiny_scorers.write_tiny_resnet(folder / "resnet50.safetensors"))}


def test_cli_objects_with_the_real_scorers(tiny_dir, edit_files, objects_csv, scorer_files,
                                           tmp_path, capsys):
  from scapre_jax.evaluation import classifier, clip, metrics
  out = tmp_path / "o"
  assert cli.main(["eval", "--model", str(tiny_dir), "--edit", edit_files["zero"],
                   "--suite", "objects", "--prompts", objects_csv, "--steps", "2",
                   "--classifier", scorer_files["resnet"], "--clip", scorer_files["clip"],
                   "--out", str(out), "--no-progress"]) == 0
  assert "| zero | 1 |" in capsys.readouterr().out
  result = json.loads((out / run.EVAL_FILE).read_text())
  assert result["scorers"]["classifier"]["layout"] == "torchvision"
  # The same numbers from the scorers run here on the cached images.
  config = _config(tiny_dir, out, [edit_files["zero"]], prompts=objects_csv)
  rows, base = _cached(config)
  _, edited = _cached(config, edit_files["zero"])
  resnet = classifier.ImageClassifier.load(scorer_files["resnet"])
  scorer = clip.ClipScorer.load(scorer_files["clip"])
  classes = ["church", "tench"]
  expected = {}
  for side, imgs in (("base", np.stack(base)), ("edited", np.stack(edited))):
    top1 = resnet.top1(imgs)
    shot = [classes[i] for i in scorer.zero_shot(imgs, classes)]
    for prefix, labels in (("", top1), ("clip_", shot)):
      hits = [metrics.class_hit(r.concept, label) for r, label in zip(rows, labels)]
      expected.setdefault(f"{prefix}erase_accuracy", {})[side] = metrics.accuracy(hits[:2])
      expected.setdefault(f"{prefix}keep_accuracy", {})[side] = metrics.accuracy(hits[2:])
  assert result["edits"][0]["metrics"] == expected


def test_nsfw_with_nudenet_as_shipped(tiny_dir, edit_files, tmp_path):
  from scapre_jax.evaluation import metrics, nudity
  csv = _csv(tmp_path / "i2p.csv", ["prompt", "sd_seed"], [("p0", 5), ("p1", 6)])
  config = _config(tiny_dir, tmp_path / "o", [edit_files["zero"]], suite="nsfw", prompts=csv)
  result = run.run(config, progress=False, say=None)
  detector = nudity.NudityDetector()
  entry = result["edits"][0]
  for side, edit in (("base", None), ("edited", edit_files["zero"])):
    detections = detector.detect(np.stack(_cached(config, edit)[1]))
    assert entry["metrics"]["nudity_rate"][side] == metrics.nudity_rate(detections)
    assert entry["nudity_labels"][side] == metrics.label_counts(detections)
  assert list(entry["nudity_labels"]["base"]) == list(metrics.NUDITY_LABELS)


def test_scorer_of_the_wrong_kind_is_refused_before_rendering(
    tiny_dir, edit_files, objects_csv, scorer_files, tmp_path, capsys, no_render):
  argv = ["eval", "--model", str(tiny_dir), "--edit", edit_files["zero"], "--steps", "2",
          "--out", str(tmp_path / "o")]
  cases = [
      (["--suite", "coco", "--clip", str(tiny_dir)], "is not a CLIP model folder"),
      (["--suite", "objects", "--prompts", objects_csv, "--classifier",
        scorer_files["clip"]], "is not a ResNet classifier"),
  ]
  for extra, message in cases:
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("scapre-jax eval: error: ") and message in err, err
    assert err.count("\n") == 1
