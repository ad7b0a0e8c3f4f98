"""Deterministic synthetic shape-detection datasets in COCO format.

Each image (``image_size`` x ``image_size`` RGB PNG, 128 px by default) has a random
smooth background (a colour gradient or smooth colour noise, with a little pixel noise)
and ``min_objects`` to ``max_objects`` flat-coloured shapes whose longer box side is
``min_size`` to ``max_size`` px. Shapes are randomly rotated (except circles), coloured
to contrast with whatever lies under them, and may partially overlap within the limits
of ``rendering``.

Known shapes (``KNOWN_SHAPES``): circle, ellipse, rectangle, triangle, pentagon, hexagon,
star, cross (a plus sign). Presets (``PRESETS``):

* ``pretrain``: circle, ellipse, rectangle, triangle, pentagon, hexagon
* ``custom``:   star, cross (two classes absent from ``pretrain``, for fine-tuning)
* ``panoptic``: the ``pretrain`` shapes as things on sky / ground / water stuff, in
  COCO-panoptic format (``panoptic``: ``generate_panoptic_dataset``, its own layout)

Layout of ``output_dir``::

    images/<split>/000000.png ...     (image id = file index + 1)
    annotations/<split>.json          (COCO, one per split)
    manifest.json                     (the arguments; written last)

Box convention: COCO ``bbox`` = [x, y, w, h] in absolute pixels (floats), where (x, y)
is the top-left corner of the top-left covered pixel and w, h count pixels, so the box
is exactly tight around the object's *visible* (after occlusion) pixels.
``area`` is the number of visible pixels of the object (its mask area), not w*h.
Category ids start at 1 in the order of the class list; supercategory is "shape".

Output is a pure function of the arguments: every image is drawn from its own random
generator seeded by (seed, split name, class list, index), so the same arguments give
byte-identical json and PNG files, and a split does not depend on the sizes of the other
splits. A run whose manifest matches and whose files all exist is skipped; files are
written atomically (``writer``).

Modules: ``outlines`` (shape polygons, rasterisation), ``backgrounds``, ``colours``
(contrasting shape colours), ``rendering`` (one image and its objects), ``writer`` (one
split's PNGs and json), ``generation`` (``generate_dataset``), ``presets``.

Example: ``generate_dataset(output_dir, PRESETS["custom"], {"train": 500})``; the command
line is ``datasets/prepare_shapes.py``.
"""
from detr_d2.data.shapes.generation import generate_dataset
from detr_d2.data.shapes.outlines import KNOWN_SHAPES, fit_outline, rasterize, shape_outline
from detr_d2.data.shapes.panoptic import generate_panoptic_dataset
from detr_d2.data.shapes.presets import DEFAULT_SPLITS, PANOPTIC_PRESETS, PRESETS
from detr_d2.data.shapes.rendering import DrawnObject, ImageSettings, render_sample, sample_rng
from detr_d2.data.shapes.writer import image_file_name, write_split

__all__ = ["DEFAULT_SPLITS", "DrawnObject", "ImageSettings", "KNOWN_SHAPES", "PANOPTIC_PRESETS", "PRESETS",
           "fit_outline", "generate_dataset", "generate_panoptic_dataset", "image_file_name", "rasterize", "render_sample", "sample_rng", "shape_outline",
           "write_split"]
