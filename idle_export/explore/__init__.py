"""explore stage: `show` (which tokens each idle layer keeps) and `sweep` (keep ratio against
agreement and speed, and picking a ratio for a budget)."""
