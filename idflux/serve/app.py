"""``idflux serve``: the layout page (Gradio) over the same :class:`IDFluxPipeline` as ``idflux generate``.

Up to four reference photos (each shown with its detected face outlined in the person's colour, or
a message when none is found), a canvas at the output size on which one box per reference is drawn
with the mouse (``gradio_image_annotation``; none: every reference on the whole image), the boxes
listed as numbers and editable there, the prompt and settings; the result beside the layout with
the boxes drawn, the PNG and its JSON sidecar to download, a progress bar per denoising step.
Requests are queued one at a time; bad input is a message on the page, never a dead server.
The rules live in :mod:`idflux.serve.layout` (plain functions, tested without a browser).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from idflux.serve import layout

_DEFAULTS = {"tiny": {"size": 128, "steps": 8}, "flux-dev": {"size": 1024, "steps": 25}}


class LayoutServer:
    """The page's handlers over ``pipe`` (an :class:`IDFluxPipeline`): plain methods, so they can be
    called without a browser; :meth:`build` wires them into a ``gr.Blocks``."""

    def __init__(self, pipe, *, preset: str = "tiny", out_dir: str | os.PathLike | None = None):
        self.pipe = pipe
        self.preset = preset
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="idflux-serve-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.defaults = _DEFAULTS.get(preset, _DEFAULTS["flux-dev"])

    # -- handlers (no Gradio types in or out, except errors raised as gr.Error by the wrappers) -----

    def describe_reference(self, path, index: int) -> tuple[np.ndarray | None, str]:
        """A reference upload -> (the photo with its face outlined in the person's colour, a message).
        No file: (None, ""). ValueError for a file that is not an image or holds no face."""
        from PIL import Image, ImageDraw

        from idflux.engine.diffusers_pipeline import read_reference_image

        if path is None:
            return None, ""
        name = f"reference {index + 1} ({Path(str(path)).name})"
        image = read_reference_image(path, name)
        face = self._face(image, name)
        out = Image.fromarray(image)
        draw = ImageDraw.Draw(out)
        thickness = max(2, min(out.size) // 64)
        draw.rectangle(face.box, outline=layout.COLOURS[index % len(layout.COLOURS)], width=thickness)
        x1, y1, x2, y2 = (int(round(c)) for c in face.box)
        return np.asarray(out), f"{layout.person_label(index)}: face at [{x1}, {y1}, {x2}, {y2}]"

    def _face(self, image: np.ndarray, name: str):
        detector = getattr(self.pipe, "face_detector", None)
        if detector is None:
            raise ValueError("the pipeline has no face detector; start idflux serve with --face-models DIR")
        try:
            return detector.reference_face(image)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None

    def generate(self, prompt, ref_paths, annotation, height, width, steps, guidance, seed, id_weight, siglip_weight,
                 progress=None) -> tuple[np.ndarray, list[str], dict]:
        """Page state -> (the image with the boxes drawn, [PNG path, JSON path], the sidecar dict).

        ``ref_paths``: the four upload slots (None where empty; the filled ones, left to right, are the
        references in box order). ``progress``: called as ``progress(done, total)`` after each step.
        ValueError naming the field for bad input, before any denoising."""
        import torch

        from idflux.engine.diffusers_pipeline import read_reference_image
        from idflux.engine.pipeline import draw_boxes, sidecar_path

        filled = [(i, p) for i, p in enumerate(ref_paths) if p is not None]
        labels = [f"reference {i + 1} ({Path(str(p)).name})" for i, p in filled]
        refs = [read_reference_image(p, label) for (_, p), label in zip(filled, labels)]
        boxes = layout.boxes_from_annotation(annotation)
        settings = layout.page_settings(prompt=prompt, n_refs=len(refs), boxes=boxes, height=height, width=width,
                                        steps=steps, guidance=guidance, seed=seed, id_weight=id_weight,
                                        siglip_weight=siglip_weight)
        for label, image in zip(labels, refs):
            self._face(image, label)
        total = settings["num_inference_steps"]

        def on_step(pipe, step, timestep, kwargs):
            if progress is not None:
                progress(step + 1, total)
            return {}

        kwargs = {k: v for k, v in settings.items() if k != "seed"}
        out = self.pipe(ref_images=refs, generator=torch.Generator().manual_seed(settings["seed"]),
                        callback_on_step_end=on_step, **kwargs)
        image = out.images[0]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        png = self.out_dir / f"idflux-{stamp}-{time.monotonic_ns() % 10 ** 6:06d}-seed{settings['seed']}.png"
        image.save(png)
        names = [Path(str(p)).name for _, p in filled]
        meta = layout.sidecar(settings, out.settings[0], names, self.preset, getattr(self.pipe, "source", None), png.name)
        sidecar_path(png).write_text(json.dumps(meta, indent=1, default=str))
        shown = draw_boxes(image, settings["boxes"], settings["prompt"])
        return np.asarray(shown), [str(png), str(sidecar_path(png))], meta

    # -- the page ----------------------------------------------------------------------------------

    def build(self):
        """The ``gr.Blocks`` page (queue: one generation at a time, the rest wait their turn)."""
        import gradio as gr
        from gradio_image_annotation import image_annotator

        size, steps = self.defaults["size"], self.defaults["steps"]

        def reference_handler(index):
            def handler(path):
                try:
                    image, message = self.describe_reference(path, index)
                except ValueError as exc:
                    gr.Warning(str(exc))
                    return None, f"**{layout.person_label(index)}:** {exc}"
                return image, message
            return handler

        def canvas_for(height, width, annotation):
            try:
                canvas = layout.canvas_image(height, width)
            except ValueError as exc:
                raise gr.Error(str(exc))
            boxes = layout.boxes_from_annotation(annotation)
            return layout.annotation_value(canvas, boxes)

        def table_for(annotation):
            try:
                return layout.box_rows(layout.boxes_from_annotation(annotation))
            except ValueError as exc:
                raise gr.Error(str(exc))

        def apply_table(rows, height, width):
            try:
                boxes = layout.boxes_from_table(rows)
                return layout.annotation_value(layout.canvas_image(height, width), boxes)
            except ValueError as exc:
                raise gr.Error(str(exc))

        def clear_boxes(height, width):
            return layout.annotation_value(layout.canvas_image(height, width), [])

        def generate(prompt, r1, r2, r3, r4, annotation, height, width, steps, guidance, seed, id_weight, siglip_weight,
                     progress=gr.Progress()):
            def report(done, total):
                progress((done, total), desc=f"denoising step {done}/{total}")
            try:
                return self.generate(prompt, [r1, r2, r3, r4], annotation, height, width, steps, guidance, seed,
                                     id_weight, siglip_weight, progress=report)
            except ValueError as exc:
                raise gr.Error(str(exc))

        with gr.Blocks(title="idflux: place identities") as demo:
            gr.Markdown("## idflux: place identities\nUpload one reference photo per person (up to four), draw one "
                        "box per reference on the canvas in reference order (no box: every reference on the whole "
                        "image), write a prompt and generate.")
            with gr.Row():
                refs, previews, notes = [], [], []
                for i in range(4):
                    with gr.Column(min_width=140):
                        refs.append(gr.File(label=f"Reference {i + 1}: {layout.person_label(i)}", file_types=["image"],
                                            type="filepath", elem_id=f"ref{i + 1}", height=90))
                        previews.append(gr.Image(label=f"detected face {i + 1}", interactive=False, height=130,
                                                 elem_id=f"face{i + 1}"))
                        notes.append(gr.Markdown("", elem_id=f"face{i + 1}-note"))
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        width = gr.Number(value=size, label="width (px, multiple of 16)", precision=0, elem_id="width")
                        height = gr.Number(value=size, label="height (px, multiple of 16)", precision=0,
                                           elem_id="height")
                    canvas = image_annotator(value=layout.annotation_value(layout.canvas_image(size, size), []),
                                             label="layout: drag on the canvas to draw a box per reference",
                                             label_list=[layout.person_label(i) for i in range(4)],
                                             label_colors=list(layout.COLOURS), disable_edit_boxes=True,
                                             sources=[], box_min_size=layout.MIN_BOX, show_clear_button=False,
                                             show_download_button=False, show_share_button=False, height=420,
                                             elem_id="canvas")
                    table = gr.Dataframe(headers=["person", "x1", "y1", "x2", "y2"],
                                         datatype=["str", "number", "number", "number", "number"],
                                         value=[], interactive=True, label="boxes (pixels; edit, then apply)",
                                         elem_id="boxes")
                    with gr.Row():
                        apply_btn = gr.Button("apply numbers to the canvas", elem_id="apply")
                        clear_btn = gr.Button("remove all boxes", elem_id="clear")
                    prompt = gr.Textbox(label="prompt", value="two people in a park", elem_id="prompt")
                    with gr.Row():
                        steps_in = gr.Number(value=steps, label="steps", precision=0, minimum=1, maximum=200,
                                             elem_id="steps")
                        guidance = gr.Number(value=4.0, label="guidance", elem_id="guidance")
                        seed = gr.Number(value=1234, label="seed", precision=0, minimum=0, elem_id="seed")
                    with gr.Row():
                        id_weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="identity weight (ArcFace)",
                                              elem_id="id_weight")
                        siglip_weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="identity weight (SigLIP)",
                                                  elem_id="siglip_weight")
                    go = gr.Button("generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    result = gr.Image(label="result (boxes drawn)", interactive=False, elem_id="result")
                    files = gr.File(label="download: PNG and its JSON sidecar", file_count="multiple",
                                    interactive=False, elem_id="downloads")
                    meta = gr.JSON(label="settings (the sidecar)", elem_id="sidecar")
            gr.Markdown(f"Colours: {', '.join(layout.person_label(i) for i in range(4))}. Outputs are written to "
                        f"`{self.out_dir}`; the sidecar's `command` reproduces the image with `idflux generate`.")

            for i in range(4):
                refs[i].change(reference_handler(i), refs[i], [previews[i], notes[i]])
            for field in (width, height):
                field.submit(canvas_for, [height, width, canvas], canvas)
                field.blur(canvas_for, [height, width, canvas], canvas)
            canvas.change(table_for, canvas, table)
            apply_btn.click(apply_table, [table, height, width], canvas)
            clear_btn.click(clear_boxes, [height, width], canvas)
            go.click(generate, [prompt, *refs, canvas, height, width, steps_in, guidance, seed, id_weight, siglip_weight],
                     [result, files, meta], concurrency_limit=1, concurrency_id="generate")
        demo.queue(default_concurrency_limit=1)
        return demo


# -- CLI ---------------------------------------------------------------------------------------------

def port_int(text: str) -> int:
    from idflux.engine.cli import parse_number

    value = parse_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {value}")
    return value


def add_serve_parser(sub) -> argparse.ArgumentParser:
    from idflux.engine.cli import HelpFormatter, add_model_arguments
    from idflux.engine.loading import add_weight_arguments

    p = sub.add_parser("serve", help="a web page to place identities: upload faces, draw their boxes, generate",
                       description="A Gradio page over the same pipeline as `idflux generate`: up to four reference "
                                   "photos (faces detected and shown), one box per reference drawn on a canvas at the "
                                   "output size, prompt and settings; the result with its boxes, the PNG and its JSON "
                                   "sidecar to download. Requests run one at a time.",
                       epilog="examples:\n  idflux serve --preset tiny\n"
                              "  idflux serve --flux FLUX.1-dev/ --adapter withanyone.safetensors --face-models "
                              "antelopev2/ --siglip siglip-base-patch16-256-i18n/ --fp8 --port 7860",
                       formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_int, default=7860, help="TCP port")
    p.add_argument("--out-dir", metavar="DIR", help="where generated PNGs and sidecars go (default: a new temp folder)")
    add_weight_arguments(p)
    p.set_defaults(func=run_serve, cuda_graph=False)
    return p


def _fail(message: str) -> int:
    print(f"idflux serve: {message}", file=sys.stderr)
    return 2


def run_serve(args) -> int:
    from idflux.engine.cli import build, check_output_folder, missing_flux_dev_inputs

    if args.preset == "flux-dev":
        missing = missing_flux_dev_inputs(args)
        if missing:
            return _fail(f"--preset flux-dev (the default) needs {'; '.join(missing)} (local paths; nothing is "
                         "downloaded); to try the page on the CPU without weights, pass --preset tiny")
    try:
        import gradio  # noqa: F401
        import gradio_image_annotation  # noqa: F401
    except ImportError as exc:
        return _fail(f"{exc.name} is not installed; pip install 'idflux[serve]'")
    try:
        out_dir = check_output_folder(args.out_dir, "--out-dir") if args.out_dir else None
        pipe = build(args)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    demo = LayoutServer(pipe, preset=args.preset, out_dir=out_dir).build()
    print(f"idflux serve: {args.preset} preset on {args.device}; open http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, inbrowser=False, share=False)
    return 0
