"""Make detectron2 importable in the current Python environment, without internet.

Order of preference:
1. a detectron2 that is already importable (e.g. built from its git main branch) is used
   as it is;
2. otherwise the Python part of detectron2 v0.6 is installed from the ``pb1-detectron2``
   sdist on PyPI. That sdist lacks ``detectron2/layers/csrc`` (the C++/CUDA ops), so its
   ``setup.py`` is patched to build no extension and to drop the ``black==21.4b2`` pin
   that nothing here needs. ``detr_d2.compat`` supplies what the missing extension breaks.

Every network step has a short timeout, so a machine without a package registry fails
fast with a message instead of hanging.
"""
import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tarfile
import tempfile

SDIST = "pb1-detectron2==0.6"
PIP_NET = ["--timeout", "30", "--retries", "1"]
SETUP_PATCHES = (
    ("    ext_modules=get_extensions(),\n", ""),
    ('        "black==21.4b2",\n', ""),
)


def log(message):
    print(f"[install_detectron2] {message}", flush=True)


def importable_detectron2():
    """Return the path of an importable detectron2 package, or None."""
    spec = importlib.util.find_spec("detectron2")
    return None if spec is None else pathlib.Path(spec.origin).parent


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download_sdist(cache_dir):
    """Fetch the pb1-detectron2 sdist into ``cache_dir`` (once) and return its path."""
    cached = sorted(cache_dir.glob("pb1-detectron2-*.tar.gz"))
    if cached:
        log(f"using cached sdist {cached[-1]}")
        return cached[-1]
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {SDIST} (sdist only) into {cache_dir}")
    pip("download", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
        *PIP_NET, "-d", str(cache_dir), SDIST)
    return sorted(cache_dir.glob("pb1-detectron2-*.tar.gz"))[-1]


def patch_setup(setup_py):
    text = setup_py.read_text()
    for old, new in SETUP_PATCHES:
        if old not in text:
            sys.exit(f"[install_detectron2] {setup_py}: expected line {old.strip()!r} not found; "
                     "the sdist is not the one this installer knows")
        text = text.replace(old, new)
    setup_py.write_text(text)


def install_from_sdist(sdist):
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = next(pathlib.Path(tmp).glob("pb1-detectron2-*"))
        patch_setup(source / "setup.py")
        log("installing the Python part of detectron2 v0.6 (no C++ extension)")
        pip("install", "--no-build-isolation", *PIP_NET, str(source))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=pathlib.Path, default=pathlib.Path(".cache"))
    args = parser.parse_args()
    found = importable_detectron2()
    if found is not None:
        log(f"detectron2 already importable from {found}; leaving it as it is")
        return
    install_from_sdist(download_sdist(args.cache_dir))
    log(f"detectron2 installed at {importable_detectron2()}")


if __name__ == "__main__":
    main()
