"""Equal Mosaic GPU kernels get equal hashes in every jitted program that uses them.

Pallas's Mosaic GPU lowering (jax >= 0.11.1) names each kernel module it lowers with a
process-wide counter: the module attribute `mosaic_gpu.dump_basename` ("body_0", "body_1", ...),
a file name for debug dumps. That attribute is part of the module bytes whose SHA-256 keys
jaxlib's cache of compiled kernels, so one kernel lowered into several programs (the decode step
of each block-table width, each multi-step count) is compiled again in each of them: LLVM and
ptxas, ~2 s per kernel on an H100 host. It also makes a program's text, and with it JAX's
persistent-cache key, depend on how many kernels the process lowered before it.

`stable_kernel_hashes()` wraps Mosaic GPU's custom-call lowering (which Pallas calls by its
module attribute, and the mosaic_gpu primitive through JAX's registry) so that the attribute is
dropped before the module is hashed (jaxlib names the module itself when it compiles it, for
dumps). It patches JAX for the process, once; jax versions without the attribute are
unaffected, and one without the function is left alone.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_ATTRIBUTE = "mosaic_gpu.dump_basename"
_installed = False


def stable_kernel_hashes() -> None:
    """Installs the wrapped lowering (idempotent; a no-op where JAX's internals differ)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from jax._src.interpreters import mlir
        from jax.experimental.mosaic.gpu import core
        rule, primitive = core._mosaic_gpu_lowering_rule, core.mosaic_gpu_p
    except (ImportError, AttributeError) as e:  # another JAX: leave its lowering alone
        logger.debug("Mosaic GPU kernel hashes left as they are: %s", e)
        return

    def lowering(ctx, *args, module, **params):
        attributes = module.operation.attributes
        if _ATTRIBUTE in attributes:
            del attributes[_ATTRIBUTE]
        return rule(ctx, *args, module=module, **params)

    core._mosaic_gpu_lowering_rule = lowering  # Pallas's path: it looks the rule up here
    mlir.register_lowering(primitive, lowering, "cuda")
