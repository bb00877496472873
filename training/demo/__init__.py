"""The demo pipeline's tools: the generator of the bundled demo dataset (``build_data``)."""
