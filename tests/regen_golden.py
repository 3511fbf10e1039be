"""Rewrite tests/fixtures/golden/ from what the sources make of the corpus today.

    python -m tests.regen_golden           # write every expected file, list what changed
    python -m tests.regen_golden --check   # write nothing; exit 1 if any file would change

The output is the code's opinion, not the truth: review every changed file against its
payload and the corpus README's edge-case notes before committing it.
"""

from __future__ import annotations

import json
import sys

from tests.support.corpus import corpus_payloads, golden_path, outcome


def render(data: object) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for rel in corpus_payloads():
        path = golden_path(rel)
        text = render(outcome(rel))
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        changed.append(str(path))
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for name in changed:
        print(("would change " if check else "wrote ") + name)
    print(f"{len(changed)} of {len(corpus_payloads())} golden files {'differ' if check else 'changed'}")
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
