"""Lets the index's torchvision wheel import beside our CPU build of torch (tests only).

That wheel is built against a CUDA torch: on ours its compiled ops do not load, and its Python
side registers fake kernels for torchvision::nms and ::qnms at import, which fails with
"operator torchvision::nms does not exist" — and so do `import timm` and transformers once
torchvision is installed. Defining the two schemas first lets the pure-Python model
definitions load; nothing here calls those ops. Nothing of the product needs this."""
import torch

_LIBRARY = None


def define_missing_ops() -> None:
    """Define the two schemas unless they exist (a working torchvision, or a second call)."""
    global _LIBRARY
    if _op_exists("nms"):
        return
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False
