"""Hub side of the SpiNNaker Jupyter service."""
