"""The command line: ``steer`` (main.py) and the modules behind its generate, batch and export commands.

The only part of steer/ that may import steer.training, steer.service and steer.ui."""
