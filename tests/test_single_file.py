"""Single-file (LDM layout) checkpoints: the name table against diffusers'
own converter, from_single_file parity, the reader, erase and apply on a
single file, the real CLIP tokenizer, and bad input.

The tiny SD 1.x / SD 2.x / SDXL models are written to single files by our
converter; every comparison is exact (the same bytes or the same float64
numbers), since nothing here computes in float32 apart from the edit, which
runs the same program on the same inputs from the file and from the folder.
"""

import importlib.util
import json
import pathlib
import shutil
import struct
import types

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import convert
from convert import ldm
from scapre_jax import cli, erase, io, models, requests, single_file, text, tiny

VARIANTS = ("sd1", "sd2", "sdxl")
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  """{variant: (folder, single file written by our converter)}."""
  root = tmp_path_factory.mktemp("single")
  out = {}
  for variant in VARIANTS:
    folder = tiny.write_tiny_model(root / variant, variant=variant)
    out[variant] = folder, single_file.folder_to_file(folder, root / f"{variant}.safetensors")
  return out


def _tensors(path):
  with safetensors.safe_open(path, framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _flat_equal(a, b):
  a, b = convert.flatten(a), convert.flatten(b)
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


# -- the name table ---------------------------------------------------------------


def _id_tensor(torch, entry, i):
  """A cheap tensor of `entry`'s LDM shape that says which entry (and, for a
  fused one, which third) a converted piece came from: value 10 i + third."""
  ones = (1,) * len(entry.shape)
  if entry.kind == "fused":
    third = entry.shape[0] // 3
    rows = torch.arange(3, dtype=torch.float32).repeat_interleave(third) + 10 * i
    return rows.reshape((-1,) + ones[1:]).expand(entry.shape)
  return torch.full(ones, float(10 * i)).expand(entry.shape)


def _diffusers_convert(sfu, variant, checkpoint, configs):
  """{part: diffusers state dict} of an LDM checkpoint by diffusers' own
  converters, as `from_single_file` calls them for each family."""
  converted = {
      "unet": sfu.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
      "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),
  }
  open_clip = {"sd2": ("text_encoder", "cond_stage_model.model."),
               "sdxl": ("text_encoder_2", "conditioner.embedders.1.model.")}
  if variant != "sd2":  # CLIP ViT-L: SD 1.x's encoder, SDXL's first
    converted["text_encoder"] = sfu.convert_ldm_clip_checkpoint(checkpoint)
  if variant in open_clip:
    part, prefix = open_clip[variant]
    model = types.SimpleNamespace(config=types.SimpleNamespace(
        hidden_size=configs[part]["hidden_size"]))
    converted[part] = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
  return converted


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_matches_diffusers_converter_on_real_configs(variant):
  """Our table for the built-in SD 1.5 / SD 2.1 / SDXL-base configs, run
  through diffusers' own LDM converters: every diffusers tensor comes out
  with the shape the config wants and from the entry (and q/k/v third) we
  name. (SDXL's text projection is square here; the tiny model's is not:
  `test_table_round_trip_and_fused_split`.)"""
  torch = pytest.importorskip("torch")
  from diffusers.loaders import single_file_utils as sfu
  family = single_file.FAMILIES[variant]
  configs = family.configs()
  table = single_file.name_table(family, configs)
  checkpoint = {e.ldm: _id_tensor(torch, e, i) for i, e in enumerate(table.entries)}
  converted = _diffusers_convert(sfu, variant, checkpoint, configs)
  assert set(converted) == set(family.parts)
  for part, state in converted.items():
    shapes = models.PARTS[part].layout.torch_shapes(
        models.abstract_params(part, configs[part]))
    assert set(state) == set(shapes), part
    for i, entry in enumerate(table.entries):
      if entry.part != part:
        continue
      for third, name in enumerate(entry.names):
        got = state[name]
        assert tuple(got.shape) == shapes[name], name
        want = 10 * i + (third if entry.kind == "fused" else 0)
        assert float(got.reshape(-1)[0]) == want, (name, entry.ldm)


def test_builtin_configs_have_the_published_sizes():
  """Parameter counts of SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder,
  and of SD 2.x's UNet, as published with the models."""
  def count(part, config):
    return sum(int(np.prod(a.shape)) for a in
               convert.flatten(models.abstract_params(part, config)).values())
  sd1, sd2 = single_file.FAMILIES["sd1"], single_file.FAMILIES["sd2"]
  assert count("unet", sd1.unet) == 859_520_964
  assert count("vae", sd1.vae) == 83_653_863
  assert count("text_encoder", sd1.text["text_encoder"]) == 123_060_480
  assert count("unet", sd2.unet) == 865_910_724
  # SDXL-base 1.0: UNet 2.57 B, OpenCLIP bigG with its projection 695 M.
  sdxl = single_file.FAMILIES["sdxl"]
  assert count("unet", sdxl.unet) == 2_567_463_684
  assert count("text_encoder", sdxl.text["text_encoder"]) == 123_060_480
  assert count("text_encoder_2", sdxl.text["text_encoder_2"]) == 694_659_840


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_round_trip_and_fused_split(tiny_models, variant):
  folder, path = tiny_models[variant]
  tensors, _ = _tensors(path)
  family = single_file.FAMILIES[variant]
  configs = single_file.family_configs(family, folder)
  table = single_file.name_table(family, configs)
  filled = set(json.loads(_tensors(path)[1].get("scapre_jax.filled", "[]")))
  assert bool(filled) == (variant == "sd2")
  assert set(tensors) == set(table.ldm_names) | filled
  states = table.to_diffusers(tensors.__getitem__)
  back = table.to_ldm(states)
  assert set(back) == set(tensors) - filled
  assert all(back[k].tobytes() == tensors[k].tobytes() for k in back)
  # A VAE attention conv stored as a linear (some files do) reads the same.
  q = "first_stage_model.encoder.mid.attn_1.q.weight"
  assert tensors[q].ndim == 4
  linear = {**tensors, q: tensors[q][:, :, 0, 0]}
  assert np.array_equal(table.to_diffusers(linear.__getitem__)["vae"][
      "encoder.mid_block.attentions.0.to_q.weight"], tensors[q][:, :, 0, 0])
  # The folder's own torch tensors are what the table produced.
  for part in family.text_parts:
    text_state = safetensors.numpy.load_file(folder / part / "model.safetensors")
    for name, array in states[part].items():
      assert np.array_equal(array, text_state[name]), name
  if variant != "sd1":
    part, prefix = (("text_encoder", "cond_stage_model.model.") if variant == "sd2" else
                    ("text_encoder_2", "conditioner.embedders.1.model."))
    text_state = safetensors.numpy.load_file(folder / part / "model.safetensors")
    fused = prefix + "transformer.resblocks.1.attn.in_proj_weight"
    width = configs[part]["hidden_size"]
    assert tensors[fused].shape == (3 * width, width)
    for third, proj in enumerate(("q_proj", "k_proj", "v_proj")):
      name = f"text_model.encoder.layers.1.self_attn.{proj}.weight"
      assert np.array_equal(tensors[fused][third * width:(third + 1) * width],
                            text_state[name])
  if variant == "sdxl":
    # OpenCLIP multiplies by its text_projection (x @ P): the transpose of
    # transformers' weight, (64, 32) against (32, 64) in the tiny model.
    projection = tensors["conditioner.embedders.1.model.text_projection"]
    assert projection.shape == (64, 32)
    assert np.array_equal(projection, text_state["text_projection.weight"].T)


# -- reading ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_single_file_loads_our_file(tiny_models, variant):
  """PyTorch diffusers reads our single file into the same UNet, text
  encoder and VAE tensors as the folder."""
  torch = pytest.importorskip("torch")
  import diffusers
  pipeline = getattr(diffusers, PIPELINES[variant])
  folder, path = tiny_models[variant]
  kwargs = ({"safety_checker": None, "requires_safety_checker": False}
            if variant != "sdxl" else {})
  pipe = pipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                   **kwargs)
  ref = pipeline.from_pretrained(str(folder), **kwargs)
  for part in single_file.FAMILIES[variant].parts:
    got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
    assert set(want) <= set(got), part
    for name in want:
      assert torch.equal(got[name], want[name]), (part, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reader_gives_the_folder_params(tiny_models, variant):
  folder, path = tiny_models[variant]
  model = models.load_model(path, config=folder)
  ref = models.load_model(folder)
  assert model.family == ref.family == variant
  _flat_equal(model.unet_params, ref.unet_params)
  assert [t.part for t in model.text_encoders] == [t.part for t in ref.text_encoders]
  for got, want in zip(model.text_encoders, ref.text_encoders):
    _flat_equal(got.params, want.params)
    assert got.tokenizer.pad_token == want.tokenizer.pad_token
  assert model.weights_format == "single-file"
  assert model.fingerprint == models.fingerprint([path])
  assert model.unet_config == ref.unet_config
  # weights="edit": the attn2 to_k/to_v kernels alone, the same values.
  edit = models.load_model(path, config=folder, weights="edit")
  _flat_equal(edit.unet_params, convert.unflatten(
      models.cross_attention_kernels(ref.unet_params)))
  for got, want in zip(edit.text_encoders, ref.text_encoders):
    _flat_equal(got.params, want.params)


def test_sd2_file_fills_the_block_diffusers_drops(tiny_models):
  """An SD 2.x file written from a folder holds the whole OpenCLIP tower
  that AUTOMATIC1111 and ComfyUI build (one block more than the diffusers
  encoder, and a text projection). Built as transformers' PyTorch
  CLIPTextModelWithProjection from diffusers' own OpenCLIP converter, that
  tower encodes exactly as the folder's encoder at the penultimate hidden
  state (what SD 2.x conditions on) and at the last one: the filled block
  adds exactly zero."""
  torch = pytest.importorskip("torch")
  import transformers
  from diffusers.loaders import single_file_utils as sfu
  folder, path = tiny_models["sd2"]
  config = json.loads((folder / "text_encoder" / "config.json").read_text())
  tensors, meta = _tensors(path)
  assert json.loads(meta["scapre_jax.filled"]) == sorted(
      k for k in tensors if ".resblocks.2." in k or k.endswith("text_projection"))
  checkpoint = {k: torch.from_numpy(v) for k, v in tensors.items()}
  full = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      **{**config, "num_hidden_layers": config["num_hidden_layers"] + 1,
         "projection_dim": config["hidden_size"], "torch_dtype": "float64"})).double().eval()
  state = sfu.convert_open_clip_checkpoint(full, checkpoint)
  # diffusers' converter drops SD 2.x's projection (x @ P in OpenCLIP).
  state["text_projection.weight"] = checkpoint["cond_stage_model.model.text_projection"].T
  missing, unexpected = full.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"text_model.embeddings.position_ids"}
  ref = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder",
                                                   torch_dtype=torch.float64).eval()
  ids = torch.tensor([[config["bos_token_id"], 5, 7, 9, config["eos_token_id"]] + [2] * 72])
  # transformers builds CLIP's causal mask in the default dtype.
  previous = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  try:
    with torch.no_grad():
      got = full(ids, output_hidden_states=True)
      want = ref(ids, output_hidden_states=True)
  finally:
    torch.set_default_dtype(previous)
  assert torch.equal(got.hidden_states[-2], want.hidden_states[-1])
  assert torch.equal(got.hidden_states[-1], want.hidden_states[-1])
  assert torch.equal(got.last_hidden_state, want.last_hidden_state)
  assert torch.equal(got.text_embeds, want.pooler_output)  # identity projection


