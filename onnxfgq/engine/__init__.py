"""Block-by-block execution: cut a graph into a chain of blocks (blocks.py) and calibrate it block
after block over cached activations (runner.py), memory bounded by one block."""
