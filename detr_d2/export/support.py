"""Which configs the exporter handles; the others are refused with the key and the fix."""
from detr_d2.errors import SetupError

__all__ = ["EXPORTABLE_ARCHITECTURES", "EXPORTABLE_CHANNEL_ORDERS", "check_exportable"]

EXPORTABLE_ARCHITECTURES = ("Detr", "GroupDetr", "DeformableDetr", "Dino")
EXPORTABLE_CHANNEL_ORDERS = ("RGB", "BGR")


def check_exportable(cfg):
    """Raise SetupError naming the key when ``cfg``'s model cannot be exported: another
    meta-architecture than the DETRs', an INPUT.FORMAT the predictor cannot prepare, or
    several test sizes."""
    if cfg.MODEL.META_ARCHITECTURE not in EXPORTABLE_ARCHITECTURES:
        raise SetupError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} cannot be exported: "
                         f"the exporter handles {', '.join(EXPORTABLE_ARCHITECTURES[:-1])} and "
                         f"{EXPORTABLE_ARCHITECTURES[-1]}")
    if cfg.INPUT.FORMAT not in EXPORTABLE_CHANNEL_ORDERS:
        raise SetupError(f"INPUT.FORMAT {cfg.INPUT.FORMAT!r} cannot be exported: the predictor prepares "
                         f"{' or '.join(EXPORTABLE_CHANNEL_ORDERS)} images")
    if not isinstance(cfg.INPUT.MIN_SIZE_TEST, int):
        raise SetupError(f"INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST!r} is not one size: the export "
                         "describes one test-time resize; give a single shortest-edge length")