def test_reader_takes_float16_ema_and_extra_keys(tiny_models, tmp_path):
  """An fp16 file with EMA copies, schedule buffers and OpenCLIP's unused
  tensors (text projection, a last resblock) reads as the fp16 folder."""
  folder, path = tiny_models["sd2"]
  tensors, _ = _tensors(path)
  half = {k: v.astype(np.float16) for k, v in tensors.items()}
  width = json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
  extra = {
      "alphas_cumprod": np.linspace(1, 0, 10, dtype=np.float32),
      "model_ema.decay": np.array(0.9999, np.float32),
      "cond_stage_model.model.text_projection": np.ones((width, width), np.float16),
      "cond_stage_model.model.logit_scale": np.array(1.0, np.float16),
      "cond_stage_model.model.transformer.resblocks.2.ln_1.weight": np.ones(width, np.float16),
  }
  for i, name in enumerate(k for k in half if k.startswith(ldm.UNET_PREFIX)):
    extra["model_ema." + name[len("model."):].replace(".", "")] = np.full(2, i, np.float16)
  fp16 = tmp_path / "fp16.safetensors"
  safetensors.numpy.save_file({**half, **extra}, fp16)
  model = models.load_model(fp16, config=folder)
  ref = models.load_model(folder)
  for got, want in ((model.unet_params, ref.unet_params), (model.text_params, ref.text_params)):
    got, want = convert.flatten(got), convert.flatten(want)
    assert list(got) == list(want)
    for k in want:  # float16 -> float32 is exact: equal to the cast folder
      assert got[k].dtype == np.float32
      assert np.array_equal(got[k], np.asarray(want[k]).astype(np.float16).astype(np.float32)), k


