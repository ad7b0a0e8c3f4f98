"""The README's quick start and the docs pages' commands still work: every make target they
name exists, every script they run accepts the flags they show (its real `--help`), every
config they name exists and loads with build_config, the configs they ask the reader to
write load on data of that shape, and the repository paths and links they give exist.

Cheap on purpose (no training, no model run): three subprocesses and file checks."""
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests.docs import markdown_commands as docs

REPO = docs.REPO


def _named(pairs):
    """{item: sorted page names that mention it}."""
    pages_by_item = {}
    for page, item in pairs:
        pages_by_item.setdefault(item, set()).add(page.relative_to(REPO).as_posix())
    return {item: sorted(pages) for item, pages in pages_by_item.items()}


def _run_json(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_readme_quick_start_names_make_demo_and_make_test_and_maps_every_docs_page():
    readme = docs.page_text(docs.README)
    fenced = [command for block in docs.fenced_blocks(readme) for command in docs.command_lines(block)]
    assert "make demo" in fenced and "make test" in fenced
    linked = {target for page, target in docs.relative_links([docs.README])}
    unmapped = [page.name for page in docs.DOCS_PAGES if f"docs/{page.name}" not in linked]
    assert not unmapped, f"docs pages the README's map does not link: {unmapped}"


def test_every_make_target_the_docs_name_exists_in_the_makefile():
    commands = docs.commands() + docs.inline_make_commands()
    targets = _named((page, target) for page, command in commands if command.startswith("make ")
                     for target in docs.make_targets(command))
    assert {"demo", "test", "install"} <= set(targets)
    for target, pages in targets.items():
        dry_run = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert dry_run.returncode == 0, f"`make {target}` ({pages}): {dry_run.stderr.strip()}"


def test_every_script_the_docs_run_exists_and_accepts_the_flags_they_show():
    flags_by_script = {}
    for page, command in docs.commands():
        script = docs.script_of(command)
        if script:
            flags_by_script.setdefault(script, {}).update(
                {flag: page.relative_to(REPO).as_posix() for flag in docs.flags_of(command)})
    assert "tools/train_net.py" in flags_by_script and "tools/demo.py" in flags_by_script
    missing = [script for script in flags_by_script if not (REPO / script).is_file()]
    assert not missing, f"scripts the docs run that do not exist: {missing}"

    helps = _run_json(["tests/docs/print_tool_help.py", *sorted(flags_by_script)], cwd=REPO)
    unknown = []
    for script, flags in sorted(flags_by_script.items()):
        assert helps[script]["exit_code"] == 0, f"{script} --help exited {helps[script]['exit_code']}"
        assert "usage:" in helps[script]["help"], f"{script} --help printed no usage"
        accepted = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", helps[script]["help"]))
        unknown += [f"{script} {flag} ({page})" for flag, page in sorted(flags.items()) if flag not in accepted]
    assert not unknown, "flags the docs show that the tools do not accept:\n" + "\n".join(unknown)


def test_every_config_the_docs_name_exists_and_loads_with_build_config():
    named = _named(docs.config_files_named())
    written_by_reader = docs.user_configs()
    assert "configs/detr_r50.yaml" in named
    absent = {path: pages for path, pages in named.items()
              if not (REPO / path).is_file() and path not in written_by_reader}
    assert not absent, f"config files the docs name that do not exist: {absent}"

    shipped = sorted(path for path in named if path not in written_by_reader)
    results = _run_json(["tests/docs/load_configs.py", *shipped], cwd=REPO)
    failed = [f"{r['config']} ({named[r['config']]}): {r['error']}" for r in results if not r["ok"]]
    assert not failed, "configs the docs name that do not load:\n" + "\n".join(failed)
    assert {r["config"]: r["num_classes"] for r in results}["configs/detr_r50.yaml"] == 80


def _write_coco_split(json_path, image_root, categories):
    """A COCO json with one 64x48 image holding one object per category."""
    image_root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (90, 120, 150)).save(image_root / "0.png")
    annotations = [{"id": i + 1, "image_id": 0, "category_id": cat["id"], "bbox": [4.0 + 10 * i, 6.0, 8.0, 9.0],
                    "area": 72.0, "iscrowd": 0} for i, cat in enumerate(categories)]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": [{"id": 0, "file_name": "0.png", "width": 64, "height": 48}],
                                     "annotations": annotations, "categories": categories}))


def test_the_configs_the_docs_ask_you_to_write_load_on_data_of_that_shape(tmp_path):
    """Each `# configs/NAME.yaml` block, written out (its _BASE_ pointing into the repository's
    configs/): with COCO data at the paths it registers, NUM_CLASSES comes from the data."""
    categories = [{"id": 3, "name": "gear"}, {"id": 7, "name": "bolt"}]
    with_data, without_data = [], []
    for number, (path, blocks) in enumerate(sorted(docs.user_configs().items())):
        for version, text in enumerate(blocks):
            base_dir = (REPO / path).parent
            text = re.sub(r'_BASE_:\s*"([^"]+)"', lambda m: f'_BASE_: "{(base_dir / m.group(1)).as_posix()}"', text)
            written = tmp_path / "configs" / f"{number}_{version}_{(REPO / path).name}"
            written.parent.mkdir(exist_ok=True)
            written.write_text(text)
            registered = re.findall(r'\("(\w+)", "([^"]+\.json)", "([^"]+)"\)', text)
            if "REGISTER_COCO:" in text and registered:
                for _name, json_file, image_root in registered:
                    _write_coco_split(tmp_path / json_file, tmp_path / image_root, categories)
                with_data.append(written.as_posix())
            else:
                without_data.append(written.as_posix())
    assert with_data, "no `# configs/NAME.yaml` block with DATASETS.REGISTER_COCO in the docs"
    results = _run_json([str(REPO / "tests/docs/load_configs.py"), "--with-data", *with_data], cwd=tmp_path)
    if without_data:
        results += _run_json([str(REPO / "tests/docs/load_configs.py"), *without_data], cwd=tmp_path)
    failed = [f"{r['config']}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "configs the docs ask you to write that do not load:\n" + "\n".join(failed)
    assert all(r["num_classes"] == len(categories) for r in results[:len(with_data)])


def test_every_repository_path_and_link_in_the_docs_exists():
    written_by_reader = docs.user_configs()
    paths = _named(docs.repository_paths_named())
    absent = {path: pages for path, pages in paths.items()
              if not (REPO / path).exists() and path not in written_by_reader}
    assert not absent, f"repository paths the docs name that do not exist: {absent}"
    broken = [f"{page.relative_to(REPO)} -> {target}" for page, target in docs.relative_links()
              if not (page.parent / target).exists()]
    assert not broken, f"links to files that do not exist: {broken}"


@pytest.mark.parametrize("page", docs.PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_fenced_blocks_are_closed(page):
    """An unclosed ``` would hide the rest of a page from these checks (and from readers)."""
    assert docs.page_text(page).count("\n```") % 2 == 0
