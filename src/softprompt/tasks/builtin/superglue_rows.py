"""`!function`s of the built-in SuperGLUE task files (lm-eval style: a document in, text or choices out)."""

from __future__ import annotations

from softprompt.tasks.data import DataError, short

COPA_CONNECTORS = {"cause": "because", "effect": "therefore"}


def copa_text(doc: dict) -> str:
    """The premise without its final period, then the connector the choice continues from."""
    question = doc["question"]
    if question not in COPA_CONNECTORS:
        raise DataError(f"unknown COPA question {short(question)}; expected one of {sorted(COPA_CONNECTORS)}")
    return f"{doc['premise'].strip().rstrip('.')} {COPA_CONNECTORS[question]}"


def copa_choices(doc: dict) -> list[str]:
    """Both choices, first letter lower-cased: they continue the premise's sentence."""
    for name in ("choice1", "choice2"):
        if not doc[name].strip():
            raise DataError(f"field {name!r} is empty; a COPA choice needs text")
    return [doc[name][0].lower() + doc[name][1:] for name in ("choice1", "choice2")]


def multirc_answers(dataset):
    """One document per answer: paragraph, question, answer, label and the question's id (for EM)."""
    import datasets

    docs = []
    for row in dataset:
        paragraph = row["passage"]["text"]
        for q, question in enumerate(row["passage"]["questions"]):
            for answer in question["answers"]:
                if answer.get("label") not in (0, 1):
                    raise DataError(f"MultiRC answer {short(answer.get('text'))} has label {short(answer.get('label'))}; expected 0 or 1")
                docs.append({
                    "paragraph": paragraph,
                    "question": question["question"],
                    "answer": answer["text"],
                    "label": answer["label"],
                    "question_id": f"{row.get('idx')}-{question.get('idx', q)}",
                })
    return datasets.Dataset.from_list(docs)
