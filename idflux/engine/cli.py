"""``idflux generate`` (reference photos + prompt [+ one box per face] -> image, settings JSON, boxes
preview) and ``idflux export`` (training checkpoint -> adapter file): thin layers over
:class:`idflux.engine.IDFluxPipeline` and :func:`idflux.engine.export.export_adapter`.

Everything the user typed is checked before a model is built: numbers at parse time (argparse
types), then the output path, the reference images and the boxes; each problem is a one-line error
and exit status 2. Outputs: ``<out>`` (the image), ``<out>.json`` (e.g. ``o.png.json``: the
settings used) and ``<stem>.boxes.png`` (the boxes and the prompt drawn on the image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from idflux.engine.loading import MissingWeightsError, add_weight_arguments, resolve_flux_sources

_PRESET_SIZE = {"tiny": 64, "flux-dev": 1024}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help; descriptions and epilogs kept as written."""


# -- argparse types: a bad value is a one-line error at parse time --------------------------------------

def parse_number(text: str, kind=int):
    """``kind(text)`` (int or float), or the argparse error that says what ``text`` is not."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    value = parse_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    value = parse_number(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^63), got {value}")
    return value


def finite_float(text: str) -> float:
    value = parse_number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def pixels(text: str) -> int:
    value = positive_int(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 pixels, got {value} (e.g. {max(16, value // 16 * 16)})")
    return value


def box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected x1,y1,x2,y2 numbers") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected four numbers x1,y1,x2,y2")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: coordinates must be finite (pixels, or all in 0..1)")
    return values


def device(text: str) -> str:
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s)")
    return text


# -- output checks, before any work -----------------------------------------------------------------

def check_output_file(out: str | os.PathLike, flag: str = "--out", *, extensions: tuple[str, ...] | None = None) -> Path:
    """``out`` as a file to be written: an image extension PIL can save (or one of ``extensions``),
    not an existing folder, in a folder that exists or can be created and is writable. ValueError
    naming ``flag`` otherwise. Creates nothing."""
    path = Path(out).expanduser()
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        raise ValueError(f"{flag} {out} is a folder; give a file name such as {Path(out) / 'out.png'}")
    ext = path.suffix.lower()
    if extensions is not None:
        if ext not in extensions:
            raise ValueError(f"{flag} {out}: the file name must end with {' or '.join(extensions)}")
    else:
        from PIL import Image

        Image.init()
        fmt = Image.registered_extensions().get(ext)
        if fmt is None or fmt not in Image.SAVE:
            raise ValueError(f"{flag} {out}: {ext or 'no extension'} is not an image format PIL can write; "
                             "end the name with .png, .jpg or .webp")
    _check_writable_folder(path.parent, flag, out)
    return path


def check_output_folder(out: str | os.PathLike, flag: str = "--out") -> Path:
    """``out`` as a folder to write into: an existing writable folder or one that can be created."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {out} is a file; with --batch give a folder")
    _check_writable_folder(path, flag, out)
    return path


def _check_writable_folder(folder: Path, flag: str, out) -> None:
    probe = folder if str(folder) else Path(".")
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: the folder {probe} is not writable")


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refusing absolute paths and any that leave ``root`` (``..``, links)."""
    if not relative or Path(relative).is_absolute() or Path(relative).drive:
        raise ValueError(f"{what} {relative!r} must be a relative path inside --out")
    target = (root / relative).resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise ValueError(f"{what} {relative!r} leaves --out {root}; keep case outputs inside it")
    return root / relative


# -- generate ----------------------------------------------------------------------------------------

_GENERATE_EPILOG = """\
outputs: OUT (the image), OUT.json (e.g. o.png.json: the settings used, references, seed, timing)
and STEM.boxes.png (the image with the boxes and the prompt drawn).

examples:
  idflux generate --preset tiny --prompt "two people" --ref a.png --ref b.png \\
      --box 0,0,32,64 --box 32,0,64,64 --out out/two.png
  idflux generate --flux FLUX.1-dev/ --adapter withanyone.safetensors --face-models antelopev2/ \\
      --siglip siglip-base-patch16-256-i18n/ --prompt "a person in a park" --ref me.jpg \\
      --height 768 --width 1024 --out park.png
