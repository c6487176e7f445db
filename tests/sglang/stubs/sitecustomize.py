"""TEST-ONLY shim for the CPU SGLang CI stage (tests/sglang). Production never puts this folder on sys.path.

The torchvision wheel from PyPI is built against CUDA torch; with the CPU torch 2.13 build its C++ ops library
does not load, and `import torchvision` then fails in `register_fake("torchvision::nms")` (and `qnms`) because the
operators' schemas were never defined. SGLang imports torchvision (multimodal utils) even for text-only models, so before the
first `import torchvision` this defines the schema (no kernel: nothing here ever runs nms).

Loaded because scripts/test_sglang.sh puts tests/sglang/stubs on PYTHONPATH (Python imports `sitecustomize`
at startup, also in SGLang's subprocesses), next to the `sgl_kernel` stand-in.
"""

import importlib.abc
import sys


class _DefineNmsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        for op in ("nms", "qnms"):  # the two ops torchvision's meta registrations name unconditionally
            try:
                torch.library.define(
                    f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                )
            except RuntimeError:
                pass  # already defined (a torchvision whose ops library did load)
        return None  # let the normal finders import torchvision


sys.meta_path.insert(0, _DefineNmsFirst())
