"""One module per method; importing this package registers them all."""

from . import (
    aligned_mtl,
    basic,
    cagrad,
    config,
    crmogm,
    cross,
    db_mtl,
    dual_cone,
    elementwise,
    excess_mtl,
    fairgrad,
    gradnorm,
    gradvac,
    imtl_g,
    krum,
    mgda,
    moco,
    nash_mtl,
    nsgd,
    pcd,
    pcgrad,
)

__all__ = ["aligned_mtl", "basic", "cagrad", "config", "crmogm", "cross", "db_mtl", "dual_cone", "elementwise",
           "excess_mtl", "fairgrad", "gradnorm", "gradvac", "imtl_g", "krum", "mgda", "moco", "nash_mtl", "nsgd", "pcd",
           "pcgrad"]
