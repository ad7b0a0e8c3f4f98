"""DINO's transformer: the deformable encoder, mixed query selection and the decoder with
4-d anchor boxes and look-forward-twice box refinement.

Mixed query selection: the top-Q encoder proposals (by their best class logit) give the
decoder's anchor boxes; its content queries are learned (``tgt_embed``). Each decoder
layer's query position is an MLP (``ref_point_head``) of the sine embedding of its anchor
box. Look-forward-twice: layer i's refined box is detached as layer i+1's anchor, but the
un-detached box is what layer i+1's prediction refines, so layer i+1's box loss also trains
layer i's box head.

Parameter names follow the reference (``level_embed``, ``encoder.layers``,
``decoder.layers``, ``decoder.norm``, ``decoder.ref_point_head``, ``enc_output(_norm)``,
``enc_out_class_embed``, ``enc_out_bbox_embed``, ``tgt_embed``). The decoder's box heads
belong to the meta-architecture and are passed in.
"""
import torch
from torch import nn

from detr_d2.modeling.deformable_transformer import refined_boxes, scaled_reference_points, xavier_matrices
from detr_d2.modeling.mlp import MLP
from detr_d2.modeling.multi_scale.decoder_layer import DeformableDecoderLayer
from detr_d2.modeling.multi_scale.encoder import DeformableEncoder, flatten_levels
from detr_d2.modeling.multi_scale.two_stage import box_sine_embedding, encoder_proposals

__all__ = ["DinoDecoder", "DinoTransformer", "anchor_sine_embedding"]


def anchor_sine_embedding(boxes, features_per_coordinate):
    """[..., 4] cxcywh -> [..., 4 * features_per_coordinate]: the sine embedding of y, x, w,
    h in that order (the reference's ``gen_sineembed_for_position``)."""
    return box_sine_embedding(boxes[..., [1, 0, 2, 3]], features_per_coordinate)


class DinoDecoder(nn.Module):
    """forward(tgt [B, Q, C], anchors [B, Q, 4] inverse-sigmoid cxcywh, memory [B, S, C],
    levels (FlatLevels), box_heads (one per layer), self_attn_mask [Q, Q] or None) ->
    (hidden [L, B, Q, C] after ``norm``, references: L + 1 anchors [B, Q, 4], the first the
    initial ones, then each layer's refined boxes, not detached)."""

    def __init__(self, num_layers, d_model=256, **layer_arguments):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model=d_model, **layer_arguments)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model

    def forward(self, tgt, anchors, memory, levels, box_heads, self_attn_mask=None):
        reference = anchors.sigmoid()
        references = [reference]
        hidden = []
        output = tgt
        for layer, box_head in zip(self.layers, box_heads):
            points = scaled_reference_points(reference, levels.valid_ratios)
            query_pos = self.ref_point_head(anchor_sine_embedding(points[:, :, 0], self.d_model // 2))
            output = layer(output, query_pos, points, memory, levels.spatial_shapes, levels.mask, self_attn_mask,
                           levels.level_shapes)
            refined = refined_boxes(box_head(output), reference)
            reference = refined.detach()
            references.append(refined)
            hidden.append(self.norm(output))
        return torch.stack(hidden), references


class DinoTransformer(nn.Module):
    """forward(maps, masks, positions: per level; box_heads: per decoder layer; denoising:
    ``DenoisingQueries`` or None) -> (hidden [L, B, P + Q, C], references: L + 1 entries
    [B, P + Q, 4], (interm_logits [B, Q, K], interm_boxes [B, Q, 4]): the selected
    proposals as predicted by the encoder heads). P = the denoising queries (0 without)."""

    def __init__(self, num_classes, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.0, num_feature_levels=4, enc_n_points=4, dec_n_points=4,
                 num_queries=900):
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        common = {"d_model": d_model, "d_ffn": dim_feedforward, "dropout": dropout, "n_levels": num_feature_levels,
                  "n_heads": nhead}
        self.encoder = DeformableEncoder(num_encoder_layers, n_points=enc_n_points, **common)
        self.decoder = DinoDecoder(num_decoder_layers, n_points=dec_n_points, **common)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_class_embed = nn.Linear(d_model, num_classes)
        self.enc_out_bbox_embed = MLP(d_model, d_model, 4, 3)
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier for matrices (the attention modules keep their own initialisation), the
        content queries ``tgt_embed`` included, as the reference ends up with them (it draws
        them normal, then its Xavier pass over every matrix redraws them); normal level
        embeddings."""
        xavier_matrices(self)
        nn.init.normal_(self.level_embed)

    def select_queries(self, memory, levels):
        """Mixed query selection -> (anchors [B, Q, 4] inverse-sigmoid, detached; content
        [B, Q, C] learned; interm_logits [B, Q, K]; interm_boxes [B, Q, 4])."""
        output_memory, proposals = encoder_proposals(memory, levels.mask, levels.level_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_logits = self.enc_out_class_embed(output_memory)
        enc_boxes_unsigmoided = self.enc_out_bbox_embed(output_memory) + proposals
        if enc_logits.shape[1] < self.num_queries:
            raise ValueError(f"query selection needs at least MODEL.DETR.NUM_OBJECT_QUERIES ({self.num_queries}) "
                             f"encoder positions, the input gives {enc_logits.shape[1]}: use larger images or "
                             "fewer queries")
        top = torch.topk(enc_logits.max(-1)[0], self.num_queries, dim=1)[1]
        anchors = torch.gather(enc_boxes_unsigmoided, 1, top[..., None].expand(-1, -1, 4))
        selected_memory = torch.gather(output_memory, 1, top[..., None].expand(-1, -1, self.d_model))
        content = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        return anchors.detach(), content, self.enc_out_class_embed(selected_memory), anchors.sigmoid()

    def forward(self, maps, masks, positions, box_heads, denoising=None):
        levels = flatten_levels(maps, masks, positions, self.level_embed)
        memory = self.encoder(levels)
        anchors, content, interm_logits, interm_boxes = self.select_queries(memory, levels)
        attn_mask = None
        if denoising is not None:
            anchors = torch.cat([denoising.boxes, anchors], 1)
            content = torch.cat([denoising.content, content], 1)
            attn_mask = denoising.attn_mask
        hidden, references = self.decoder(content, anchors, memory, levels, box_heads, attn_mask)
        return hidden, references, (interm_logits, interm_boxes)
