"""Model core: the Llama forward, its KV cache, Medusa heads and loading."""
