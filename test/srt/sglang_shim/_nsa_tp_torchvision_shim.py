"""CPU-only test shim: lets PyPI's torchvision import beside a CPU build of torch.

PyPI's torchvision wheel carries CUDA kernels; on a CPU-only torch its C extension does not load, and
``import torchvision`` then fails registering fake kernels for ops nobody defined ("operator
torchvision::nms does not exist"). SGLang and transformers import torchvision while parsing arguments
and model configs, so the CPU tests of nsa-tp's SGLang plugin need it importable.

``scripts/install_sglang_cpu.sh`` copies this module and a one-line ``.pth`` into site-packages. At
interpreter start it only installs a finder (no torch import); the first ``import torchvision`` defines
the two op schemas torchvision registers fake kernels for, unless they exist already. Never installed
on GPU machines.
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the definitions alive: torch drops a Library's ops when it is collected


def _define_missing_schemas() -> None:
    global _library
    import torch

    if torch.version.cuda is not None:  # a CUDA torch loads torchvision's own kernels: nothing to do
        return
    for name, schema in _SCHEMAS.items():
        if torch._C._dispatch_has_kernel(f"torchvision::{name}") or _exists(f"torchvision::{name}"):
            continue
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        _library.define(schema)


def _exists(qualname: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib's protocol
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _define_missing_schemas()
        return None  # the ordinary finders import torchvision itself


def install() -> None:
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


install()
