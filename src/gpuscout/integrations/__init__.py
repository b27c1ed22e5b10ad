"""Plug-ins for training frameworks (``gpuscout.integrations.lightning``:
PyTorch Lightning; ``gpuscout.integrations.transformers``: the Hugging Face
Trainer). Importing this package imports no framework."""