"""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The preset, the identity models and the device: the options `generate` and `serve` share
    (the weight sources are :func:`idflux.engine.loading.add_weight_arguments`)."""
    p.add_argument("--preset", choices=("tiny", "flux-dev"), default="flux-dev",
                   help="flux-dev: real weights (--flux, --adapter, --face-models, --siglip); tiny: small models, CPU, "
                        "seconds, no downloads (the shipped tiny world when built, --flux random for random models, "
                        "--flux DIR for another world folder)")
    p.add_argument("--adapter", metavar="FILE",
                   help="idflux adapter file (idflux export; both presets) or the released withanyone.safetensors "
                        "(flux-dev); tiny without it: the preset's own adapter")
    p.add_argument("--face-models", metavar="DIR", help="insightface antelopev2 folder (SCRFD + glintr100; flux-dev)")
    p.add_argument("--siglip", metavar="DIR", help="google/siglip-base-patch16-256-i18n folder (flux-dev)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")


def add_generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate an image with identities kept inside their boxes",
                       description="Reference photos (one person each), a prompt and optionally one box per reference "
                                   "in; an image out, with a JSON of the settings used and a preview of the boxes "
                                   "beside it. Without --box every reference applies to the whole image.",
                       epilog=_GENERATE_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--prompt", help="text prompt (required unless --batch)")
    p.add_argument("--ref", action="append", default=[], metavar="IMAGE",
                   help="reference photo, one person each, in box order (repeat, up to 4)")
    p.add_argument("--box", action="append", type=box, default=[], metavar="X1,Y1,X2,Y2",
                   help="box of the matching --ref in output pixels, or all in 0..1 (repeat); none: every reference "
                        "on the whole image")
    p.add_argument("--out", help="output image (.png, .jpg, ...); with --batch an output folder, case images go to "
                                 "<out>/<case out> (default <id>/out.png)")
    p.add_argument("--batch", metavar="CASES.json",
                   help="cases JSON (idflux eval --write-cases / MultiID-Bench layout): one image per case")
    add_model_arguments(p)
    p.add_argument("--steps", type=positive_int, default=25, help="denoising steps (>= 1)")
    p.add_argument("--guidance", type=finite_float, default=4.0, help="FLUX guidance embedding (finite)")
    p.add_argument("--size", type=pixels, default=None,
                   help="square output side in pixels, a multiple of 16 (default: 1024 for flux-dev; tiny: the tiny world's size, 192, or 64 with --flux random)")
    p.add_argument("--height", type=pixels, default=None, help="output height in pixels, a multiple of 16 (default: --size)")
    p.add_argument("--width", type=pixels, default=None, help="output width in pixels, a multiple of 16 (default: --size)")
    p.add_argument("--seed", type=seed_int, default=1234, help="seed of the initial noise (>= 0)")
    p.add_argument("--id-weight", type=finite_float, default=1.0, help="scale of the ArcFace branch (0 turns it off)")
    p.add_argument("--siglip-weight", type=finite_float, default=1.0, help="scale of the SigLIP branch (0 turns it off)")
    p.add_argument("--released-shift", action="store_true",
                   help="the released inference's time shift ((W/8)(H/8)//256 tokens), for parity with its images")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: capture the denoising step once in a CUDA graph and replay it at every step")
    p.add_argument("--no-preview", action="store_true", help="do not write the STEM.boxes.png preview")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace (DIR/generate_trace.json, Perfetto) with "
                                                   "ranges per block, adapter block and kernel, and DIR/generate_top.txt")
    add_weight_arguments(p)
    p.set_defaults(func=run_generate)
    return p


def _fail(message: str) -> int:
    print(f"idflux generate: {message}", file=sys.stderr)
    return 2


def _default_size(args) -> int:
    """The preset's side: the tiny world's training size when the world is used, else the table's."""
    if args.preset == "tiny" and args.flux != "random":
        from idflux.engine.loading import TINY_WORLD, tiny_world_available

        root = Path(args.flux) if args.flux else TINY_WORLD
        if tiny_world_available(root):
            manifest = json.loads((root / "manifest.json").read_text())
            return int(manifest.get("world", {}).get("size", _PRESET_SIZE["tiny"]))
    return _PRESET_SIZE[args.preset]


