"""Loading and prediction: base models (hub ids, directories, GGUF files), policies, the APM and
its reward, and the GGUF writer."""
