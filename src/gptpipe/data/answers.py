"""The answer check shared by the evidence code and the tiny world's labeler (imports nothing of gptpipe)."""

from __future__ import annotations

import re


def answers_in_first_sentence(reply: str, answer) -> bool:
    """The right answer appears as a whole word in the reply's first sentence."""
    first = re.split(r"(?<=[.!?])\s", reply.strip(), maxsplit=1)[0]
    return bool(re.search(rf"(?<!\w){re.escape(str(answer))}(?!\w)", first))
