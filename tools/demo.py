#!/usr/bin/env python
"""Run a trained DETR, Deformable DETR or DINO on images or videos and draw its detections.

    python tools/demo.py --config-file CFG --input PATH [PATH ...] --output DIR \\
        [--confidence-threshold 0.5] [--batch-size 4] [--draw-scale 1] [[--opts] KEY VALUE ...]

PATH: image files, folders (the images directly inside), glob patterns (quote them), or
videos (.mp4, .avi). Into DIR go, for each image, ``<name>.png`` with the detections
scoring at least the threshold drawn by detectron2's Visualizer; for each video, the
annotated video (same container, frame count and frame rate); and one
``predictions.json`` for the run: COCO-style records {"file_name", "category_id",
"category_name", "bbox": [x, y, w, h] (pixels of the original image), "score"} (plus
"frame", from 0, for video frames; with a MODEL.MASK_ON model the masks are drawn too and
each record has "segmentation", the mask as COCO compressed RLE). Class names and category ids come from the metadata
of the config's datasets (DATASETS.TRAIN, then DATASETS.TEST).

With a MODEL.DETR.PANOPTIC_ON model, ``<name>.png`` draws the panoptic segmentation instead
(detectron2's ``Visualizer.draw_panoptic_seg``: stuff labelled by class, things by class and
score; the segments are those of MODEL.DETR.PANOPTIC_THRESHOLD, not of
--confidence-threshold), ``<name>_segments.png`` holds the segment ids (COCO-panoptic PNG:
id = R + 256 G + 256^2 B, 0 = no segment) and ``panoptic.json`` lists, per image,
{"file_name", "segments_file", "segments_info": [{"id", "category_id" (the dataset's id),
"category_name", "isthing", "score", "area"}]} under "annotations". Video frames are drawn
the same way (no per-frame PNGs).

Images may be grayscale, palette, RGBA or 16-bit and carry an EXIF orientation (drawn
upright); images larger than 4096 px are drawn scaled down (predictions.json keeps the
original pixels). MODEL.WEIGHTS is read without running code from the file (tensors /
NumPy arrays only) unless ``--trust-pickle`` is given.

Exit status: 0; 1 if some input could not be read (each is reported, the others are
processed); 2 on a setup problem (config, weights, datasets), reported in one line.
"""
import logging
import os
import sys

import detr_d2  # noqa: F401  (first: compat fixes, registers Detr)
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.video_visualizer import VideoVisualizer
from tqdm import tqdm

from detr_d2.engine import build_config
from detr_d2.utils.inputs import (
    InputFailure,
    OutputPaths,
    UnreadableInput,
    batched,
    expand_inputs,
    frame_in_format,
    is_video,
    open_video,
    read_frames,
    read_input_image,
)
from detr_d2.utils.outputs import AtomicVideoWriter, coco_records, draw_predictions, write_json, write_png
from detr_d2.utils.panoptic_outputs import (
    draw_panoptic,
    draw_panoptic_frame,
    panoptic_drawing_metadata,
    panoptic_record,
    write_segment_id_png,
)
from detr_d2.utils.predictor import BatchPredictor, confident
from detr_d2.utils.tool_arguments import (
    ToolArgumentParser,
    add_confidence_threshold,
    add_config_arguments,
    add_image_inputs,
    add_trust_pickle,
)
from detr_d2.utils.tool_setup import (
    EXIT_INPUT_FAILED,
    check_class_count,
    make_output_folder,
    metadata_with_class_names,
    positive_float,
    positive_int,
    run_tool,
    setup_tool_logging,
)

PREDICTIONS_FILE = "predictions.json"
PANOPTIC_FILE = "panoptic.json"
FALLBACK_FPS = 30.0  # for videos that do not state their frame rate

logger = logging.getLogger("detectron2")


def build_parser():
    parser = ToolArgumentParser(__doc__)
    add_config_arguments(parser)
    add_image_inputs(parser, help="image files, folders, glob patterns or videos (.mp4, .avi)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the results")
    add_confidence_threshold(parser)
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("--draw-scale", type=positive_float, default=1.0, metavar="F",
                        help="draw images F times their size, e.g. 4 for 128-px images, whose labels "
                             "would otherwise cover the objects (default: 1; videos keep their size)")
    add_trust_pickle(parser)
    return parser


