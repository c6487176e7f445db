"""TEST-ONLY stand-in for `sgl_kernel` (SGLang's compiled kernel package), for the CPU SGLang CI stage.

PyPI has no CPU build of SGLang's kernel package. SGLang imports some names from it unconditionally at import
time, but a plain Llama/Qwen2 forward on CPU with `attention_backend="torch_native"` calls none of them. Exactly
those names exist here (anything else raises ImportError, so SGLang's own `try: import ... except ImportError`
fallbacks still apply); calling one raises, so a stage that needs a real kernel fails loudly instead of silently
computing something else. Production never has this folder on sys.path: GPU servers install the real
`sglang-kernel` wheel with sglang (docs/sglang.md).
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+wisp-test-standin"
WISP_TEST_STANDIN = True


def _missing(qualname: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"{qualname}: the test-only sgl_kernel stand-in has no kernels (install the real sglang-kernel)"
        )

    kernel.__name__ = kernel.__qualname__ = qualname.rsplit(".", 1)[-1]
    return kernel


# Names SGLang 0.5.23 imports unconditionally on the CPU text-model path, per (sub)module.
NAMES: dict[str, set[str]] = {
    "sgl_kernel": {
        "assign_draft_cache_locs_contiguous_cpu",
        "assign_extend_cache_locs_cpu",
        "assign_req_to_token_pool_cpu",
        "build_tree_kernel_efficient_cpu",
        "copy_all_layer_kv_cache_cpu",
        "fill_accept_out_cache_loc_cpu",
        "fill_bonus_tokens_cpu",
        "verify_tree_greedy_cpu",
    },
}


def _module_getattr(modname: str):
    def __getattr__(name: str):
        if name in NAMES.get(modname, ()):
            return _missing(f"{modname}.{name}")
        raise AttributeError(f"module {modname!r} (test-only stand-in) has no attribute {name!r}")

    return __getattr__


__getattr__ = _module_getattr(__name__)


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The submodules listed in NAMES import as stand-in modules; any other `sgl_kernel.x` is absent."""

    def find_spec(self, name, path=None, target=None):
        if name in NAMES and name != __name__:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _module_getattr(spec.name)
        return mod

    def exec_module(self, module):
        pass


sys.meta_path.append(_Submodules())
