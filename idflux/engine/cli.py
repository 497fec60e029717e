"""``idflux generate``: reference photos + prompt + one box per face -> image (+ settings JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected x1,y1,x2,y2 numbers") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected four numbers x1,y1,x2,y2")
    return values


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate an image with identities kept inside their boxes",
                       description="Reference photos (one person each), a prompt and one box per reference in, "
                                   "an image out, with a JSON of the settings used beside it.")
    p.add_argument("--prompt", help="text prompt (required unless --batch)")
    p.add_argument("--ref", action="append", default=[], help="reference photo, one per person, in box order (repeat)")
    p.add_argument("--box", action="append", type=_box, default=[],
                   help="x1,y1,x2,y2 in output pixels or all in 0..1, one per --ref (repeat)")
    p.add_argument("--out", help="output PNG (with --batch: output folder, images go to <out>/<id>/out.png)")
    p.add_argument("--batch", help="cases JSON (idflux eval --write-cases / MultiID-Bench layout)")
    p.add_argument("--preset", choices=("tiny", "flux-dev"), default="flux-dev",
                   help="tiny: random models built in code (CPU, seconds, no weights); flux-dev: real weights")
    p.add_argument("--flux", help="FLUX.1-dev diffusers folder (flux-dev preset)")
    p.add_argument("--flux-transformer", help="optional single BFL file flux1-dev.safetensors for the transformer")
    p.add_argument("--adapter", help="withanyone.safetensors (released) or an idflux adapter file")
    p.add_argument("--face-models", help="insightface antelopev2 folder (SCRFD + glintr100)")
    p.add_argument("--siglip", help="google/siglip-base-patch16-256-i18n folder")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--size", type=int, default=1024, help="output side in pixels, a multiple of 16 (default 1024)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--id-weight", type=float, default=1.0)
    p.add_argument("--siglip-weight", type=float, default=1.0)
    p.add_argument("--released-shift", action="store_true", help="released inference's time shift, for parity")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", action="store_true", help="low VRAM: text encoders and VAE on the CPU between stages")
    p.add_argument("--fp8", action="store_true", help="low VRAM: FLUX transformer weights stored in float8")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: capture the denoising step once in a CUDA graph and replay it at every step")
    p.set_defaults(func=run_generate)


def build(args):
    """(pipeline, detector, siglip) for the preset."""
    from idflux.engine.faces import FaceDetector, SiglipFaceEncoder, tiny_face_models
    from idflux.engine.pipeline import Pipeline

    if args.preset == "tiny":
        det, enc = tiny_face_models()
        return Pipeline.tiny(device=args.device, backend="auto", offload=args.offload, fp8=args.fp8,
                             cuda_graph=args.cuda_graph), det, enc
    missing = [name for name in ("flux", "adapter", "face_models", "siglip") if not getattr(args, name)]
    if missing:
        raise SystemExit(f"idflux generate --preset flux-dev needs {', '.join('--' + m.replace('_', '-') for m in missing)} "
                         "(local paths; nothing is downloaded)")
    from safetensors import safe_open

    from idflux.engine.adapter import IdentityAdapter, flux_dev_adapter
    from idflux.engine.loading import load_flux
    from idflux.engine.weights import load_adapter, load_released_adapter

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    parts = load_flux(args.flux, transformer_file=args.flux_transformer, dtype=dtype)
    with safe_open(args.adapter, framework="pt") as f:
        ours = (f.metadata() or {}).get("format") == "idflux-adapter"
    if ours:
        adapter = load_adapter(args.adapter)
    else:
        with torch.device("meta"):
            adapter = IdentityAdapter(flux_dev_adapter())
        load_released_adapter(adapter, args.adapter)
    pipe = Pipeline(parts, adapter, device=args.device, dtype=dtype, offload=args.offload, fp8=args.fp8,
                    cuda_graph=args.cuda_graph)
    enc = SiglipFaceEncoder.from_pretrained(args.siglip).to(args.device, dtype)
    return pipe, FaceDetector(args.face_models), enc


def _read_image(path):
    from PIL import Image

    if not Path(path).is_file():
        raise SystemExit(f"idflux generate: reference image {path} not found")
    with Image.open(path) as img:
        import numpy as np

        return np.array(img.convert("RGB"))


def _one(pipe, det, enc, *, prompt, refs, boxes, out, args, extra=None):
    from idflux.engine.faces import encode_references
    from idflux.engine.pipeline import GenerateSettings, save_generation

    arc, sig = encode_references([_read_image(r) for r in refs], det, enc)
    settings = GenerateSettings(prompt=prompt, boxes=[list(b) for b in boxes], size=args.size, steps=args.steps,
                                guidance=args.guidance, seed=args.seed, id_weight=args.id_weight,
                                siglip_weight=args.siglip_weight, released_shift=args.released_shift)
    image = pipe.generate(settings, arc, sig)
    return save_generation(image, settings, out, extra={"refs": [str(r) for r in refs], "preset": args.preset, **(extra or {})})


def run_generate(args) -> int:
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        print(f"idflux generate: --cuda-graph needs a CUDA device, got --device {args.device}; drop --cuda-graph",
              file=sys.stderr)
        return 2
    if args.batch:
        if not args.out:
            print("idflux generate --batch needs --out DIR", file=sys.stderr)
            return 2
        cases = json.loads(Path(args.batch).read_text())
        pipe, det, enc = build(args)
        for case in cases:
            boxes = case.get("boxes")
            if not boxes:
                print(f"idflux generate: case {case.get('id')} has no boxes; skipped", file=sys.stderr)
                continue
            path = _one(pipe, det, enc, prompt=case["prompt"], refs=case["refs"], boxes=boxes,
                        out=Path(args.out) / case.get("out", f"{case['id']}/out.png"), args=args, extra={"case": case.get("id")})
            print(f"wrote {path}")
        return 0
    if not (args.prompt and args.ref and args.out):
        print("idflux generate needs --prompt, at least one --ref with its --box, and --out (or --batch)", file=sys.stderr)
        return 2
    if len(args.box) != len(args.ref):
        print(f"idflux generate: {len(args.ref)} --ref but {len(args.box)} --box; give one box per reference", file=sys.stderr)
        return 2
    pipe, det, enc = build(args)
    try:
        path = _one(pipe, det, enc, prompt=args.prompt, refs=args.ref, boxes=args.box, out=args.out, args=args)
    except ValueError as exc:
        print(f"idflux generate: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0
