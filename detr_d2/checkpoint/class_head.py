"""A checkpoint's class head carried over to another class list by class name.

Fine-tuning on classes that include some the checkpoint already knows (the panoptic shapes'
things are the bundled detector's 6 shapes) need not start the whole class head afresh:
the rows of the known names are kept, the other classes get a fresh ``nn.Linear`` row
(PyTorch's default initialisation, as a new head has), and the no-object row (the last) is
kept.
"""
import torch
from torch import nn

__all__ = ["class_head_by_name"]


def class_head_by_name(state_dict, old_names, new_names, prefix="class_embed.", seed=0):
    """A copy of ``state_dict`` whose class head has ``len(new_names) + 1`` outputs.

    Args:
        state_dict (dict[str, Tensor]): the model tensors; ``prefix + "weight"`` is
            [len(old_names) + 1, D] and ``prefix + "bias"`` [len(old_names) + 1], the last row
            "no object".
        old_names (list[str]): the checkpoint's classes, in row order.
        new_names (list[str]): the classes of the model to load it into, in row order.
        seed (int): seed of the fresh rows' initialisation.

    Returns:
        (dict, list[str]): the new state dict (other tensors shared, not copied) and the
            names whose rows were kept.
    """
    weight, bias = state_dict[prefix + "weight"], state_dict[prefix + "bias"]
    if weight.shape[0] != len(old_names) + 1:
        raise ValueError(f"{prefix}weight has {weight.shape[0]} rows, not {len(old_names)} classes + no-object")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    fresh = nn.Linear(weight.shape[1], len(new_names) + 1)
    torch.random.set_rng_state(generator_state)
    new_weight, new_bias = fresh.weight.detach().to(weight.dtype), fresh.bias.detach().to(bias.dtype)
    kept = [name for name in new_names if name in old_names]
    for row, name in enumerate(new_names):
        if name in old_names:
            new_weight[row], new_bias[row] = weight[old_names.index(name)], bias[old_names.index(name)]
    new_weight[-1], new_bias[-1] = weight[-1], bias[-1]
    return {**state_dict, prefix + "weight": new_weight, prefix + "bias": new_bias}, kept