class DemoRun:
    """One run over the inputs: draws and records the confident detections, collects
    the inputs that failed."""

    def __init__(self, predictor, metadata, threshold, batch_size, output_paths, draw_scale=1.0):
        self.predictor = predictor
        self.draw_scale = draw_scale
        self.metadata = metadata
        self.threshold = threshold
        self.batch_size = batch_size
        self.output_paths = output_paths
        self.panoptic_metadata = (panoptic_drawing_metadata(metadata, predictor.num_classes)
                                  if predictor.panoptic else None)
        self.records = []
        self.panoptic_records = []
        self.failures = []

    def fail(self, path, reason):
        logger.warning(f"Skipped {path}: {reason}")
        self.failures.append(InputFailure(path, reason))

    def _readable_images(self, paths, progress):
        """(path, HWC image in INPUT.FORMAT) of each readable image; records the others."""
        for path in paths:
            try:
                yield path, read_input_image(path, self.predictor.image_format)
            except UnreadableInput as error:
                self.fail(path, str(error))
                progress.update()

    def _save_image_result(self, path, image, output):
        """The drawing of ``output`` (the model's output for the image) and its records."""
        rgb = convert_image_to_rgb(image, self.predictor.image_format)
        detections = confident(output["instances"], self.threshold)
        drawing_path = self.output_paths.path_for(path, ".png")
        if "panoptic_seg" in output:
            segments_path = self.output_paths.path_for(path, "_segments.png")
            write_segment_id_png(segments_path, output["panoptic_seg"][0])
            self.panoptic_records.append(panoptic_record(output["panoptic_seg"], path, os.path.basename(segments_path),
                                                         self.panoptic_metadata))
            drawing = draw_panoptic(rgb, output["panoptic_seg"], self.panoptic_metadata, scale=self.draw_scale)
        else:
            drawing = draw_predictions(rgb, detections, self.metadata, scale=self.draw_scale)
        write_png(drawing_path, drawing)
        self.records.extend(coco_records(detections, path, self.metadata))

    def run_on_images(self, paths):
        """Write a drawing per readable image of ``paths`` and record its detections."""
        with tqdm(total=len(paths), desc="images", unit="image", disable=len(paths) < 2) as progress:
            for batch in batched(self._readable_images(paths, progress), self.batch_size):
                batch_paths, images = zip(*batch)
                for path, image, output in zip(batch_paths, images, self.predictor.outputs(list(images))):
                    self._save_image_result(path, image, output)
                    progress.update()

    def _annotate_frames(self, path, frames, writer, progress):
        """Draw each frame's detections into ``writer`` and record them; the frame count."""
        visualizer = VideoVisualizer(self.panoptic_metadata or self.metadata)
        count = 0
        for batch in batched(frames, self.batch_size):
            images = [frame_in_format(frame, self.predictor.image_format) for frame in batch]
            for frame, output in zip(batch, self.predictor.outputs(images)):
                detections = confident(output["instances"], self.threshold)
                if "panoptic_seg" in output:
                    writer.write(draw_panoptic_frame(visualizer, frame[:, :, ::-1], output["panoptic_seg"]))
                else:
                    writer.write(visualizer.draw_instance_predictions(frame[:, :, ::-1], detections).get_image())
                self.records.extend(coco_records(detections, path, self.metadata, frame=count))
                count += 1
                progress.update()
        return count

    def run_on_video(self, path):
        """Write the annotated video of ``path`` and record the detections of its frames."""
        try:
            capture, fps, frame_count = open_video(path)
        except UnreadableInput as error:
            self.fail(path, str(error))
            return
        output = self.output_paths.path_for(path, os.path.splitext(path)[1].lower())
        writer = AtomicVideoWriter(output, fps or FALLBACK_FPS)
        try:
            with tqdm(total=frame_count or None, desc=os.path.basename(path), unit="frame") as progress:
                count = self._annotate_frames(path, read_frames(capture), writer, progress)
        except BaseException:
            writer.discard()
            raise
        finally:
            capture.release()
        writer.close()
        if count == 0:
            self.fail(path, "no frame could be read from the video")


def report(run, num_inputs, output):
    """Log the summary; the exit status (EXIT_INPUT_FAILED if an input failed)."""
    logger.info(f"{len(run.records)} detections >= {run.threshold} written to "
                f"{os.path.join(output, PREDICTIONS_FILE)}")
    if not run.failures:
        return 0
    lines = "\n".join(f"  {failure.path}: {failure.reason}" for failure in run.failures)
    logger.error(f"{len(run.failures)} of {num_inputs} inputs failed and were skipped:\n{lines}")
    return EXIT_INPUT_FAILED


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    cfg = build_config(args.config_file, args.opts, all_datasets_registered=False)
    metadata = metadata_with_class_names(cfg)
    paths, pattern_failures = expand_inputs(args.input)
    predictor = BatchPredictor(cfg, trust_pickle=args.trust_pickle)
    check_class_count(metadata, predictor.num_classes)
    output_paths = OutputPaths(make_output_folder(args.output), paths, reserved={PREDICTIONS_FILE, PANOPTIC_FILE})
    run = DemoRun(predictor, metadata, args.confidence_threshold, args.batch_size, output_paths,
                  args.draw_scale)
    for failure in pattern_failures:
        run.fail(failure.path, failure.reason)
    run.run_on_images([path for path in paths if not is_video(path)])
    for path in filter(is_video, paths):
        run.run_on_video(path)
    write_json(os.path.join(args.output, PREDICTIONS_FILE), run.records)
    if predictor.panoptic:
        write_json(os.path.join(args.output, PANOPTIC_FILE), {"annotations": run.panoptic_records})
    return report(run, len(paths) + len(pattern_failures), args.output)


if __name__ == "__main__":
    sys.exit(run_tool(main))
