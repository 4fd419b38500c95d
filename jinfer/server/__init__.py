"""The OpenAI-compatible HTTP server (`jinfer serve`): protocol models, routes, metrics, CLI."""
