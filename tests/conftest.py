"""Fixtures shared by the test packages; the helpers they use live in tests/helpers.py.
The tiers (``make test``, ``make test-quick`` without the slow tests) are marked here by
tests/tiers.py's rules (docs/testing.md)."""
import os

if "PYTEST_XDIST_WORKER" in os.environ:  # parallel workers: one thread each, for them and their subprocesses
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import convert_with_cli, fixture_dir, write_coco_split  # noqa: E402
from tests.tiers import QuickTierReport, is_slow  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory):
    """A $DETECTRON2_DATASETS holding coco/train2017 (2 images) and coco/val2017 (2 images)."""
    root = tmp_path_factory.mktemp("detectron2_datasets")
    write_coco_split(root / "coco", "train2017", num_images=2, seed=0)
    write_coco_split(root / "coco", "val2017", num_images=2, seed=1)
    return root


@pytest.fixture(scope="session")
def converted_reference(tmp_path_factory):
    """``converted_reference(name, *flags)``: (OUT.pth, CompletedProcess) of
    tools/convert_detr_checkpoint.py run on the reference fixture ``name`` with ``flags``,
    once per session (the CLI's exit status is asserted to be 0); OUT.pth is named like the
    fixture, in a folder of its own, beside whatever else the converter writes (OUT.yaml,
    ...). Read the files; do not change them."""
    folder = tmp_path_factory.mktemp("converted_references")
    conversions = {}

    def convert(name, *flags):
        if (name, flags) not in conversions:
            output = folder / str(len(conversions)) / f"{name}.pth"
            output.parent.mkdir()
            result = convert_with_cli(fixture_dir(name) / "checkpoint.pth", output, *flags)
            assert result.returncode == 0, result.stderr[-3000:]
            conversions[name, flags] = output, result
        return conversions[name, flags]

    return convert


@pytest.hookimpl(tryfirst=True)  # before -m selects by marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    if "not slow" in (config.option.markexpr or ""):
        config.pluginmanager.register(QuickTierReport(), "quick_tier_report")
