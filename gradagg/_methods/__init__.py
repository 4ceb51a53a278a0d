"""One module per method; importing this package registers them all."""

from . import (
    aligned_mtl,
    basic,
    cagrad,
    config,
    dual_cone,
    elementwise,
    fairgrad,
    gradnorm,
    gradvac,
    imtl_g,
    krum,
    mgda,
    nash_mtl,
    nsgd,
    pcgrad,
)

__all__ = ["aligned_mtl", "basic", "cagrad", "config", "dual_cone", "elementwise", "fairgrad", "gradnorm", "gradvac",
           "imtl_g", "krum", "mgda", "nash_mtl", "nsgd", "pcgrad"]
