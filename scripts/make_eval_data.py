"""Build the JSONL documents for the local lm-eval tasks in scripts/lm_eval_tasks/.

    .venv/bin/python scripts/make_eval_data.py [--texts .assets/texts] [--out .assets/eval]

Deterministic (evenly spaced offsets, no randomness), so every dtype and every
rerun sees the same documents. Writes, per text (moby, sotu):

* ``{name}_ppl.jsonl``       passages of ~``--passage-chars`` chars (rolling loglikelihood)
* ``{name}_lastword.jsonl``  context ending right before the last word of a sentence, target
                             `` word`` (loglikelihood, greedy acc)
* ``{name}_cont.jsonl``      ~``--context-chars`` of context, target the next 3 words (generate_until)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXTS = {"moby": "moby_dick.txt", "sotu": "sotu_2000_2021.txt"}
WORD = re.compile(r"[A-Za-z]+")


def body(text: str) -> str:
    """Whitespace-normalised text (one space between words, paragraphs joined)."""
    return re.sub(r"\s+", " ", text).strip()


def offsets(length: int, n: int, span: int) -> list[int]:
    step = (length - span) // n
    return [step // 2 + i * step for i in range(n)]


def snap_start(text: str, pos: int) -> int:
    """Move forward to the start of a sentence (after '. ')."""
    j = text.find(". ", pos)
    return pos if j < 0 or j - pos > 400 else j + 2


def passages(text: str, n: int, chars: int) -> list[str]:
    out = []
    for pos in offsets(len(text), n, chars + 800):
        start = snap_start(text, pos)
        end = text.rfind(". ", start, start + chars + 200)
        end = start + chars if end < start + chars // 2 else end + 1
        out.append(text[start:end])
    return out


def last_words(text: str, n: int, chars: int) -> list[dict]:
    """Sentences whose last token is a plain word of >= 3 letters followed by '.'."""
    out = []
    for pos in offsets(len(text), n, chars + 2000):
        start = snap_start(text, pos)
        for m in re.finditer(r" ([A-Za-z]{3,})\. ", text[start + chars:start + chars + 2000]):
            end = start + chars + m.start()
            out.append({"context": text[start:end], "target": " " + m.group(1)})
            break
    return out


def continuations(text: str, n: int, chars: int, words: int = 3) -> list[dict]:
    """Context ends at a word boundary inside a sentence; target = the next `words` words."""
    out = []
    for pos in offsets(len(text), n, chars + 1000):
        start = snap_start(text, pos)
        cut = text.find(" ", start + chars)
        tail = text[cut + 1:cut + 200].split(" ")[:words]
        if len(tail) == words:
            out.append({"context": text[start:cut], "target": " ".join(tail)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", default=str(REPO / ".assets/texts"))
    parser.add_argument("--out", default=str(REPO / ".assets/eval"))
    parser.add_argument("--passages", type=int, default=20)
    parser.add_argument("--passage-chars", type=int, default=2000)
    parser.add_argument("--lastword", type=int, default=40)
    parser.add_argument("--cont", type=int, default=20)
    parser.add_argument("--context-chars", type=int, default=1200)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, file in TEXTS.items():
        text = body((Path(args.texts) / file).read_text())
        sets = {
            "ppl": [{"text": p} for p in passages(text, args.passages, args.passage_chars)],
            "lastword": last_words(text, args.lastword, args.context_chars),
            "cont": continuations(text, args.cont, args.context_chars),
        }
        for kind, docs in sets.items():
            path = out / f"{name}_{kind}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in docs))
            print(f"{path}: {len(docs)} docs")


if __name__ == "__main__":
    main()