def _hw(args) -> tuple[int, int]:
    size = args.size or _default_size(args)
    return args.height or size, args.width or size


def missing_flux_dev_inputs(args) -> list[str]:
    """Everything the flux-dev preset needs that is not there (all of it, in one list; nothing read)."""
    needs = (("--adapter FILE", args.adapter), ("--face-models DIR", args.face_models), ("--siglip DIR", args.siglip))
    missing = [flag for flag, value in needs if not value]
    if not any((args.flux, args.transformer, args.ae, args.clip, args.t5)):
        return ["--flux DIR|HUB_ID (FLUX.1-dev weights)"] + missing
    try:
        resolve_flux_sources(args.flux, transformer=args.transformer, ae=args.ae, clip=args.clip, t5=args.t5)
    except (MissingWeightsError, ValueError) as exc:
        missing.insert(0, str(exc))
    return missing


def build(args):
    """The :class:`IDFluxPipeline` for the parsed arguments (raises ValueError / FileNotFoundError)."""
    from idflux.engine.diffusers_pipeline import IDFluxPipeline

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    common = dict(adapter=args.adapter, face_models=args.face_models, siglip=args.siglip, torch_dtype=dtype,
                  fp8=args.fp8, offload=args.offload, group_offload=args.group_offload, device=dev,
                  cuda_graph=args.cuda_graph, lora=args.lora or None)
    if args.preset == "tiny":
        if any((args.transformer, args.ae, args.clip, args.t5)):
            raise ValueError("--transformer/--ae/--clip/--t5 are FLUX.1-dev weights; the tiny preset takes --flux random "
                             "or --flux WORLD_DIR only")
        random_only = args.flux == "random"
        return IDFluxPipeline.from_pretrained("tiny-random" if random_only else "tiny",
                                              tiny_world=None if random_only else args.flux, **common)
    return IDFluxPipeline.from_pretrained(args.flux, transformer=args.transformer, ae=args.ae, clip=args.clip, t5=args.t5,
                                          **common)


def _read_refs(paths, base: Path | None = None) -> list:
    from idflux.engine.diffusers_pipeline import read_reference_image

    images = []
    for i, ref in enumerate(paths):
        path = Path(ref)
        if not path.is_absolute() and base is not None and not path.exists() and (base / path).exists():
            path = base / path
        images.append(read_reference_image(path, f"--ref {ref}" if base is None else f"refs[{i}] ({ref})"))
    return images


def _check_boxes(boxes, n_refs: int, height: int, width: int):
    from idflux.engine.regions import parse_boxes

    if not boxes:
        return None
    if len(boxes) != n_refs:
        raise ValueError(f"{n_refs} --ref but {len(boxes)} --box; give one box per reference, or no --box to put "
                         "every reference on the whole image")
    parse_boxes(boxes, n_refs, height, width)
    return [list(map(float, b)) for b in boxes]


def _generate_one(pipe, args, *, prompt: str, refs: list, ref_names: list, boxes, out: Path, extra: dict) -> Path:
    from idflux.engine.pipeline import boxes_path, draw_boxes, sidecar_path
    from idflux.engine.regions import parse_boxes

    height, width = _hw(args)
    result = pipe(prompt, ref_images=refs, boxes=boxes, height=height, width=width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                  id_weight=args.id_weight, siglip_weight=args.siglip_weight, released_shift=args.released_shift)
    image = result.images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    meta = {**result.settings[0], "refs": [str(r) for r in ref_names], "preset": args.preset, "device": str(args.device),
            "adapter": args.adapter, "flux": args.flux, "lora": [list(x) for x in args.lora], "image": out.name, **extra}
    if not args.no_preview:
        pixel_boxes = None if boxes is None else parse_boxes(boxes, len(refs), height, width)
        draw_boxes(image, pixel_boxes, prompt).save(boxes_path(out))
        meta["boxes_preview"] = boxes_path(out).name
    sidecar_path(out).write_text(json.dumps(meta, indent=1, default=str))
    return out


