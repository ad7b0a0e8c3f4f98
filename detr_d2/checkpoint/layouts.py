"""Which DETR checkpoint layout a state dict has, and its tensors under detr_d2's names.

Layouts read (``LAYOUTS``, tried in this order, each recognised by keys only it has):

* ``wrapper``: the reference's detectron2 wrapper (``d2/`` of facebookresearch/detr), its
  converter's and its trainer's files (``detr.backbone.0.backbone.*``; with MODEL.MASK_ON
  ``detr.detr.*``, ``detr.bbox_attention.*``, ``detr.mask_head.*``): ``wrapper_layout``;
* ``transformers``: Hugging Face transformers ``DetrForObjectDetection`` /
  ``DetrForSegmentation`` (``model.*``, ``class_labels_classifier``, ``bbox_predictor``):
  ``transformers_layout``;
* ``dino``: the reference DINO (IDEA-Research/DINO; ``backbone.0.body.*`` with any of
  ``label_enc``, ``transformer.tgt_embed``, ``transformer.enc_out_*_embed``,
  ``transformer.decoder.ref_point_head``): ``dino_layout``, whose tensors also fix the
  model's config (``LayoutReading.config``);
* ``deformable``: the reference Deformable DETR (fundamentalvision/Deformable-DETR;
  ``backbone.0.body.*`` with ``transformer.level_embed``): ``deformable_layout``, likewise;
* ``reference``: the reference DETR itself (``backbone.0.body.*``; segmentation models
  ``detr.*``, ``bbox_attention.*``, ``mask_head.*``): ``convert``;
* ``detr_d2``: this project's own names (``backbone.body.*``, ``transformer.*`` ...), used
  as they are.

MODEL.WEIGHTS, MODEL.DETR.FROZEN_WEIGHTS and --resume read every layout
(``engine.checkpointer``); tools/convert_detr_checkpoint.py writes any of them in
detr_d2's layout. The reference COCO heads become detectron2's 80 classes unless
``keep_classes`` (the converter's --keep-classes) keeps them as they are. A state dict of
none of them is a ``LayoutError`` naming the layouts tried and the closest one by key
overlap.
"""
from dataclasses import dataclass, field
from typing import Callable

from detr_d2.checkpoint import convert, deformable_layout, dino_layout, transformers_layout, wrapper_layout
from detr_d2.checkpoint.convert import CLASS_HEAD_KEYS, ConversionError

__all__ = ["DEFORMABLE", "DETR_D2", "DINO", "LAYOUTS", "LayoutError", "LayoutReading", "detect_layout", "read_layout"]

DETR_D2_PREFIXES = ("backbone.body.", "transformer.", "class_embed.", "bbox_embed.", "query_embed.", "input_proj.",
                    "position_embedding.", "mask_head.", "extra_query_embed.")


