"""The model as pure functions over pytrees: configs, layers, one module per family, attention
backends, the KV pool and the sampler."""
