"""The paged engine: the fast GPU verifier, generic over transformers decoder LMs (Qwen2, Llama and kin).

backend    `PagedBackend`, the facade: the backend contract (forward, KV bookkeeping), launch, the model pass
loader     dtype, weights, the model's modules found once
batch      packing a ragged batch into one int32 buffer (pure numpy; tested on CPU)
graphs     CUDA graphs per bucket of batch shapes
attention  paged attention (Triton kernels on GPU, HF's eager math on CPU)
kernels    the Triton kernels
"""

from wisp_cloud.backends.kv_pages import KVCacheFull
from wisp_cloud.backends.paged.backend import PagedBackend

__all__ = ["KVCacheFull", "PagedBackend"]