def run_generate(args) -> int:
    if getattr(args, "profile", None):  # the whole command under torch.profiler (idflux.engine.profiling)
        from idflux.engine.profiling import run_profiled

        return run_profiled(run_generate, args, "generate")
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        return _fail(f"--cuda-graph needs a CUDA device, got --device {args.device}; drop --cuda-graph")
    if args.preset == "flux-dev":
        missing = missing_flux_dev_inputs(args)
        if missing:
            return _fail(f"--preset flux-dev (the default) needs {'; '.join(missing)} (local paths; nothing is "
                         "downloaded); to try it on the CPU without weights, pass --preset tiny")
    if args.batch:
        return _run_batch(args)
    if not (args.prompt and args.ref and args.out):
        return _fail("needs --prompt, at least one --ref (one box each via --box, or none) and --out (or --batch)")
    height, width = _hw(args)
    try:
        out = check_output_file(args.out)
        refs = _read_refs(args.ref)
        boxes = _check_boxes(args.box, len(args.ref), height, width)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        pipe = build(args)
        _generate_one(pipe, args, prompt=args.prompt, refs=refs, ref_names=args.ref, boxes=boxes, out=out, extra={})
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(f"wrote {out}, {out.name}.json" + ("" if args.no_preview else f" and {out.stem}.boxes.png"))
    return 0


def _load_cases(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--batch {path} not found")
    try:
        cases = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--batch {path} is not JSON ({exc})") from None
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise ValueError(f"--batch {path} must hold a JSON list of case objects (idflux eval --write-cases)")
    return cases


def _run_batch(args) -> int:
    """One image per case; a bad case is reported and skipped, the rest go on (exit 1 if any failed)."""
    if not args.out:
        return _fail("--batch needs --out DIR")
    try:
        root = check_output_folder(args.out)
        cases = _load_cases(args.batch)
    except ValueError as exc:
        return _fail(str(exc))
    height, width = _hw(args)
    base = Path(args.batch).parent
    prepared, failed = [], []
    for k, case in enumerate(cases):
        name = str(case.get("id", f"#{k}"))
        try:
            if not isinstance(case.get("prompt"), str) or not case.get("refs"):
                raise ValueError("needs a 'prompt' string and a non-empty 'refs' list")
            rel = case.get("out") or f"{case.get('id', k)}/out.png"
            out = check_output_file(inside(root, str(rel), "'out'" if case.get("out") else "'id'"), "out")
            refs = _read_refs(case["refs"], base)
            boxes = _check_boxes(case.get("boxes"), len(refs), height, width)
            prepared.append((name, case, out, refs, boxes))
        except ValueError as exc:
            failed.append(name)
            print(f"idflux generate: case {name}: {exc}; skipped", file=sys.stderr)
    if prepared:
        try:
            pipe = build(args)
        except (ValueError, FileNotFoundError) as exc:
            return _fail(str(exc))
        for name, case, out, refs, boxes in prepared:
            try:
                _generate_one(pipe, args, prompt=case["prompt"], refs=refs, ref_names=case["refs"], boxes=boxes, out=out,
                              extra={"case": case.get("id")})
                print(f"wrote {out}")
            except (ValueError, OSError) as exc:
                failed.append(name)
                print(f"idflux generate: case {name}: {exc}; skipped", file=sys.stderr)
    if failed:
        print(f"idflux generate: {len(failed)} of {len(cases)} cases failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# -- export ------------------------------------------------------------------------------------------

def add_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="training checkpoint -> adapter file for generate",
                       description="Write the adapter of a training checkpoint (a run folder: its latest checkpoint; or "
                                   "one checkpoints/step_N folder) as one idflux adapter file (weights + config in "
                                   "its metadata) that `idflux generate --adapter` and "
                                   "IDFluxPipeline.from_pretrained(adapter=...) load.",
                       epilog="example:\n  idflux export runs/tiny --out tiny_adapter.safetensors",
                       formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR_OR_RUN", help="run folder (idflux train --out) or checkpoint folder")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="--ema: the EMA weights (error if the run kept none); --no-ema: the raw weights; "
                        "default (None): EMA when the checkpoint has it")
    p.set_defaults(func=run_export)
    return p


def run_export(args) -> int:
    from idflux.engine.export import export_adapter

    try:
        out = check_output_file(args.out, "--out", extensions=(".safetensors",))
        summary = export_adapter(args.checkpoint, out, ema=args.ema)
    except (ValueError, FileNotFoundError) as exc:
        print(f"idflux export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({summary['weights']} weights of {summary['checkpoint']})")
    return 0
