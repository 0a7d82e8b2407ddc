r"""An interactive demo (Gradio, the Hub's demo convention): upload a scan, pick a center or "auto", see the mask.

    python recipes/app.py --base_model outputs/demo/base --adapters outputs/demo/center-flair_1p5t    # make app

Upload a PNG/JPEG/TIFF image or a NIfTI volume (a slider picks the slice shown), choose a center's adapter, the base
or "auto" (routing by center signatures), and get the overlay, the route with its distance, and the mask to download
(PNG at the upload's size, or NIfTI with its affine). The same function answers the API (`api_name="/segment"`), so
`gradio_client.Client(url).predict(handle_file("scan.png"), "auto", 50, api_name="/segment")` works too.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from peft_medseg.prediction import AUTO, Predictor, ScanInput, read_scan, write_mask
from peft_medseg.prediction.scans import IMAGE_SUFFIXES, NIFTI_SUFFIXES
from peft_medseg.prediction.writer import overlay_slice
from peft_medseg.routing import SIGNATURE_FILENAME
from peft_medseg.training.cli import parse_arguments, run_recipe

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a hospital network


@dataclass
class AppArguments:
    """The base and adapters the app serves, and where it listens."""

    base_model: str = field(metadata={"help": "Folder or Hub id of the base model."})
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "Adapter folders / Hub ids, or a folder of adapter folders."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0 for the network)."})
    port: int = field(default=7860, metadata={"help": "Port to listen on."})


def build_app(predictor: Predictor):
    """The Gradio Blocks of the demo around `predictor` (one endpoint, `/segment`)."""
    import gradio as gr
    import numpy as np

    from peft_medseg.plots import label_colours, overlay_image

    downloads = Path(tempfile.mkdtemp(prefix="peft_medseg_app-"))

    def segment(upload: str, route: str, slice_percent: float):
        if not upload:
            raise gr.Error("Upload a PNG, JPEG, TIFF or NIfTI scan first.")
        path = Path(upload)
        name = path.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            scan_input = ScanInput("mask", "nifti", [path])
        elif name.endswith(IMAGE_SUFFIXES):
            scan_input = ScanInput("mask", "image", [path])
        else:
            raise gr.Error(f"{path.name}: expected {', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}.")
        try:
            (prediction,) = predictor.predict([read_scan(scan_input)], route=route)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        if prediction.scan.is_volume:
            depth = prediction.mask.shape[-1]
            z = min(depth - 1, int(round(slice_percent / 100 * (depth - 1))))
            image, mask = prediction.scan.array[0][..., z], prediction.mask[..., z]
            where = f" (slice {z} of {depth})"
        else:
            image, mask, where = overlay_slice(prediction)
        overlay = overlay_image(image, mask, predictor.num_labels)
        scale = max(1, 384 // max(overlay.shape[:2]))  # small model inputs: enlarge (nearest) so a pixel can be seen
        overlay = overlay.repeat(scale, axis=0).repeat(scale, axis=1)
        folder = Path(tempfile.mkdtemp(dir=downloads))
        mask_path = write_mask(prediction.scan, prediction.mask, folder)
        text = f"route: {prediction.route}{where}"
        if prediction.distance is not None:
            verdict = "rejected -> base" if prediction.route != prediction.nearest else "accepted"
            text += (
                f"\nnearest center: {prediction.nearest}, distance {prediction.distance:.3f} "
                f"({prediction.calibrated_distance:.2f} x its threshold: {verdict})"
            )
        sizes = np.bincount(prediction.mask.ravel(), minlength=predictor.num_labels)
        text += "\n" + ", ".join(
            f"{predictor.id2label.get(k, k)}: {int(sizes[k])} px" for k in range(1, predictor.num_labels)
        )
        return overlay, text, str(mask_path)

    colours = label_colours(predictor.num_labels)
    legend = " ".join(
        f'<span style="display:inline-block;width:0.9em;height:0.9em;background:rgb'
        f'{tuple(int(255 * c) for c in colours[k][:3])}"></span> {predictor.id2label.get(k, k)}'
        for k in range(1, predictor.num_labels)
    )
    with gr.Blocks(title="peft_medseg") as app:
        gr.Markdown("# peft_medseg: one frozen base, one adapter per center")
        gr.HTML(f"<div>Classes: {legend}</div>")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="scan (PNG, JPEG, TIFF or NIfTI)", type="filepath")
                route = gr.Dropdown(predictor.routes, value=predictor.routes[0], label="center")
                slice_percent = gr.Slider(0, 100, value=50, step=1, label="slice of a volume (%)")
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                overlay = gr.Image(label="overlay", type="numpy", height=400)
                route_text = gr.Textbox(label="route", lines=3)
                mask_file = gr.File(label="mask")
        button.click(segment, [upload, route, slice_percent], [overlay, route_text, mask_file], api_name="segment")
    return app


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_arguments((AppArguments,), argv, description=__doc__)
    from peft_medseg.prediction import expand_adapters

    adapters = expand_adapters(args.adapters)
    routable = adapters and all((Path(a) / SIGNATURE_FILENAME).is_file() for a in adapters.values())
    # "auto" when every adapter has its signature; otherwise a center must be picked in the app.
    route = AUTO if routable else next(iter(adapters), None)
    predictor = Predictor(args.base_model, args.adapters, route=route)
    build_app(predictor).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    run_recipe(main)
