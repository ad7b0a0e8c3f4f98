"""Merging a config file and ``KEY VALUE`` overrides into a config, every key checked.

A misspelt key is reported with the closest existing keys, a file that cannot be read or
is not YAML with its name, and yacs' type complaints as "KEY must be ... but SOURCE gives
...", all as ``SetupError``.
"""
import difflib
import re

import yaml
from detectron2.config import CfgNode

from detr_d2.errors import SetupError

__all__ = ["merge_config"]


def _all_keys(node, prefix=""):
    """Every dotted key of a CfgNode, inner nodes included (e.g. "SOLVER", "SOLVER.AMP")."""
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, f"{prefix}{key}.")


def _leaf_keys(data, prefix=""):
    """Dotted keys of the leaves of a nested dict loaded from a yaml config."""
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _is_known(cfg, dotted_key):
    """True if ``dotted_key`` exists in ``cfg`` or lies under a node that accepts new keys."""
    node = cfg
    for part in dotted_key.split("."):
        if not isinstance(node, CfgNode):
            return False
        if part not in node:
            return node.is_new_allowed()
        node = node[part]
    return True


def _unknown_key_message(key, cfg, source):
    """"Unknown config key KEY in SOURCE." with the closest existing keys, if any."""
    keys = list(_all_keys(cfg))
    close = (difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.6))
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"Unknown config key {key} in {source}.{hint}"


def _raise_on_unknown_keys(cfg, keys, source):
    """SetupError listing every key of ``keys`` (from ``source``) that ``cfg`` does not have."""
    unknown = [key for key in keys if not _is_known(cfg, key)]
    if unknown:
        lines = [_unknown_key_message(key, cfg, source) for key in unknown]
        lines.append("Valid keys are detectron2's defaults plus those of "
                     "detr_d2.add_detr_config; fix the spelling or remove the key.")
        raise SetupError("\n".join(lines))


def _load_config_file(config_file):
    """The config file as a nested dict, its ``_BASE_`` files merged in."""
    try:
        return CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
    except OSError as e:
        raise SetupError(f"Cannot read config file {config_file} (or a _BASE_ file it names): "
                         f"{e}") from e
    except yaml.YAMLError as e:
        raise SetupError(f"Config file {config_file} (or a _BASE_ file it names) is not valid "
                         f"YAML: {e}") from e


_TYPE_MISMATCH = re.compile(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values "
                            r"\((.*) vs\. (.*)\) for config key: (\S+)", re.DOTALL)
_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "True or False", "str": "a string",
               "tuple": "a tuple, e.g. (1, 2)", "list": "a list, e.g. [1, 2]"}


def _type_mismatch_message(error, source):
    """yacs' "Type mismatch" complaint as: key, value given, type expected, example; or None."""
    match = _TYPE_MISMATCH.search(str(error))
    if not match:
        return None
    expected, given, default, value, key = match.groups()
    return (f"{key} must be {_TYPE_WORDS.get(expected, 'of type ' + expected)} but {source} gives "
            f"{value} ({_TYPE_WORDS.get(given, given)}); write it like its default, e.g. {key} {default}.")


def _merge(merge_fn, source):
    """Run a CfgNode merge, reporting yacs' own complaints (e.g. a type mismatch) by source."""
    try:
        merge_fn()
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SetupError(_type_mismatch_message(e, source) or f"Cannot apply {source}: {e}") from e


def merge_config(cfg, config_file, opts):
    """Merge ``config_file`` and then the ``KEY VALUE`` list ``opts`` into ``cfg`` in place;
    returns ``cfg``.

    Every key is checked to exist in ``cfg`` first; an unknown key is reported with the
    closest existing ones.
    """
    if config_file:
        loaded = _load_config_file(config_file)
        if loaded.get("VERSION", cfg.VERSION) == cfg.VERSION:  # older versions get renamed keys
            _raise_on_unknown_keys(cfg, _leaf_keys(loaded), f"config file {config_file}")
        _merge(lambda: cfg.merge_from_file(config_file), f"config file {config_file}")
    if opts:
        if len(opts) % 2:
            raise SetupError(f"Command-line overrides come in KEY VALUE pairs; got an odd "
                             f"number of words: {' '.join(opts)}")
        _raise_on_unknown_keys(cfg, opts[0::2], "the command line")
        _merge(lambda: cfg.merge_from_list(opts), "the command line")
    return cfg
