"""Parts shared by the multi-scale DETRs (``DeformableDetr``, ``Dino``): deformable attention,
the neck, the deformable encoder and decoder layer, two-stage proposals, focal matching and
losses, top-k post-processing."""
