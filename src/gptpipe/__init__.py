"""gptpipe: train GPT assistants stage by stage on the Hugging Face stack."""

import logging
import warnings

__version__ = "0.1.0"

# Noise a user cannot act on, silenced before the libraries load:
# - bitsandbytes on a CPU tries to fetch an optional kernel from the Hub and warns when it cannot;
# - TRL's own default (gradient_checkpointing=True) trips transformers' rename warning on every run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
