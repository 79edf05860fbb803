"""`python -m gptpipe` (and `torchrun -m gptpipe`, `accelerate launch -m gptpipe`) run the CLI."""

from gptpipe.cli import main

if __name__ == "__main__":
    main()
