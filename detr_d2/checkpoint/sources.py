"""What tools/convert_detr_checkpoint.py reads and writes besides torch checkpoint files:
transformers model folders and safetensors files.

A transformers DETR is a folder with ``config.json`` and its weights as ``model.safetensors``
or ``pytorch_model.bin`` (or their sharded ``*.index.json`` forms), or the weights file
alone (``config.json`` beside it is read when present). Safetensors files are read with
the safetensors library (tensors only, no pickle), ``.bin`` files with tensor-only
``torch.load``. transformers itself is not needed.
"""
import json
import os
from dataclasses import dataclass, field

import torch

from detr_d2.checkpoint.io import CheckpointError, atomic_write, load_checkpoint_file

__all__ = ["Source", "read_source", "read_weights_file", "write_transformers_folder"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class Source:
    """A converter input: its model state dict, the other entries of a checkpoint file,
    and a transformers ``config.json`` / ``preprocessor_config.json`` found with it."""

    path: str
    state_dict: dict
    extras: dict = field(default_factory=dict)
    hf_config: dict = None
    preprocessor: dict = None


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError("reading and writing .safetensors files needs the safetensors package: "
                              "pip install safetensors") from None
    return safetensors.torch


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable json: {error}") from None


def read_weights_file(path, trust_pickle=False):
    """State dict of one weights file (.safetensors, or a torch file of tensors)."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            return _safetensors().load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError/OSError kinds
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({error})") from None
    loaded = load_checkpoint_file(path, trust_pickle)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    return loaded


def _read_sharded(index_path, trust_pickle):
    shards = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
    state = {}
    for shard in shards:
        state.update(read_weights_file(os.path.join(os.path.dirname(index_path), shard), trust_pickle))
    return state


def _folder_weights(folder):
    found = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not found:
        raise CheckpointError(f"{folder} is a folder without transformers weights: expected one of "
                              f"{', '.join(WEIGHT_FILES)} (with {CONFIG_FILE})")
    return os.path.join(folder, found[0])


def _split_checkpoint(loaded, path):
    """(state dict, other entries): the "model" entry of a checkpoint, or a bare state dict."""
    if isinstance(loaded.get("model"), dict):
        return loaded["model"], {k: v for k, v in loaded.items() if k != "model"}
    if loaded and all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return loaded, {}
    keys = sorted(map(str, loaded))[:10]
    raise CheckpointError(f"{path} is not a model checkpoint: expected a dict with a 'model' state dict, "
                          f"or a state dict of tensors; found {keys}")


def read_source(path, trust_pickle=False):
    """The ``Source`` of ``path``: a torch checkpoint file, a safetensors file, or a
    transformers model folder. CheckpointError for anything unreadable."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    weights = _folder_weights(path) if os.path.isdir(path) else path
    if weights.endswith(".index.json"):
        state, extras = _read_sharded(weights, trust_pickle), {}
    else:
        state, extras = _split_checkpoint(read_weights_file(weights, trust_pickle), path)
    config_path, preprocessor_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, PREPROCESSOR_FILE)
    hf_config = _read_json(config_path) if os.path.isfile(config_path) else None
    if hf_config is not None and hf_config.get("model_type") != "detr":
        hf_config = None  # a config.json of something else in the same folder
    preprocessor = _read_json(preprocessor_path) if hf_config and os.path.isfile(preprocessor_path) else None
    return Source(path, state, extras, hf_config, preprocessor)


def write_transformers_folder(folder, state_dict, config, preprocessor=None):
    """Write ``config.json``, ``model.safetensors`` (and ``preprocessor_config.json``) into
    ``folder`` (created), each file atomically."""
    os.makedirs(folder, exist_ok=True)
    tensors = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}
    data = _safetensors().save(tensors, metadata={"format": "pt"})
    atomic_write(os.path.join(folder, "model.safetensors"), lambda f: f.write(data))
    files = [(CONFIG_FILE, config), (PREPROCESSOR_FILE, preprocessor)]
    for name, content in files:
        if content is not None:
            atomic_write(os.path.join(folder, name), lambda f, c=content: json.dump(c, f, indent=2), binary=False)
