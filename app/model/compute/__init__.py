"""The accelerator side of the model: what the worker thread runs on the device, step by step."""
