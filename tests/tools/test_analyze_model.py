"""tools/analyze_model.py in the test process on a multi-scale model: the tiny multi-scale
test config as Dino, its parameters and FLOPs per top-level module (the DETR configs run
through the tool's command line in test_tools.py and test_tool_arguments.py)."""
import importlib.util
import json

from detr_d2.engine import build_config
from detr_d2.engine.build import build_model
from tests.helpers import REPO, TOOLS

CONFIG = REPO / "configs" / "tests" / "tiny_deformable.yaml"
DINO = ["MODEL.META_ARCHITECTURE", "Dino", "MODEL.DINO.DN_NUMBER", "4"]


def analyze_model_tool():
    """tools/analyze_model.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("analyze_model_tool", TOOLS / "analyze_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dino_parameters_and_flops_per_module(tmp_path, capsys):
    """Every module's parameters are the model's; the backbone, the transformer (encoder,
    query selection, decoder) and the heads have flops, which sum to the total; the
    denoising label embeddings (label_enc) have a row of their own."""
    report_path = tmp_path / "report.json"
    assert analyze_model_tool().main(["--config-file", str(CONFIG), "--input-size", "64x80",
                                      "--json", str(report_path), *DINO]) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    model = build_model(build_config(str(CONFIG), [*DINO, "MODEL.DEVICE", "cpu"], all_datasets_registered=False))
    assert type(model).__name__ == "Dino" and report["input_size"] == [64, 80]
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    modules = {row["name"]: row for row in report["modules"]}
    for name in ("backbone", "input_proj", "transformer", "class_embed", "bbox_embed", "label_enc"):
        assert modules[name]["parameters"] == sum(p.numel() for p in getattr(model, name).parameters()), name
        assert f"| {name} " in table
    assert sum(row["flops"] for row in report["modules"]) == report["flops"]
    assert all(modules[name]["flops"] > 0 for name in ("backbone", "input_proj", "transformer", "class_embed",
                                                       "bbox_embed"))
    assert "aten::grid_sampler" not in report["uncounted_operators"]
