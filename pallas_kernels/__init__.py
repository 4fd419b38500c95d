"""Paged-attention kernels for jinfer, each with a plain-jnp reference beside it.

`reference.paged_attention_reference` is the oracle (and the CPU path). The Pallas kernels (Triton
lowering on GPU, `interpret=True` on CPU) plug in behind `jinfer.model.attention`.
"""

from pallas_kernels.paged_prefill import ragged_paged_attention_pallas
from pallas_kernels.reference import (gather_pages, paged_attention_reference,
                                      ragged_paged_attention_reference)

__all__ = ["gather_pages", "paged_attention_reference", "ragged_paged_attention_pallas",
           "ragged_paged_attention_reference"]
