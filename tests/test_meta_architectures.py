"""detectron2's own entry points build detr_d2's models as MODEL.DETR.FAST_PATHS asks.

``detectron2.modeling.build_model`` and ``DefaultPredictor`` give, for every
meta-architecture detr_d2 registers, the model of detr_d2's own path (the plain class from
the config, then ``detr_d2.acceleration.accelerate(model, FAST_PATHS)``): the same module
classes, the same fast-path switches, the same outputs. Small R18 configs keep it cheap.
"""
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from detr_d2.acceleration import accelerate, set_fast_paths
from detr_d2.acceleration.folded_norm import FrozenNormConv2d
from detr_d2.engine import build_model as engine_build_model
from detr_d2.engine.precision import inference_autocast
from detr_d2.meta_architectures import is_detr_d2_meta_architecture
from detr_d2.modeling import GroupDetr
from tests.helpers import config, save_weights

SHRUNK = ("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.DETR.HIDDEN_DIM", "32",
          "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2",
          "MODEL.DETR.NUM_OBJECT_QUERIES", "7", "MODEL.DETR.NUM_CLASSES", "3", "MODEL.DETR.DROPOUT", "0.0")
# A repository config of each meta-architecture (shrunk to an R18 with FrozenBN, whose
# norms fold: acceleration visibly swaps modules).
CONFIGS = {
    "Detr": ("detr_r50.yaml",),
    "GroupDetr": ("detr_r50.yaml", "MODEL.META_ARCHITECTURE", "GroupDetr", "MODEL.DETR.NUM_QUERY_GROUPS", "2"),
    "DeformableDetr": ("deformable_detr_r50.yaml",),
    "Dino": ("dino_r50_4scale_12ep.yaml",),
}
SWITCHES = ("fold_norm", "fast_masks", "fast_sampling", "channels_last", "prepacked")


def detr_d2_meta_architectures():
    """{name: class} of every meta-architecture detr_d2 registers in detectron2."""
    return {name: registered for name, registered in META_ARCH_REGISTRY if is_detr_d2_meta_architecture(registered)}


def small_config(name, fast_paths=True, *opts):
    if name not in CONFIGS:
        pytest.fail(f"meta-architecture {name} has no small config in CONFIGS of {__file__}: add one")
    file, *name_opts = CONFIGS[name]
    return config(file, *SHRUNK, *name_opts, "MODEL.DETR.FAST_PATHS", str(fast_paths), *opts)


def modules_and_switches(model):
    """[(module name, class, {fast-path switch: value})] and the model's ``fast_paths``."""
    return [(name, type(module), {s: getattr(module, s) for s in SWITCHES if hasattr(module, s)})
            for name, module in model.named_modules()] + [("", "fast_paths", getattr(model, "fast_paths", None))]


def own_path_model(name, cfg):
    """detr_d2's own path: the registered class built from ``cfg``, then accelerated."""
    torch.manual_seed(0)
    return accelerate(detr_d2_meta_architectures()[name](cfg), cfg.MODEL.DETR.FAST_PATHS)


def images(count=2):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 64 + 8 * i, 80), dtype=torch.uint8, generator=generator) for i in range(count)]


def detections(model, inputs):
    with torch.no_grad():
        return [output["instances"].get_fields() for output in model.eval()(inputs)]


def assert_same_detections(actual, expected):
    for fields, expected_fields in zip(actual, expected, strict=True):
        assert fields.keys() == expected_fields.keys()
        for key, value in expected_fields.items():
            value = value.tensor if hasattr(value, "tensor") else value
            other = fields[key].tensor if hasattr(fields[key], "tensor") else fields[key]
            torch.testing.assert_close(other, value, rtol=0, atol=0, msg=key)


def test_every_detr_d2_meta_architecture_is_covered():
    assert set(detr_d2_meta_architectures()) >= {"Detr", "GroupDetr"}
    for name in detr_d2_meta_architectures():
        assert name in CONFIGS, f"add a small config of {name} to CONFIGS"


@pytest.mark.parametrize("fast_paths", [True, False])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_detectron2_build_model_is_detr_d2s_model(name, fast_paths):
    cfg = small_config(name, fast_paths)
    expected = own_path_model(name, cfg)
    built = build_model(cfg)
    assert type(built) is detr_d2_meta_architectures()[name]
    assert modules_and_switches(built) == modules_and_switches(expected)
    assert modules_and_switches(engine_build_model(cfg)) == modules_and_switches(expected)
    folded = [module for module in built.modules() if isinstance(module, FrozenNormConv2d)]
    assert folded and all(module.fold_norm is fast_paths for module in folded)
    built.load_state_dict(expected.state_dict())
    inputs = [{"image": image} for image in images()]
    assert_same_detections(detections(built, inputs), detections(expected, inputs))


def test_accelerated_once_and_switched_off_for_export():
    """set_fast_paths(model, False) turns a detectron2-built model into the plain computation."""
    cfg = small_config("Detr")
    built = set_fast_paths(build_model(cfg), False)
    assert modules_and_switches(built) == modules_and_switches(own_path_model("Detr", small_config("Detr", False)))
    torch.manual_seed(0)
    plain = detr_d2_meta_architectures()["Detr"](cfg)
    plain.load_state_dict(built.state_dict())
    inputs = [{"image": image} for image in images()]
    assert_same_detections(detections(built, inputs), detections(plain, inputs))


def test_detr_with_query_groups_builds_group_detr():
    cfg = small_config("Detr", True, "MODEL.DETR.NUM_QUERY_GROUPS", "3")
    model = build_model(cfg)
    assert type(model) is GroupDetr and model.num_query_groups == 3 and model.fast_paths


def bgr_image():
    return np.random.default_rng(2).integers(0, 256, (60, 90, 3), dtype=np.uint8)


def predictor_input(predictor, image_bgr):
    """What DefaultPredictor feeds its model for ``image_bgr``, computed apart."""
    image = image_bgr[:, :, ::-1] if predictor.input_format == "RGB" else image_bgr
    resized = predictor.aug.get_transform(image).apply_image(image)
    return {"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), "height": 60, "width": 90}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_default_predictor_runs_detr_d2s_model(name, tmp_path):
    cfg = small_config(name)
    expected = own_path_model(name, cfg)
    cfg.MODEL.WEIGHTS = str(save_weights(expected, tmp_path / "model.pth"))
    predictor = DefaultPredictor(cfg)
    assert modules_and_switches(predictor.model) == modules_and_switches(expected)
    image = bgr_image()
    [expected_fields] = detections(expected, [predictor_input(predictor, image)])
    assert_same_detections([predictor(image)["instances"].get_fields()], [expected_fields])


def test_default_predictor_under_inference_autocast_runs_test_amp(tmp_path):
    """The docs' line for TEST.AMP with DefaultPredictor: call it inside
    ``inference_autocast(cfg)``; its convolutions then compute in bfloat16 on the CPU."""
    cfg = small_config("Detr", True, "TEST.AMP.ENABLED", "True")
    cfg.MODEL.WEIGHTS = str(save_weights(own_path_model("Detr", cfg), tmp_path / "model.pth"))
    predictor = DefaultPredictor(cfg)
    dtypes = []
    predictor.model.input_proj.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    float32_scores = predictor(bgr_image())["instances"].scores
    with inference_autocast(cfg):
        amp_scores = predictor(bgr_image())["instances"].scores
    assert dtypes == [torch.float32, torch.bfloat16]
    assert amp_scores.dtype == torch.float32
    torch.testing.assert_close(amp_scores, float32_scores, rtol=0, atol=0.05)
