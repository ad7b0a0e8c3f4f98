"""``import detr_d2`` registers everything with detectron2, whatever is imported first, and
imports neither torch nor detectron2 itself (each case runs in a fresh interpreter)."""
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO

BUILD_AND_REPORT = """
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model
import detr_d2
names = sorted(name for name, registered in META_ARCH_REGISTRY if registered.__module__.startswith("detr_d2."))
cfg = get_cfg()
detr_d2.add_detr_config(cfg)
cfg.merge_from_file("configs/tests/tiny.yaml")
cfg.MODEL.DETR.NUM_CLASSES = 3
model = build_model(cfg)
print("REPORT", ",".join(names), type(model).__name__, model.fast_paths, type(model.backbone).__name__)
"""
# What a user or a part of detr_d2 may import first; the registration may start in the
# middle of detr_d2.modeling's, detr_d2.acceleration's or detr_d2.meta_architectures' own import.
FIRST_IMPORTS = {
    "detr_d2 then detectron2": "import detr_d2\nimport detectron2.modeling",
    "detr_d2.modeling": "import detr_d2.modeling",
    "detr_d2.acceleration": "import detr_d2.acceleration",
    "a module detr_d2.acceleration needs": "import detr_d2.modeling.multi_scale.deformable_attention",
    "detr_d2.meta_architectures": "import detr_d2.meta_architectures",
    "detectron2.modeling before detr_d2": (  # v0.6 needs Pillow's LINEAR and a detectron2._C for that
        "import importlib.util, sys, types\n"
        "from PIL import Image\n"
        "Image.LINEAR = Image.BILINEAR\n"
        "import detectron2\n"
        "if importlib.util.find_spec('detectron2._C') is None:\n"
        "    sys.modules['detectron2._C'] = types.ModuleType('detectron2._C')\n"
        "import detectron2.modeling\n"
        "import detr_d2"),
}
NOTHING_HEAVY = """
import sys
{imports}
heavy = sorted(name for name in ("torch", "detectron2") if name in sys.modules)
print("HEAVY", heavy)
"""


def run_all(codes):
    """Run each code in its own fresh interpreter from the repository root, all at once;
    their CompletedProcess-like (returncode, stdout, stderr) in order."""
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for code in codes]
    outputs = [process.communicate(timeout=300) for process in processes]
    return [(process.returncode, *output) for process, output in zip(processes, outputs)]


@pytest.fixture(scope="module")
def registration_runs():
    codes = [first + "\n" + BUILD_AND_REPORT for first in FIRST_IMPORTS.values()]
    return dict(zip(FIRST_IMPORTS, run_all(codes)))


@pytest.mark.parametrize("first", list(FIRST_IMPORTS))
def test_detectron2_builds_the_accelerated_model_whatever_is_imported_first(registration_runs, first):
    _, stdout, stderr = registration_runs[first]
    reports = [line.split()[1:] for line in stdout.splitlines() if line.startswith("REPORT")]
    assert reports, stderr[-3000:]
    names, model_class, fast_paths, backbone_class = reports[0]
    assert {"Detr", "GroupDetr"} <= set(names.split(","))
    assert (model_class, fast_paths, backbone_class) == ("Detr", "True", "FastMaskedBackbone")


def test_light_parts_import_neither_torch_nor_detectron2():
    codes = [NOTHING_HEAVY.format(imports=imports) for imports in
             ("import detr_d2", "import detr_d2.data.shapes", "import detr_d2.errors",
              "from detr_d2.data.shapes import generate_dataset")]
    for code, (_, stdout, stderr) in zip(codes, run_all(codes)):
        assert "HEAVY []" in stdout, f"{code}\n{stdout}{stderr[-2000:]}"

