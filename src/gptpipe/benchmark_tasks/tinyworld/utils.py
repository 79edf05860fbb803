"""The tinyworld lm-evaluation-harness task's data and scoring (loaded by lm-eval from the task's YAML)."""

from datasets import Dataset, DatasetDict

from gptpipe.data import tinyworld
from gptpipe.data.answers import answers_in_first_sentence


def dataset(**_) -> DatasetDict:
    """SFT's questions: held out (``test``, the SFT stage's evidence) and trained on (``train``, few-shot)."""
    parts = tinyworld.generate(seed=0)["questions"]

    def rows(split: str) -> Dataset:
        found = [{"question": r["prompt"][-1]["content"], "answer": r["answer"]} for r in parts[split]]
        return Dataset.from_list(found)

    return DatasetDict({"test": rows("eval"), "train": rows("train")})


def process_results(doc: dict, results: list[str]) -> dict:
    return {"answer_accuracy": float(answers_in_first_sentence(results[0], doc["answer"]))}
