"""Deformable DETR's transformer: the deformable encoder over the flattened levels, its
query selection (learned queries, or two-stage proposals) and its decoder with optional
iterative box refinement.

Parameter names follow the reference (``level_embed``, ``encoder.layers``,
``decoder.layers``, ``reference_points``; two-stage ``enc_output(_norm)``,
``pos_trans(_norm)``). The box and class heads belong to the meta-architecture and are
passed in; the reference's aliases of them inside the decoder are not kept.
"""
import torch
from torch import nn

from detr_d2.modeling.box_ops import inverse_sigmoid
from detr_d2.modeling.multi_scale.decoder_layer import DeformableDecoderLayer
from detr_d2.modeling.multi_scale.encoder import DeformableEncoder, flatten_levels
from detr_d2.modeling.multi_scale.two_stage import box_sine_embedding, encoder_proposals

__all__ = ["DeformableDecoder", "DeformableTransformer", "refined_boxes", "scaled_reference_points",
           "xavier_matrices"]


def refined_boxes(delta, reference):
    """A box head's output [..., 4] applied to reference points [..., 2] (centres: the
    offset of the centre, absolute size) or [..., 4] (boxes: every coordinate offset), in
    inverse-sigmoid space -> boxes [..., 4] normalised cxcywh."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def scaled_reference_points(reference_points, valid_ratios):
    """[B, Q, 2|4] normalised by the unpadded image, [B, L, 2] -> [B, Q, L, 2|4]
    normalised by each level's padded map (widths/heights scaled too)."""
    ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
    return reference_points[:, :, None] * ratios[:, None]


class DeformableDecoder(nn.Module):
    """forward(tgt [B, Q, C], reference_points [B, Q, 2|4], memory [B, S, C], levels
    (FlatLevels), query_pos [B, Q, C], box_heads (per layer, iterative refinement) or None,
    self_attn_mask [Q, Q] or None) -> (hidden [L_dec, B, Q, C], references [L_dec, B, Q, 2|4]:
    the reference points each layer read). With ``box_heads`` each layer's refined boxes
    (detached) are the next layer's reference points."""

    def __init__(self, num_layers, **layer_arguments):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(**layer_arguments) for _ in range(num_layers))

    def forward(self, tgt, reference_points, memory, levels, query_pos, box_heads=None, self_attn_mask=None):
        hidden, references = [], []
        output = tgt
        for index, layer in enumerate(self.layers):
            references.append(reference_points)
            points = scaled_reference_points(reference_points, levels.valid_ratios)
            output = layer(output, query_pos, points, memory, levels.spatial_shapes, levels.mask, self_attn_mask,
                           levels.level_shapes)
            hidden.append(output)
            if box_heads is not None:
                reference_points = refined_boxes(box_heads[index](output), reference_points).detach()
        return torch.stack(hidden), references


def xavier_matrices(transformer):
    """Xavier-uniform initialisation of every matrix of a multi-scale transformer (with
    ``encoder`` and ``decoder.layers``) except the deformable attention modules' own, in the
    order the references draw them: the rest first, then each decoder layer's self-attention."""
    for name, parameter in transformer.named_parameters():
        if parameter.dim() > 1 and ".self_attn." not in name and ".cross_attn." not in name:
            nn.init.xavier_uniform_(parameter)
    for layer in transformer.decoder.layers:
        nn.init.xavier_uniform_(layer.self_attn.in_proj_weight)
        nn.init.xavier_uniform_(layer.self_attn.out_proj.weight)


class DeformableTransformer(nn.Module):
    """forward(maps, masks, positions: per level [B, C, h, w] / [B, h, w] / [B, C, h, w];
    query_embed [Q, 2C] (learned queries: position, content) or None (two-stage);
    box_heads: per decoder layer (refinement) or None; proposal_heads: (class head, box
    head) of the two-stage proposals or None) -> (hidden [L_dec, B, Q, C], references:
    per layer [B, Q, 2|4], encoder_outputs: (logits [B, S, K], boxes [B, S, 4]) of the
    proposals, or None)."""

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
                 dropout=0.1, num_feature_levels=4, enc_n_points=4, dec_n_points=4, two_stage=False,
                 two_stage_num_proposals=300):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        common = {"d_model": d_model, "d_ffn": dim_feedforward, "dropout": dropout, "n_levels": num_feature_levels,
                  "n_heads": nhead}
        self.encoder = DeformableEncoder(num_encoder_layers, n_points=enc_n_points, **common)
        self.decoder = DeformableDecoder(num_decoder_layers, n_points=dec_n_points, **common)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier for matrices (the attention modules keep their own initialisation),
        normal level embeddings."""
        xavier_matrices(self)
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def learned_queries(self, query_embed, batch):
        """query_embed [Q, 2C] -> (query_pos, tgt [B, Q, C], reference points [B, Q, 2])."""
        query_pos, tgt = query_embed.split(self.d_model, dim=1)
        query_pos = query_pos[None].expand(batch, -1, -1)
        return query_pos, tgt[None].expand(batch, -1, -1), self.reference_points(query_pos).sigmoid()

    def proposal_queries(self, memory, levels, class_head, box_head):
        """Two-stage: the encoder positions' top-Q proposals (by the first class's logit) ->
        (query_pos, tgt [B, Q, C] from their boxes' sine embedding (C/2 features per
        coordinate: the reference's 128 at C = 256), reference boxes [B, Q, 4] detached,
        encoder_outputs (logits [B, S, K], boxes [B, S, 4]))."""
        output_memory, proposals = encoder_proposals(memory, levels.mask, levels.level_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_logits = class_head(output_memory)
        enc_boxes_unsigmoided = box_head(output_memory) + proposals
        if enc_logits.shape[1] < self.two_stage_num_proposals:
            raise ValueError(f"two-stage query selection needs at least MODEL.DETR.NUM_OBJECT_QUERIES "
                             f"({self.two_stage_num_proposals}) encoder positions, the input gives "
                             f"{enc_logits.shape[1]}: use larger images or fewer queries")
        top = torch.topk(enc_logits[..., 0], self.two_stage_num_proposals, dim=1)[1]
        top_boxes = torch.gather(enc_boxes_unsigmoided, 1, top[..., None].expand(-1, -1, 4)).detach().sigmoid()
        embedding = self.pos_trans_norm(self.pos_trans(box_sine_embedding(top_boxes, self.d_model // 2)))
        query_pos, tgt = embedding.split(self.d_model, dim=2)
        return query_pos, tgt, top_boxes, (enc_logits, enc_boxes_unsigmoided.sigmoid())

    def forward(self, maps, masks, positions, query_embed=None, box_heads=None, proposal_heads=None):
        levels = flatten_levels(maps, masks, positions, self.level_embed)
        memory = self.encoder(levels)
        if self.two_stage:
            query_pos, tgt, reference_points, encoder_outputs = self.proposal_queries(memory, levels, *proposal_heads)
        else:
            query_pos, tgt, reference_points = self.learned_queries(query_embed, memory.shape[0])
            encoder_outputs = None
        hidden, references = self.decoder(tgt, reference_points, memory, levels, query_pos, box_heads)
        return hidden, references, encoder_outputs
