"""Iterative box refinement of DeformableDetr and Dino with boxes that move.

The reference fixtures cannot show it: the references initialise the last layer of every
box head to zero, so their refined boxes equal the reference points. Here the last layers
are random. What the references define, checked on a tiny model of each:

* two-stage query selection starts the decoder from the selected proposals refined by the
  proposal box head on the normalised encoder memory;
* a decoder layer's refined boxes are its box head on the layer's output (for DINO before
  the decoder's final norm), added to the layer's reference in inverse-sigmoid space, and
  are the next layer's reference, read detached (the sampling points it is given);
* the prediction of layer i refines layer i's reference with head i on the hidden state the
  class heads see (DINO: after the final norm);
* gradients: DINO's look-forward-twice lets layer i+1's boxes reach layer i's refinement
  exactly through the reference it refines (d sum(boxes_{i+1}) / d delta_i =
  boxes_{i+1} (1 - boxes_{i+1})); Deformable DETR's detached references let none through.
"""
import pytest
import torch

from detr_d2.modeling.box_ops import inverse_sigmoid
from detr_d2.modeling.deformable_transformer import scaled_reference_points
from detr_d2.modeling.multi_scale.two_stage import encoder_proposals
from tests.helpers import padded_image_batch, tiny_model

DEFORMABLE = ("MODEL.META_ARCHITECTURE", "DeformableDetr", "MODEL.MULTI_SCALE.WITH_BOX_REFINE", "True",
              "MODEL.MULTI_SCALE.TWO_STAGE", "True")
DINO = ("MODEL.META_ARCHITECTURE", "Dino", "MODEL.DINO.SHARE_BOX_HEADS", "False", "MODEL.DINO.DN_NUMBER", "0")
COMMON = ("MODEL.RESNETS.OUT_FEATURES", "['res3', 'res4', 'res5']", "MODEL.DETR.DEC_LAYERS", "2",
          "MODEL.DETR.NUM_OBJECT_QUERIES", "10", "MODEL.MULTI_SCALE.TOPK_DETECTIONS", "20",
          "MODEL.DETR.NUM_CLASSES", "3")


class DecoderRecorder:
    """Forward hooks: the decoder's arguments, each decoder layer's arguments and output,
    and every output of each box head in call order."""

    def __init__(self, model):
        self.decoder_args, self.layer_args, self.layer_outputs = None, [], []
        self.head_outputs = {index: [] for index in range(len(model.bbox_embed))}
        decoder = model.transformer.decoder
        decoder.register_forward_pre_hook(self._decoder)
        for layer in decoder.layers:
            layer.register_forward_pre_hook(lambda module, args: self.layer_args.append(args))
            layer.register_forward_hook(lambda module, args, output: self.layer_outputs.append(output))
        for index, head in enumerate(model.bbox_embed):
            head.register_forward_hook(lambda module, args, output, index=index: self._head(index, output))

    def _decoder(self, module, args):
        self.decoder_args = args

    def _head(self, index, output):
        if output.requires_grad:
            output.retain_grad()
        self.head_outputs[index].append(output)


def moving_boxes_model(variant):
    """A tiny model of ``variant`` (eval mode: no dropout) whose box heads' last layers are
    random, and so is DINO's final decoder norm (at its initialisation it barely changes the
    layers' own normalised outputs), recorded by a ``DecoderRecorder``."""
    model = tiny_model(*variant, *COMMON).eval()
    generator = torch.Generator().manual_seed(1)
    transformer = model.transformer
    proposal_head = getattr(transformer, "enc_out_bbox_embed", None)
    randomised = [*(head.layers[-1] for head in model.bbox_embed), getattr(transformer.decoder, "norm", None),
                  proposal_head and proposal_head.layers[-1]]
    with torch.no_grad():
        for module in filter(None, randomised):
            for parameter in module.parameters():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model, DecoderRecorder(model)


def refine(delta, reference):
    """The references' refinement of 4-d boxes: sigmoid(delta + logit(reference))."""
    return (delta + inverse_sigmoid(reference)).sigmoid()


@pytest.mark.parametrize("variant", [DEFORMABLE, DINO], ids=["DeformableDetr", "Dino"])
def test_the_decoder_starts_from_the_selected_proposals_refined_by_their_box_head(variant):
    """DINO ranks the positions by their best class, Deformable DETR by its first class
    output; DINO's decoder reads the anchors in inverse-sigmoid space."""
    model, recorded = moving_boxes_model(variant)
    with torch.no_grad():
        model.predict(padded_image_batch(model))
    transformer, dino = model.transformer, variant == DINO
    memory, levels = recorded.decoder_args[2:4]
    with torch.no_grad():
        output_memory, proposals = encoder_proposals(memory, levels.mask, levels.level_shapes)
        normed = transformer.enc_output_norm(transformer.enc_output(output_memory))
        if dino:
            scores = transformer.enc_out_class_embed(normed).max(-1)[0]
            deltas = transformer.enc_out_bbox_embed(normed)
        else:
            scores = model.class_embed[-1](normed)[..., 0]
            deltas = model.bbox_embed[-1](normed)
    assert deltas.abs().max() > 0.05, "the proposal head should move the proposals"
    top = scores.topk(10, dim=1)[1]
    selected = torch.gather(deltas + proposals, 1, top[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(recorded.decoder_args[1], selected if dino else selected.sigmoid())


@pytest.mark.parametrize("variant", [DEFORMABLE, DINO], ids=["DeformableDetr", "Dino"])
def test_each_layer_refines_its_reference_and_hands_the_result_on(variant):
    model, recorded = moving_boxes_model(variant)
    with torch.no_grad():
        boxes = model.predict(padded_image_batch(model))[1]
    dino = variant == DINO
    levels = recorded.decoder_args[3]
    first = recorded.decoder_args[1].sigmoid() if dino else recorded.decoder_args[1]
    norm = model.transformer.decoder.norm if dino else torch.nn.Identity()
    raw = recorded.layer_outputs
    second = refine(model.bbox_embed[0](raw[0]), first)
    assert (second - first).abs().max() > 0.05, "the boxes should move"
    torch.testing.assert_close(recorded.layer_args[1][2], scaled_reference_points(second, levels.valid_ratios))
    torch.testing.assert_close(boxes[0], refine(model.bbox_embed[0](norm(raw[0])), first))
    torch.testing.assert_close(boxes[1], refine(model.bbox_embed[1](norm(raw[1])), second))


def test_dino_looks_forward_twice():
    model, recorded = moving_boxes_model(DINO)
    boxes = model.predict(padded_image_batch(model))[1]
    boxes[1].sum().backward()
    refinement, own_prediction = recorded.head_outputs[0]  # the decoder's call on layer 0, then the heads'
    last = boxes[1].detach()
    torch.testing.assert_close(refinement.grad, last * (1 - last), rtol=1e-4, atol=1e-7)
    assert own_prediction.grad is None or not own_prediction.grad.any()


def test_deformable_detr_references_are_detached():
    model, recorded = moving_boxes_model(DEFORMABLE)
    boxes = model.predict(padded_image_batch(model))[1]
    boxes[1].sum().backward()
    refinement, own_prediction = recorded.head_outputs[0]
    assert refinement.grad is None or not refinement.grad.any()
    assert own_prediction.grad is None or not own_prediction.grad.any()
    assert model.bbox_embed[1].layers[-1].weight.grad.abs().sum() > 0
