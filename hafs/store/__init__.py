"""Block storage: backing directories, remote nodes, placement on the ring, chunking."""
