"""Administration tools: fsck, rebalance, node management, status."""
