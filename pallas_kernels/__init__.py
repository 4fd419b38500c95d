"""Kernels for jinfer, each with a plain-jnp reference beside it.

`reference.paged_attention_reference` is the oracle of the attention kernels (and the CPU path).
The Pallas kernels (Triton lowering on GPU, Mosaic GPU on Hopper, interpret mode on CPU) plug in
behind `jinfer.model.attention`: paged_decode, fused_decode, paged_prefill, paged_prefill_mgpu,
kv_write, triton_decode. The batch-1 layer kernel (decode_layer_mgpu, with its planner
decode_layer_plan and body decode_layer_body) runs behind `jinfer.model.layer_kernel`. The
mixture-of-experts grouped matmuls (grouped_matmul, Triton lowering; grouped_matmul_mgpu,
Mosaic GPU) run behind `jinfer.model.moe`.

The package imports nothing itself, so that the pure-Python planner imports without JAX.
"""
