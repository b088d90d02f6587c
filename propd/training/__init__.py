"""Self-distilled Medusa heads and early-exit heads, trained on the model's own greedy answers."""
