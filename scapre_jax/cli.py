"""`scapre-jax` command line: parses arguments and calls the library.

  scapre-jax tiny DIR                      write the built-in tiny model
  scapre-jax erase --concepts "a, b" --out OUT [--model M] [--full] ...
  scapre-jax erase --sets sets.jsonl --out OUT [--model M] ...
  scapre-jax apply --model M --edit FILE --out DIR|FILE.safetensors
  scapre-jax convert SRC DST               diffusers folder <-> single file
  scapre-jax inspect FILE
  scapre-jax verify --model M --edit FILE   recompute FILE with the PyTorch reference
  scapre-jax generate --model M [--edit FILE] --prompts "..." --out grid.png
  scapre-jax eval --model M (--edit FILE ... | --edits DIR) --suite S --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import sys
import warnings

from scapre_jax.config import (
    DTYPES, ApplyConfig, EditConfig, GenerateConfig, InspectConfig, PRESET_HELP, PRESETS,
    TINY_VARIANTS, TinyConfig, VerifyConfig)


def _field_types() -> dict[str, type]:
  types = {}
  for f in dataclasses.fields(EditConfig):
    default = f.default
    types[f.name] = type(default) if default is not None else float
  return types


def parse_override(text: str) -> tuple[str, object]:
  """`name=value` -> (name, typed value) for an EditConfig field."""
  if "=" not in text:
    raise ValueError(f"--set takes name=value, got {text!r}")
  name, raw = (part.strip() for part in text.split("=", 1))
  types = _field_types()
  if name not in types:
    raise ValueError(f"--set: unknown setting {name!r}; settings: {', '.join(sorted(types))}")
  kind = types[name]
  if kind is bool:
    if raw.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
      raise ValueError(f"--set {name}: expected true or false, got {raw!r}")
    return name, raw.lower() in ("true", "1", "yes", "on")
  if kind is tuple:
    return name, tuple(v.strip() for v in raw.split(",") if v.strip())
  if raw.lower() == "none" and name in ("preserve_scale", "residual_scale", "projector_rtol"):
    return name, None
  try:
    return name, kind(raw)
  except ValueError:
    raise ValueError(f"--set {name}: expected a {kind.__name__}, got {raw!r}") from None


def _split(value: str | None) -> tuple[str, ...] | None:
  if value is None:
    return None
  return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="scapre-jax",
      description="Erase concepts from Stable Diffusion with ScaPre, in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("tiny", help="write the built-in tiny random-weight model")
  p.add_argument("dir")
  p.add_argument("--variant", default="sd1", choices=TINY_VARIANTS)
  p.add_argument("--seed", type=_seed, default=0)

  width = max(len(name) for name in PRESETS)
  p = sub.add_parser(
      "erase", help="erase concepts; write edit files and reports",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="presets (the paper and the script each reproduces):\n" + "\n".join(
          f"  {name.ljust(width)}  {PRESET_HELP[name]}" for name in PRESETS))
  p.add_argument("--model", help="diffusers folder, cached Hugging Face id or "
                 "SD 1.x/2.x/SDXL single .safetensors file (default: the built-in tiny model)")
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--concepts", help='comma-separated concepts, or a built-in list '
                    '(imagenette-10, imagenet-diverse-50, imagenet-confuse-15, art-50, nsfw)')
  what.add_argument("--sets", help="JSONL file, one concept set per line")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--guides", help="comma-separated guide concepts (default: erase "
                 "towards the unconditional prompt)")
  p.add_argument("--preserve", help="comma-separated concepts to keep")
  p.add_argument("--preserve-empty", action="store_true",
                 help="also keep the empty prompt '' (UCE's train_erase.py always "
                      "does; same as --set preserve_empty=true; with --sets, for "
                      "every set)")
  p.add_argument("--templates", help="prompt templates: 'art', 'object' or "
                 "';'-separated format strings like 'photo of {}'")
  p.add_argument("--preset", default="scapre", choices=tuple(PRESETS),
                 help="settings preset, listed below (with --sets: for sets that "
                      "name none)")
  p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                 dest="overrides", help="override a setting, e.g. --set erase_scale=3")
  p.add_argument("--seed", type=_seed, default=0, help="PRNG seed, 0 to 2**32 - 1")
  p.add_argument("--dtype", default="float32",
                 choices=DTYPES,
                 help="dtype the model is loaded in and the edit is written in")
  p.add_argument("--precision", choices=("float32", "float64"),
                 help="float64: encode the text and compute the edit in float64; "
                      "with --set mi_mode=canonical the same to 1e-10 however sets "
                      "are batched or sharded (slower; see docs/reproducibility.md). "
                      "Default: float32, float64 for --dtype float64")
  p.add_argument("--full", action="store_true", help="also write OUT/model/, "
                 "the complete edited diffusers folder (OUT/model.safetensors for a "
                 "single-file --model)")
  p.add_argument("--names", default="diffusers", choices=("diffusers", "ldm"),
                 help="tensor names in the edit file: diffusers, or ldm "
                      "(model.diffusion_model.*, as single files name them)")
  _add_single_file(p)
  p.add_argument("--orbax", action="store_true", help="also write OUT/orbax/")
  p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  p.add_argument("--sets-per-call", type=_positive_int,
                 help="sets solved in one compiled call (at least 1)")
  p.add_argument("--quiet", action="store_true",
                 help="no progress lines (the summary is still printed)")
  p.add_argument("--json", action="store_true", help="print the summary as JSON")
  _add_compile_cache(p)
  p.add_argument("--coordinator", help="multi-host: coordinator address host:port "
                 "(or JAX_COORDINATOR_ADDRESS)")
  p.add_argument("--num-processes", type=int, help="multi-host: process count")
  p.add_argument("--process-id", type=int, help="multi-host: this process's index")

  p = sub.add_parser("apply", help="apply an edit file to a model folder or single file")
  p.add_argument("--model", required=True, help="diffusers folder or single .safetensors file")
  p.add_argument("--edit", required=True)
  p.add_argument("--out", required=True, help="output folder (a .safetensors file "
                 "for a single-file --model)")
  p.add_argument("--config", help="single-file --model: diffusers folder with its "
                 "configs (default: the family's built-in ones)")
  p.add_argument("--overwrite", action="store_true")

  p = sub.add_parser("convert", help="diffusers folder -> single .safetensors file, "
                     "or single file -> diffusers folder (the direction follows SRC)")
  p.add_argument("src")
  p.add_argument("dst")
  _add_single_file(p)
  _add_prediction_type(p)
  p.add_argument("--overwrite", action="store_true")

  p = sub.add_parser("verify", help="recompute an edit file with the PyTorch reference "
                     "and compare (needs torch)")
  p.add_argument("--model", help="the base model the edit was made for (default: the "
                 "built-in tiny model)")
  p.add_argument("--edit", required=True, help="edit file written by scapre-jax erase")
  p.add_argument("--no-unet", action="store_true",
                 help="skip running the PyTorch and Flax UNets on the written weights")
  p.add_argument("--quiet", action="store_true", help="no progress lines")

  p = sub.add_parser("inspect", help="show what an edit file holds")
  p.add_argument("file")
  p.add_argument("--json", action="store_true")

  p = sub.add_parser("generate", help="before/after images with the Flax pipeline")
  p.add_argument("--model", help="diffusers folder, cached Hugging Face id or single "
                 ".safetensors file (default: the built-in tiny model)")
  p.add_argument("--edit")
  p.add_argument("--prompts", required=True, help="';'-separated prompts")
  p.add_argument("--out", required=True, help="PNG grid to write")
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--seed", type=_seed, default=0, help="PRNG seed, 0 to 2**32 - 1")
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
  _add_single_file(p)
  _add_prediction_type(p)
  p.add_argument("--overwrite", action="store_true")
  _add_compile_cache(p)

  p = sub.add_parser("eval", help="the paper's evaluations of edits: images, scores, "
                     "eval.json, table, grids, plots")
  p.add_argument("--model", help="diffusers folder or cached Hugging Face id "
                 "(default: the built-in tiny model)")
  edits = p.add_mutually_exclusive_group(required=True)
  edits.add_argument("--edit", nargs="+", help="edit file(s)")
  edits.add_argument("--edits", metavar="DIR", help="every edit file in DIR (a sets run's OUT)")
  p.add_argument("--suite", required=True, choices=("objects", "artists", "nsfw", "coco"))
  p.add_argument("--prompts", help="prompt CSV (or a shipped one: imagenette, "
                 "imagenet-50, imagenet-15, art_50, art_5, coco); nsfw needs the I2P CSV")
  p.add_argument("--per-class", type=int, help="rows per class (default: the "
                 "suite's, 130 for objects; 0: all)")
  p.add_argument("--max-rows", type=int, help="rows in all (default: the suite's, "
                 "300 for nsfw; 0: all)")
  p.add_argument("--steps", type=_positive_int, help="sampler steps (default 50)")
  p.add_argument("--guidance", type=float, help="guidance scale (default 7.5)")
  p.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
  p.add_argument("--batch", type=_positive_int, default=8, help="images per compiled call")
  p.add_argument("--classifier", help="objects: ResNet-50 .safetensors (torchvision/timm "
                 "layout) or Hugging Face ResNet folder")
  p.add_argument("--clip", help="CLIP folder or cached id (artists, coco; with objects: "
                 "also CLIP zero-shot accuracy)")
  p.add_argument("--out", required=True, help="output folder (its images/ cache is reused "
                 "by reruns)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  _add_compile_cache(p)

  p = sub.add_parser("eval-table", help="the paper's table across suites, from "
                     "several eval OUT folders (one suite each)")
  p.add_argument("evals", nargs="+", metavar="DIR", help="eval OUT folders (or eval.json files)")
  p.add_argument("--out", help="also write the table to this markdown file")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  return parser


def _add_single_file(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", help="single-file model: diffusers folder whose configs "
                 "and tokenizer to use (default: the family's built-in ones)")
  p.add_argument("--tokenizer", metavar="DIR", help="single-file model: folder with "
                 "the CLIP vocabulary (vocab.json + merges.txt, or "
                 "bpe_simple_vocab_16e6.txt.gz)")


def _add_prediction_type(p: argparse.ArgumentParser) -> None:
  p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                 help="single-file model: what its UNet predicts (default: what the file "
                      "says, else SD 2.x by ComfyUI's rule, else epsilon)")


def _seed(text: str) -> int:
  try:
    value = int(text, 0)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  if not 0 <= value < 2 ** 32:
    raise argparse.ArgumentTypeError(f"must be in [0, 2**32 - 1], got {text}")
  return value


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


def _add_compile_cache(p: argparse.ArgumentParser) -> None:
  p.add_argument("--compile-cache", metavar="DIR|off",
                 help="persistent XLA compilation cache (default: "
                      "$SCAPRE_JAX_COMPILE_CACHE, else ~/.cache/scapre-jax/xla)")


def _templates(value: str | None):
  if value is None or value in ("art", "object"):
    return value
  return tuple(t.strip() for t in value.split(";") if t.strip())


def _erase(args, stop) -> int:
  if args.precision == "float64" or args.dtype == "float64":
    # Process-global and only safe before any JAX array exists: first thing.
    from scapre_jax import precision
    precision.enable_x64()
  # Everything the arguments alone can tell is checked here, before the
  # model code and JAX's compiler are imported (seconds), and the lock on
  # OUT is taken before any work.
  from scapre_jax import outputs, requests
  overrides = tuple(parse_override(o) for o in args.overrides)
  if args.preserve_empty:
    overrides += (("preserve_empty", True),)
  out = pathlib.Path(args.out)
  if args.sets:
    for flag in ("full", "orbax"):
      if getattr(args, flag):
        raise ValueError(f"--{flag} writes one model folder, so it needs one set "
                         "(--concepts), not --sets")
    for flag in ("guides", "preserve", "templates"):
      if getattr(args, flag):
        raise ValueError(f"--{flag} applies to --concepts; a sets file gives it per set")
    sets = tuple(requests.load_sets_file(args.sets, default_preset=args.preset))
    single = False
    inputs = (pathlib.Path(args.sets),)
    for s in sets:  # its report must not land on the sets file
      for f in (out / f"{s.name}.safetensors", out / f"{s.name}.json"):
        outputs.check_output(f, overwrite=True, protected=inputs)
  else:
    sets = (requests.ConceptSet(
        name="edit", concepts=requests.parse_concepts(args.concepts),
        guides=_split(args.guides), preserve=_split(args.preserve) or (),
        preset=args.preset, templates=_templates(args.templates),
        others=requests.list_others(args.concepts)),)
    single = True
    inputs = ()
    local_model = ([args.model] if args.model and pathlib.Path(args.model).exists()
                   else [])
    for f in (out / "edit.safetensors", out / "report.json",
              *([out / ("model.safetensors" if local_model and pathlib.Path(
                  args.model).is_file() else "model")] if args.full else []),
              *([out / "orbax"] if args.orbax else [])):
      outputs.check_output(f, overwrite=args.overwrite, protected=local_model)
  for s in sets:  # settings out of range fail here
    EditConfig.preset(s.preset, **dict(overrides))
  requests.check_model_argument(args.model)
  multi = bool(args.coordinator or args.num_processes
               or os.environ.get("JAX_COORDINATOR_ADDRESS"))
  # A multi-host run's processes lock their own shares once JAX knows them.
  with (contextlib.nullcontext() if multi else outputs.lock(out)):
    from scapre_jax import cache, console
    console.quiet_library_logs()
    from scapre_jax import erase
    if multi:
      import jax
      jax.distributed.initialize(coordinator_address=args.coordinator,
                                 num_processes=args.num_processes,
                                 process_id=args.process_id)
    cache.enable_compile_cache(args.compile_cache)
    job = erase.EraseJob(
        sets=sets, out=out, model=args.model, single=single,
        full=args.full, orbax=args.orbax, seed=args.seed, dtype=args.dtype,
        precision=args.precision, overrides=overrides, overwrite=args.overwrite,
        sets_per_call=args.sets_per_call, inputs=inputs,
        config=args.config, tokenizer=args.tokenizer, names=args.names)

    def progress(message: str) -> None:
      stop()  # a Ctrl-C that JAX swallowed stops the run here
      if not (args.quiet or args.json):
        console.say(message)

    summary = erase.run(job, progress=progress)
    stop()
  if args.json:
    print(json.dumps(summary, indent=2))
  else:
    print(format_summary(summary))
  note = rounding_note(summary)
  if note and not args.quiet:
    print(note, file=sys.stderr)
  return 0


def rounding_note(summary: dict) -> str | None:
  """One line when some matrix's MI mask is decided by float32 rounding
  (report.json: layers.*.mi_by_rounding), else None."""
  matrices = sum(1 for s in summary["sets"] for e in s.get("layers", {}).values()
                 if e.get("mi_by_rounding"))
  if not matrices:
    return None
  return (f"note: in {matrices} matrices the MI mask of some concept is decided by float32 "
          "rounding (every row separates it from the empty prompt, so the MI values tie "
          "up to an ulp; see mi_by_rounding in the report); --set mi_mode=canonical "
          "weighs such rows equally (README: reproducing the paper)")


def format_summary(summary: dict) -> str:
  """The table printed at the end of an erase, with what its columns mean."""
  rows = [("set", "concepts", "erased_moved", "others_moved", "ratio", "preserve_moved",
           "time_s")]
  for s in summary["sets"]:
    rows.append((s["name"], str(len(s["concepts"])),
                 f"{s['erased_moved']:.3f}", f"{s['others_moved']:.3f}",
                 f"{s['ratio']:.1f}x",
                 f"{s['preserve_moved']:.3f}" if "preserve_moved" in s else "-",
                 f"{s['solve_s'] + s['write_s']:.2f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  tail = f"{len(summary['sets'])} set(s) written to {summary['out']}"
  if summary.get("skipped"):
    tail += f", {len(summary['skipped'])} skipped (already done)"
  if "total_s" in summary:
    tail += f" in {summary['total_s']:.1f} s"
  lines.append(tail)
  if summary["sets"]:
    lines += [
        "erased_moved: how far the erased prompts' concept tokens moved in the edited",
        "  projections, ||c (W'-W)|| / ||c W||, mean over prompts and matrices (0 = untouched)",
        f"others_moved: the same for the words of {summary.get('others', 'the')} unrelated "
        "captions no set names",
        *[f"  (set {s['name']}: instead, the {len(s['others'])} look-alikes its list keeps: "
          f"{', '.join(s['others'])})" for s in summary["sets"] if s.get("others")],
        "ratio: erased_moved / others_moved; well above 1 = the edit singled out its "
        "concepts",
        "preserve_moved: the same for the --preserve prompts' words (lower = better kept)",
    ]
  return "\n".join(lines)


def _inspect(args) -> int:
  from scapre_jax import inspection
  print(inspection.run(InspectConfig(file=args.file, json=args.json)))
  return 0


def _eval(args, stop) -> int:
  from scapre_jax import cache, console
  console.quiet_library_logs()
  from scapre_jax.evaluation import protocol, report, run
  edits = protocol.edit_paths(args.edit or (), args.edits)
  config = run.EvalConfig(
      edits=tuple(map(str, edits)), suite=args.suite, out=args.out,
      model=args.model, prompts=args.prompts, per_class=args.per_class,
      max_rows=args.max_rows, steps=args.steps, guidance=args.guidance, size=args.size,
      batch=args.batch, classifier=args.classifier, clip=args.clip)
  cache.enable_compile_cache(args.compile_cache)
  result = run.run(config, progress=not args.no_progress, stop=stop)
  print(report.table(result), end="")
  return 0


def _verify(args) -> int:
  config = VerifyConfig(edit=args.edit, model=args.model, unet=not args.no_unet)
  from scapre_jax import console
  console.quiet_library_logs()
  from scapre_jax import verify
  result = verify.run(config, progress=None if args.quiet else console.say)
  print(verify.format_result(result, config.edit))
  return 0 if result.ok else 1


def _generate(args) -> int:
  # Every check the arguments alone allow comes before the model code loads.
  config = GenerateConfig(
      prompts=tuple(p.strip() for p in args.prompts.split(";") if p.strip()),
      out=args.out, model=args.model, edit=args.edit, steps=args.steps, seed=args.seed,
      guidance=args.guidance, size=args.size, config=args.config,
      tokenizer=args.tokenizer, prediction_type=args.prediction_type,
      overwrite=args.overwrite)
  from scapre_jax import cache, console, outputs
  outputs.check_output(config.out, config.overwrite,
                       [p for p in (config.model, config.edit) if p and os.path.exists(p)])
  console.quiet_library_logs()
  from scapre_jax import generate
  cache.enable_compile_cache(args.compile_cache)
  print(generate.run(config))
  return 0


def _tiny(args) -> int:
  config = TinyConfig(out=args.dir, variant=args.variant, seed=args.seed)
  from scapre_jax import console
  console.quiet_library_logs()
  from scapre_jax import tiny
  print(tiny.run(config))
  return 0


def _apply(args) -> int:
  config = ApplyConfig(model=args.model, edit=args.edit, out=args.out,
                       config=args.config, overwrite=args.overwrite)
  from scapre_jax import console, io
  console.quiet_library_logs()
  print(io.apply(config))
  return 0


def _eval_table(args) -> int:
  import json
  from scapre_jax import outputs
  from scapre_jax.evaluation import report
  results = []
  for given in args.evals:
    path = pathlib.Path(given)
    path = path / "eval.json" if path.is_dir() else path
    try:
      result = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
      raise ValueError(f"{given}: no eval.json (run scapre-jax eval --out {given} first)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ValueError(f"{path}: not an eval.json ({err})") from None
    if not isinstance(result, dict) or result.get("format") != "scapre-jax-eval/1":
      raise ValueError(f"{path}: not an eval.json written by scapre-jax eval")
    results.append(result)
  text = report.table(report.combine(results))
  if args.out:
    outputs.check_output(pathlib.Path(args.out), overwrite=args.overwrite)
    outputs.atomic_file(pathlib.Path(args.out), args.overwrite,
                        lambda tmp: pathlib.Path(tmp).write_text(text, "utf-8"))
  print(text, end="")
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  where = f"scapre-jax {args.command}"
  interrupted = []

  def on_sigint(signum, frame):
    interrupted.append(signum)
    raise KeyboardInterrupt

  def stop() -> None:
    # JAX can swallow the KeyboardInterrupt (raised inside a garbage
    # collector callback, "Exception ignored in ..."); the flag remains.
    if interrupted:
      raise KeyboardInterrupt

  def show_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message)
    if text not in shown:  # the same warning from two call sites: once
      shown.add(text)
      print(f"{where}: warning: {text}", file=sys.stderr, flush=True)

  shown: set[str] = set()
  previous = signal.getsignal(signal.SIGINT)
  with warnings.catch_warnings():
    warnings.showwarning = show_warning
    try:
      signal.signal(signal.SIGINT, on_sigint)
      return _command(args, stop)
    except KeyboardInterrupt:
      kept = (" (finished sets are kept; a rerun skips them)"
              if args.command == "erase" and args.sets else
              " (rendered images are kept; a rerun resumes)"
              if args.command == "eval" else "")
      print(f"{where}: interrupted; nothing half-written was left{kept}",
            file=sys.stderr, flush=True)
      return 130
    except (ValueError, OSError) as err:
      print(f"{where}: error: {err}", file=sys.stderr, flush=True)
      return 2
    finally:
      signal.signal(signal.SIGINT, previous)


def _command(args, stop) -> int:
  if args.command == "erase":
    return _erase(args, stop)  # checks its arguments before loading model code
  if args.command == "inspect":
    return _inspect(args)  # reads one file: no model code
  if args.command == "verify":
    return _verify(args)
  if args.command == "generate":
    return _generate(args)
  if args.command == "eval":
    return _eval(args, stop)
  if args.command == "eval-table":
    return _eval_table(args)
  if args.command == "tiny":
    return _tiny(args)
  if args.command == "apply":
    return _apply(args)
  from scapre_jax import console
  console.quiet_library_logs()
  if args.command == "convert":
    from scapre_jax import single_file
    print(single_file.run(single_file.ConvertConfig(
        src=args.src, dst=pathlib.Path(args.dst), config=args.config,
        tokenizer=args.tokenizer, prediction_type=args.prediction_type,
        overwrite=args.overwrite)))
    return 0
  raise AssertionError(args.command)


if __name__ == "__main__":
  sys.exit(main())