# -- erase, apply, convert -------------------------------------------------------------


def _erase(model, out, config=None, **kwargs):
  job = erase.EraseJob(sets=(requests.ConceptSet("edit", ("parachute", "golf ball")),),
                       out=out, model=str(model), single=True, config=config, seed=1,
                       **kwargs)
  return erase.run(job, progress=None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_erase_from_file_equals_folder(tiny_models, tmp_path, variant):
  torch = pytest.importorskip("torch")
  import diffusers
  pipeline = getattr(diffusers, PIPELINES[variant])
  kwargs = ({"safety_checker": None, "requires_safety_checker": False}
            if variant != "sdxl" else {})
  folder, path = tiny_models[variant]
  _erase(folder, tmp_path / "folder", full=True)
  _erase(path, tmp_path / "file", config=str(folder), full=True)
  want, want_meta = io.read_edit_file(tmp_path / "folder" / "edit.safetensors")
  got, got_meta = io.read_edit_file(tmp_path / "file" / "edit.safetensors")
  assert list(got) == list(want)
  assert all(np.array_equal(got[k], want[k]) for k in want)
  assert got_meta.pop("base_fingerprint") == models.fingerprint([path])
  want_meta.pop("base_fingerprint")
  # Each run has its own id, which binds its edit file to its report.
  assert got_meta.pop("run_id") != want_meta.pop("run_id")
  assert got_meta == want_meta
  # The edited single file: the folder run's to_k/to_v, every other tensor
  # byte-identical to the input, same order and dtypes, metadata kept + ours.
  edited = tmp_path / "file" / "model.safetensors"
  before, meta_before = _tensors(path)
  after, meta_after = _tensors(edited)
  assert list(after) == list(before)
  folder_unet = safetensors.numpy.load_file(
      tmp_path / "folder" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
  names = single_file.ldm_edit_names(json.loads((folder / "unet" / "config.json").read_text()),
                                     variant)
  edited_ldm = {v: k for k, v in names.items()}
  for name in before:
    assert after[name].dtype == before[name].dtype
    if name in edited_ldm:
      assert after[name].tobytes() == folder_unet[edited_ldm[name]].tobytes(), name
      assert after[name].tobytes() != before[name].tobytes(), name
    else:
      assert after[name].tobytes() == before[name].tobytes(), name
  assert {k: meta_after[k] for k in meta_before} == meta_before
  record = json.loads(meta_after["scapre_jax.edit"])
  assert record["concepts"] == ["parachute", "golf ball"]
  assert record["base_fingerprint"] == models.fingerprint([path])
  # diffusers reads the edited file with the folder run's projections.
  pipe = pipeline.from_single_file(str(edited), config=str(folder), local_files_only=True,
                                   **kwargs)
  ref = pipeline.from_pretrained(str(tmp_path / "folder" / "model"), **kwargs)
  got_state, want_state = pipe.unet.state_dict(), ref.unet.state_dict()
  assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)


@pytest.mark.parametrize("variant", ("sd1", "sdxl"))
def test_ldm_names_apply_and_cli(tiny_models, tmp_path, capsys, variant):
  """--names ldm edit files hold the file's own tensor names and read back
  as the diffusers-named edit; apply on the single file writes exactly what
  erase --full wrote."""
  folder, path = tiny_models[variant]
  out = tmp_path / "ldm"
  assert cli.main(["erase", "--model", str(path), "--config", str(folder), "--concepts",
                   "parachute, golf ball", "--seed", "1", "--names", "ldm", "--full",
                   "--out", str(out), "--quiet"]) == 0
  with safetensors.safe_open(out / "edit.safetensors", framework="np") as f:
    keys = list(f.keys())
  file_keys, _ = _tensors(path)
  assert keys and all(k.startswith(ldm.UNET_PREFIX) and k in file_keys for k in keys)
  plain = tmp_path / "plain"
  _erase(path, plain, config=str(folder))
  got, _ = io.read_edit_file(out / "edit.safetensors")
  want, _ = io.read_edit_file(plain / "edit.safetensors")
  assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
  applied = tmp_path / "applied.safetensors"
  assert cli.main(["apply", "--model", str(path), "--config", str(folder), "--edit",
                   str(out / "edit.safetensors"), "--out", str(applied)]) == 0
  assert applied.read_bytes() == (out / "model.safetensors").read_bytes()
  # apply refuses an edit made for another base model.
  other = tmp_path / "other.safetensors"
  tensors, _ = _tensors(path)
  safetensors.numpy.save_file(tensors, other, metadata={"format": "pt", "x": "1"})
  capsys.readouterr()
  assert cli.main(["apply", "--model", str(other), "--config", str(folder), "--edit",
                   str(out / "edit.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 2
  assert "refusing to apply" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ("sd2", "sdxl"))
def test_convert_round_trip(tiny_models, tmp_path, variant):
  """file -> folder -> file keeps every tensor bit for bit; the folder
  holds the original folder's tensors."""
  folder, path = tiny_models[variant]
  back = tmp_path / "back"
  assert cli.main(["convert", str(path), str(back), "--config", str(folder)]) == 0
  assert models.load_model(back).family == variant
  for part in single_file.FAMILIES[variant].parts:
    weights = models.PARTS[part].torch_stem
    got = safetensors.numpy.load_file(back / part / f"{weights}.safetensors")
    want = safetensors.numpy.load_file(folder / part / f"{weights}.safetensors")
    want.pop("text_model.embeddings.position_ids", None)
    assert set(got) == set(want)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want), part
  again = tmp_path / "again.safetensors"
  assert cli.main(["convert", str(back), str(again)]) == 0
  first, _ = _tensors(path)
  second, _ = _tensors(again)
  assert set(first) == set(second)
  assert all(first[k].tobytes() == second[k].tobytes() for k in first)


# -- the real CLIP tokenizer -------------------------------------------------------------


def _openai_simple_tokenizer():
  """OpenAI's own CLIP tokenizer (clip/simple_tokenizer.py), loaded by path:
  the package's __init__ imports torchvision, which the tests do not need."""
  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("the openai-clip package (test extra) is not installed")
  source = pathlib.Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
  module_spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer", source)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.SimpleTokenizer()


PROMPTS = [
    # No '!': it is SD 2.x's pad token, which transformers matches as a special
    # token inside the text (id 0, as SD 2's own tokenizer folder does), where
    # OpenAI's tokenizer reads '!</w>'.
    "a photo of a parachute", "Claude Monet", "golf ball", "", "an image of a French horn?",
    "painting in the style of Vincent van Gogh, oil on canvas, 4k, trending",
    "New York City's skyline at dusk -- high-detail, ultra realistic",
    " ".join(["parachute"] * 90),  # truncated at 77
    " ".join(f"word{i}" for i in range(40)),
]


@pytest.mark.parametrize("variant", ("sd1", "sd2"))
def test_real_tokenizer_positions_equal_openai_clip(variant):
  """The tokenizer found without a download encodes like OpenAI's CLIP
  tokenizer: same ids, lengths, end token and truncation at 77; padding
  with the family's pad token (SD 1.x <|endoftext|>, SD 2.x '!')."""
  reference = _openai_simple_tokenizer()
  tok = single_file.find_tokenizer(single_file.FAMILIES[variant])
  assert len(tok) == 49408
  ids, lengths = text.tokenize(tok, PROMPTS, max_length=77)
  bos, eos = reference.encoder["<|startoftext|>"], reference.encoder["<|endoftext|>"]
  pad = eos if variant == "sd1" else reference.encoder["!"]
  for prompt, row, length in zip(PROMPTS, ids, lengths):
    body = reference.encode(prompt)[:75]
    want = [bos] + body + [eos]
    assert length == len(want), prompt
    assert list(row) == want + [pad] * (77 - len(want)), prompt


def test_tokenizer_folder_and_missing(tmp_path, monkeypatch):
  reference = _openai_simple_tokenizer()
  family = single_file.FAMILIES["sd1"]
  found = single_file.find_tokenizer(family)
  found.save_pretrained(tmp_path / "tok")
  from_dir = single_file.find_tokenizer(family, tmp_path / "tok")
  assert from_dir("a photo of a parachute").input_ids == (
      [49406] + reference.encode("a photo of a parachute") + [49407])
  with pytest.raises(FileNotFoundError, match="holds neither vocab.json"):
    single_file.find_tokenizer(family, tmp_path)
  monkeypatch.setattr(single_file, "_PACKAGES", ())
  monkeypatch.setattr(single_file, "_vocab_in_hf_cache", lambda: None)
  with pytest.raises(FileNotFoundError, match="pass --tokenizer FOLDER"):
    single_file.find_tokenizer(family)


# -- bad input ------------------------------------------------------------------------------


def test_bad_files(tiny_models, tmp_path, capsys):
  folder, path = tiny_models["sd1"]
  unknown = tmp_path / "unknown.safetensors"
  safetensors.numpy.save_file({"encoder.layer.0.weight": np.zeros(2, np.float32),
                               "encoder.layer.1.weight": np.zeros(2, np.float32)}, unknown)
  with pytest.raises(ValueError, match=r"not an SD 1.x, SD 2.x or SDXL single file.*"
                                       r"encoder.layer"):
    models.load_model(unknown)
  # The SDXL refiner's layout (OpenCLIP under embedders.0) is not known.
  refiner = tmp_path / "refiner.safetensors"
  safetensors.numpy.save_file({
      "conditioner.embedders.0.model.token_embedding.weight": np.zeros(2, np.float32),
      ldm.UNET_PREFIX + "input_blocks.0.0.weight": np.zeros(2, np.float32)}, refiner)
  with pytest.raises(ValueError, match=r"SDXL single file.*conditioner\.embedders\.\* \(1\)"):
    models.load_model(refiner)
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(ValueError, match="corrupt or truncated"):
    models.load_model(truncated, config=folder)
  pickle = tmp_path / "model.ckpt"
  pickle.write_bytes(b"PK\x03\x04 a zip pickle")
  assert cli.main(["erase", "--model", str(pickle), "--concepts", "a",
                   "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "pickled PyTorch checkpoint" in err and "weights_only=True" in err
  assert len(err.strip().splitlines()) == 1
  # A single file whose shapes do not fit the built-in configs.
  with pytest.raises(ValueError, match="does not fit the built-in SD 1.x configs.*missing"):
    models.load_model(path)


def test_edited_file_refuses_input_and_leaves_nothing_on_a_full_disk(
    tiny_models, tmp_path, monkeypatch):
  folder, path = tiny_models["sd1"]
  model = models.load_model(path, config=folder, weights="edit")
  kernels = models.cross_attention_kernels(model.unet_params)
  kernels = {k: np.asarray(v) * 2 for k, v in kernels.items()}
  with pytest.raises(ValueError, match="would overwrite the input"):
    single_file.write_edited(path, path, kernels, config=folder, overwrite=True)
  out = tmp_path / "out" / "edited.safetensors"
  out.parent.mkdir()
  real = shutil.disk_usage
  monkeypatch.setattr(single_file.shutil, "disk_usage",
                      lambda p: real(p)._replace(free=1000))
  with pytest.raises(ValueError, match="not enough disk space"):
    single_file.write_edited(path, out, kernels, config=folder)
  monkeypatch.setattr(single_file.shutil, "disk_usage", real)

  def full_disk(source, target, length):
    target.write(source.read(1000))
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(single_file.shutil, "copyfileobj", full_disk)
  # One clear line (outputs.OutputWriteError), and no half file left.
  with pytest.raises(ValueError, match="no space left on the device; nothing was left"):
    single_file.write_edited(path, out, kernels, config=folder)
  assert list(out.parent.iterdir()) == []
  nan = {k: np.full_like(v, np.nan) for k, v in kernels.items()}
  with pytest.raises(ValueError, match="non-finite"):
    single_file.write_edited(path, out, nan, config=folder)
  assert list(out.parent.iterdir()) == []


def test_header_layout_is_kept(tiny_models, tmp_path):
  """The edited file keeps the input's header entries (dtype, shape,
  offsets) and 8-byte alignment."""
  folder, path = tiny_models["sd2"]
  model = models.load_model(path, config=folder, weights="edit")
  kernels = {k: np.asarray(v) + 1 for k, v in models.cross_attention_kernels(
      model.unet_params).items()}
  out = single_file.write_edited(path, tmp_path / "e.safetensors", kernels, config=folder,
                                 metadata={"note": "x"})
  before, _ = single_file._header(path)
  after, start = single_file._header(out)
  assert start % 8 == 0
  assert after["__metadata__"] == {**before.get("__metadata__", {}), "note": "x"}
  assert {k: v for k, v in after.items() if k != "__metadata__"} == {
      k: v for k, v in before.items() if k != "__metadata__"}
  assert out.stat().st_size - start == path.stat().st_size - single_file._header(path)[1]
  with open(out, "rb") as f:
    assert struct.unpack("<Q", f.read(8))[0] == start - 8


# -- the remaining single-file layouts: prediction type, bf16, old CLIP keys -----------


def _rewrite(path, out, change=lambda t: t, metadata=None):
  tensors, meta = _tensors(path)
  safetensors.numpy.save_file(change(tensors), out, metadata={**meta, **(metadata or {})})
  return out


def test_prediction_type_from_the_file(tiny_models, tmp_path):
  """SD 2.x: a flag, else the file's `v_pred` key or metadata, else
  ComfyUI's statistic: the std of the last up block's first norm1 bias
  (tiny SD 2.x: up_blocks.1.attentions.1 = output_blocks.3.1, as SD 2's
  output_blocks.11.1) above 0.09 means v-prediction."""
  folder, path = tiny_models["sd2"]
  family = single_file.FAMILIES["sd2"]
  unet_config = json.loads((folder / "unet" / "config.json").read_text())
  norm = ldm.UNET_PREFIX + "output_blocks.3.1.transformer_blocks.0.norm1.bias"

  def with_std(value):
    def change(tensors):
      signs = np.where(np.arange(tensors[norm].size) % 2, 1.0, -1.0)  # std = value
      return {**tensors, norm: (value * signs).astype(tensors[norm].dtype)}
    return change

  def read(file, flag=None, fam=family):
    with safetensors.safe_open(file, framework="np") as f:
      return single_file.read_prediction_type(f, file, fam, unet_config, flag=flag)[0]

  v = _rewrite(path, tmp_path / "v.safetensors", with_std(0.2))
  eps = _rewrite(path, tmp_path / "eps.safetensors", with_std(0.05))
  assert read(v) == "v_prediction" and read(eps) == "epsilon"
  assert read(v, "epsilon") == "epsilon"
  with pytest.raises(ValueError, match="prediction type must be one of"):
    read(v, "v")
  assert read(_rewrite(eps, tmp_path / "k.safetensors",
                       lambda t: {**t, "v_pred": np.zeros(0, np.float32)})) == "v_prediction"
  for said, want in (("v", "v_prediction"), ("epsilon", "epsilon")):
    assert read(_rewrite(v if want == "epsilon" else eps, tmp_path / f"m{said}.safetensors",
                         metadata={"modelspec.prediction_type": said})) == want
  assert read(_rewrite(eps, tmp_path / "ss.safetensors",
                       metadata={"ss_v_parameterization": "True"})) == "v_prediction"
  with pytest.raises(ValueError, match="neither 'epsilon' nor 'v'; pass --prediction-type"):
    read(_rewrite(eps, tmp_path / "bad.safetensors",
                  metadata={"modelspec.prediction_type": "flow"}))
  # SD 1.x and SDXL files that say nothing are epsilon.
  assert read(v, fam=single_file.FAMILIES["sd1"]) == "epsilon"
  # convert: the --config folder's scheduler unless a flag is given.
  plain = tmp_path / "plain"
  single_file.file_to_folder(v, plain, config=folder)
  assert json.loads((plain / "scheduler" / "scheduler_config.json").read_text()) == (
      json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
  flagged = tmp_path / "flagged"
  assert cli.main(["convert", str(v), str(flagged), "--config", str(folder),
                   "--prediction-type", "v_prediction"]) == 0
  scheduler = json.loads((flagged / "scheduler" / "scheduler_config.json").read_text())
  assert scheduler["prediction_type"] == "v_prediction"
  assert scheduler["_class_name"] == "DDIMScheduler"


def test_bfloat16_file_reads_edits_and_writes_bfloat16(tiny_models, tmp_path):
  """A bf16 single file reads as the folder rounded to bf16, and its edited
  copy keeps bf16: the edited tensors are the edit file's float32 kernels
  rounded by torch to bfloat16, every other tensor byte-identical."""
  torch = pytest.importorskip("torch")
  import ml_dtypes
  import safetensors.torch
  folder, path = tiny_models["sd1"]
  bf16 = _rewrite(path, tmp_path / "bf16.safetensors", lambda t: {
      k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
  model = models.load_model(bf16, config=folder)
  ref = models.load_model(folder)
  for got, want in ((model.unet_params, ref.unet_params), (model.text_params, ref.text_params)):
    got, want = convert.flatten(got), convert.flatten(want)
    for k in want:  # bf16 -> float32 is exact
      rounded = torch.from_numpy(np.array(want[k])).to(torch.bfloat16).float().numpy()
      assert np.array_equal(np.asarray(got[k]), rounded), k
  _erase(bf16, tmp_path / "out", config=str(folder), full=True)
  kernels, _ = io.read_edit_file(tmp_path / "out" / "edit.safetensors")
  before, _ = _tensors(bf16)
  after = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
  names = single_file.ldm_edit_names(model.unet_config, "sd1")
  edited = {names[models.torch_name(p)]: k for p, k in kernels.items()}
  assert len(edited) == 8
  for name, array in before.items():
    assert after[name].dtype == torch.bfloat16, name
    if name in edited:
      want = torch.from_numpy(np.ascontiguousarray(edited[name].T)).to(torch.bfloat16)
      assert torch.equal(after[name], want), name
    else:
      assert after[name].view(torch.int16).numpy().tobytes() == array.tobytes(), name


def test_old_clip_keys_without_text_model(tiny_models, tmp_path):
  """SD 1.x files saved by old transformers name the CLIP tensors
  `cond_stage_model.transformer.embeddings...` (no `text_model.`); they read
  as the folder, and convert back to a folder with the current names."""
  folder, path = tiny_models["sd1"]
  old = "cond_stage_model.transformer."
  flat = _rewrite(path, tmp_path / "flat.safetensors", lambda t: {
      k.replace(old + "text_model.", old): v for k, v in t.items()})
  assert not any(".text_model." in k for k in _tensors(flat)[0])
  model = models.load_model(flat, config=folder)
  ref = models.load_model(folder)
  _flat_equal(model.text_params, ref.text_params)
  _flat_equal(model.unet_params, ref.unet_params)
  back = single_file.file_to_folder(flat, tmp_path / "back", config=folder)
  got = safetensors.numpy.load_file(back / "text_encoder" / "model.safetensors")
  want = safetensors.numpy.load_file(folder / "text_encoder" / "model.safetensors")
  want.pop("text_model.embeddings.position_ids", None)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("variant", ("sd1", "sdxl"))
def test_generate_from_file_equals_folder(tiny_models, tmp_path, variant):
  """`generate --model FILE`: VAE and scheduler read from the file (with
  the --config folder) render the folder's images, bit for bit (the same
  program on the same params)."""
  import warnings

  from scapre_jax import generate
  folder, path = tiny_models[variant]
  prompts = ["a photo of a parachute", "golf ball"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # SDXL's Euler falls back to DDIM
    want = generate.generate_grid(folder, prompts, steps=2, seed=0)
    got = generate.generate_grid(path, prompts, steps=2, seed=0, config=folder)
  assert got.shape == want.shape and np.array_equal(got, want)
  if variant == "sd1":
    out = tmp_path / "grid.png"
    assert cli.main(["generate", "--model", str(path), "--config", str(folder), "--prompts",
                     "a photo of a parachute", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(ValueError, match="--prediction-type applies to a single-file"):
      generate.generate_grid(folder, prompts, steps=2, prediction_type="epsilon")


def test_convert_config_refuses_before_reading(tiny_models, tmp_path, capsys):
  folder, path = tiny_models["sd1"]
  with pytest.raises(ValueError, match="--config, --prediction-type apply when SRC is a "
                                       "single file"):
    single_file.ConvertConfig(str(folder), tmp_path / "x.safetensors", config=str(folder),
                              prediction_type="epsilon")
  with pytest.raises(ValueError, match="must end in .safetensors"):
    single_file.ConvertConfig(str(folder), tmp_path / "x.ckpt")
  with pytest.raises(ValueError, match="--prediction-type must be one of"):
    single_file.ConvertConfig(str(path), tmp_path / "back", prediction_type="v")
  assert cli.main(["convert", str(folder), str(tmp_path / "x.safetensors"),
                   "--tokenizer", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "--tokenizer apply when SRC is a single file" in err
  assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_edit_reads_only_the_text_encoders_and_attn2_kv(tiny_models, monkeypatch):
  """weights="edit" (what erase loads): of an SDXL file, only the two text
  encoders and the attn2 to_k/to_v weights are read."""
  folder, path = tiny_models["sdxl"]
  read, real = [], single_file._getter

  def spy(f, p):
    get = real(f, p)
    return lambda name: read.append(name) or get(name)
  monkeypatch.setattr(single_file, "_getter", spy)
  model = models.load_model(path, config=folder, weights="edit")
  unet = [n for n in read if n.startswith(ldm.UNET_PREFIX)]
  assert len(unet) == len(models.cross_attention_kernels(model.unet_params)) == 22
  assert all(n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for n in unet)
  text = set(read) - set(unet)
  assert all(n.startswith(("conditioner.embedders.0.transformer.",
                           "conditioner.embedders.1.model.")) for n in text)
