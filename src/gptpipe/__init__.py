"""gptpipe: train GPT assistants stage by stage on the Hugging Face stack."""

__version__ = "0.1.0"