class LayoutError(ConversionError):
    """A state dict whose keys fit no layout detr_d2 reads."""


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: ``detects(state_dict)`` by keys only it has; ``knows(key)``:
    whether it has such a key (for the closest layout); ``convert(state_dict, source,
    drop_class_head, keep_classes)`` -> (detr_d2 state dict, notes); for layouts whose
    tensors fix the model's config, ``config_options(state_dict, converted, source,
    training_args)`` -> ([(config key, value)] on configs/``base_config``, notes)."""

    name: str
    title: str
    detects: Callable
    knows: Callable
    convert: Callable
    config_options: Callable = None
    base_config: str = None


@dataclass
class LayoutReading:
    """The outcome of ``read_layout``: the layout, the detr_d2 state dict, notes, and the
    class names / dataset ids the layout knows (transformers: from id2label; COCO heads)."""

    layout: Layout
    state_dict: dict
    notes: list
    class_names: list = None
    dataset_ids: list = None
    source_state_dict: dict = field(default=None, repr=False)
    source: str = "checkpoint"

    def config(self, training_args=None):
        """([(config key, value)] on configs/``layout.base_config``, notes) building the model
        of these weights, for a layout whose tensors fix it; None for other layouts.
        ``training_args``: the "args" entry of a reference training-script checkpoint."""
        if self.layout.config_options is None:
            return None
        return self.layout.config_options(self.source_state_dict, self.state_dict, self.source, training_args)


def _wrapper_knows(key):
    return any(wrapper_layout.wrapper_key_to_detr_d2(key, segm) is not None for segm in (False, True))


def _wrapper_convert(state_dict, source, drop_class_head=False, keep_classes=False):
    return wrapper_layout.wrapper_to_detr_d2(state_dict, source)


def _transformers_knows(key):
    (key,) = transformers_layout.with_file_names({key: None})
    return any(transformers_layout.transformers_key(key, flavour, segm)[0] is not None
               for flavour in (transformers_layout.TIMM, transformers_layout.TRANSFORMERS_RESNET)
               for segm in (False, True))


def _transformers_convert(state_dict, source, drop_class_head=False, keep_classes=False):
    converted, facts = transformers_layout.transformers_to_detr_d2(state_dict, source)
    flavour = "timm ResNet" if facts["backbone"] == transformers_layout.TIMM else "transformers ResNetBackbone"
    kind = "DetrForSegmentation" if facts["segmentation"] else "DetrForObjectDetection"
    return converted, [f"{kind}, {flavour} backbone"]


def _reference_detects(state_dict):
    return any(key.startswith(("backbone.0.body.", "detr.backbone.0.body.")) for key in state_dict)


def _reference_knows(key):
    return convert.rename_key(key[len("detr."):] if key.startswith("detr.") else key) is not None


def _reference_convert(state_dict, source, drop_class_head=False, keep_classes=False):
    converted, report = convert.convert_state_dict(convert.without_segm_detector_prefix(state_dict),
                                                   drop_class_head=drop_class_head, source=source,
                                                   keep_classes=keep_classes)
    return converted, report["notes"]


def _deformable_knows(key):
    return deformable_layout.deformable_key_to_detr_d2(key) is not None


def _dino_knows(key):
    return dino_layout.dino_key_to_detr_d2(key) is not None


def _detr_d2_detects(state_dict):
    return any(key.startswith("backbone.body.") for key in state_dict)


def _detr_d2_knows(key):
    return key.startswith(DETR_D2_PREFIXES)


WRAPPER = Layout("wrapper", "the reference DETR's detectron2 wrapper (d2/)", wrapper_layout.is_wrapper_layout,
                 _wrapper_knows, _wrapper_convert)
TRANSFORMERS = Layout("transformers", "Hugging Face transformers DETR", transformers_layout.is_transformers_layout,
                      _transformers_knows, _transformers_convert)
DEFORMABLE = Layout("deformable", "the reference Deformable DETR (fundamentalvision/Deformable-DETR)",
                    deformable_layout.is_deformable_layout, _deformable_knows, deformable_layout.deformable_to_detr_d2,
                    deformable_layout.config_options, deformable_layout.BASE_CONFIG)
DINO = Layout("dino", "the reference DINO (IDEA-Research/DINO)", dino_layout.is_dino_layout, _dino_knows,
              dino_layout.dino_to_detr_d2, dino_layout.config_options, dino_layout.BASE_CONFIG)
REFERENCE = Layout("reference", "the reference DETR (facebookresearch/detr)", _reference_detects,
                   _reference_knows, _reference_convert)
DETR_D2 = Layout("detr_d2", "detr_d2", _detr_d2_detects, _detr_d2_knows,
                 lambda state_dict, source, drop_class_head=False, keep_classes=False: (state_dict, []))
LAYOUTS = (WRAPPER, TRANSFORMERS, DINO, DEFORMABLE, REFERENCE, DETR_D2)


def _without_module_prefix(state_dict):
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state_dict.items()}


def closest_layout(state_dict):
    """(layout, number of keys it knows) with the most known keys."""
    scores = [(sum(map(layout.knows, state_dict)), -index, layout) for index, layout in enumerate(LAYOUTS)]
    best, _, layout = max(scores, key=lambda s: s[:2])
    return layout, best


def layout_error(state_dict, source, lead):
    """LayoutError: ``lead``, the layouts tried, the closest one by key overlap."""
    tried = "; ".join(f"{layout.name}: {layout.title}" for layout in LAYOUTS)
    layout, known = closest_layout(state_dict)
    keys = sorted(state_dict)
    if known:
        unknown = [key for key in keys if not layout.knows(key)]
        closest = (f"closest: {layout.name} ({known} of {len(keys)} keys are its names; not its names: "
                   f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''})")
    else:
        closest = f"closest: none (no key is a name of any of them; its keys start {', '.join(keys[:3])})"
    return LayoutError(f"{source} {lead}: its keys fit none of the checkpoint layouts detr_d2 reads "
                       f"(tried {tried}); {closest}")


def detect_layout(state_dict):
    """The layout of ``state_dict`` by the keys only it has (LAYOUTS order), or None."""
    state_dict = _without_module_prefix(state_dict)
    return next((layout for layout in LAYOUTS if layout.detects(state_dict)), None)


def _class_head(reading, state_dict, drop_class_head, id2label=None, keep_classes=False):
    """Class names of a transformers model (and its COCO head remapped unless
    ``keep_classes``); the head dropped on request."""
    if reading.layout is TRANSFORMERS and "class_embed.weight" in state_dict:
        names, ids, note = transformers_layout.class_head_and_names(state_dict, id2label, remap=not keep_classes)
        reading.class_names, reading.dataset_ids = names, ids
        reading.notes.append(note)
    if drop_class_head and "class_embed.weight" in state_dict:
        rows = state_dict["class_embed.weight"].shape[0]
        for key in CLASS_HEAD_KEYS:
            state_dict.pop(key, None)
        reading.notes.append(f"class head ({rows} outputs) dropped for fine-tuning on other classes")
        reading.class_names = reading.dataset_ids = None


def read_layout(state_dict, source="checkpoint", model_keys=None, drop_class_head=False, id2label=None,
                keep_classes=False):
    """``state_dict`` in detr_d2's names: a ``LayoutReading``.

    ``model_keys``: the names of the model it is for (MODEL.WEIGHTS); a detr_d2-layout
    dict must then share at least one of them. ``id2label``: a transformers config's labels
    (class names; a COCO 92-output head is reduced to 80 classes). ``keep_classes``: COCO
    heads of the reference models and transformers kept as they are. Raises LayoutError for
    a state dict of no known layout, ConversionError for one with keys its layout lacks.
    """
    state_dict = _without_module_prefix(state_dict)
    layout = detect_layout(state_dict)
    if layout is None and (model_keys is not None and set(state_dict) & set(model_keys)
                           or model_keys is None and any(map(_detr_d2_knows, state_dict))):
        layout = DETR_D2
    if layout is None:
        lead = "holds no tensor of this model" if model_keys is not None else "is not a checkpoint detr_d2 can convert"
        raise layout_error(state_dict, source, lead)
    converted, notes = layout.convert(state_dict, source, drop_class_head=drop_class_head, keep_classes=keep_classes)
    reading = LayoutReading(layout, dict(converted), list(notes), source_state_dict=state_dict, source=str(source))
    _class_head(reading, reading.state_dict, drop_class_head, id2label, keep_classes)
    return reading
