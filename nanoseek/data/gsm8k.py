"""GSM8K (Cobbe et al., 2021) for the GPU recipe: its answers checked, its annotations as calls.

A GSM8K row is `{"question": ..., "answer": ...}`; the answer is the worked solution with the
arithmetic annotated for a calculator, then the final number after `####`:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
    #### 72

`worked_solution` turns each `<<expression=result>>` into nanoseek's calculator call and the
output the engine would force (the calculator's own, which the text after it repeats); an
annotation the calculator cannot compute is dropped, leaving the text as written. `check` scores
a model's answer against the reference the way GSM8K is usually scored: the last number of the
answer (thousands commas, a currency sign, units, `.00` and a trailing period allowed) equals
the number after `####`.
"""

from __future__ import annotations

import re
from fractions import Fraction

from nanoseek.tools import CALCULATOR, calculator, render_call, render_output

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class GSM8KError(ValueError):
    pass


def reference_answer(solution: str) -> str:
    """The number after the solution's last `####`, commas removed."""
    _, sep, final = solution.rpartition("####")
    if not sep or parse_number(final) is None:
        raise GSM8KError(f"a GSM8K solution ends with '#### <number>'; this one ends {solution[-40:]!r}")
    return final.strip().replace(",", "")


def parse_number(text: str) -> Fraction | None:
    """The last number written in `text` (commas between digits allowed), exactly; None if none."""
    found = NUMBER.findall(text.replace("$", ""))
    return Fraction(found[-1].replace(",", "")) if found else None


def check(answer: str | None, reference: str) -> bool:
    """Whether a model's final answer is GSM8K's reference number."""
    got = parse_number(answer) if answer else None
    return got is not None and got == parse_number(reference)


def worked_solution(solution: str, calls: bool = True) -> tuple[str, str]:
    """(the reasoning with calculator calls in place of the annotations, the final answer);
    without `calls`, the annotations are removed and the text is left as written."""
    answer = reference_answer(solution)
    reasoning = solution.rpartition("####")[0].strip()

    def call(m: re.Match) -> str:
        result = calculator(m.group(1))
        if not calls or result.startswith("error"):
            return ""
        return render_call(CALCULATOR, m.group(1)) + render_output(result)

    return ANNOTATION.sub(call, reasoning), answer


def problem(row: dict, calls: bool = True) -> tuple[str, str, str]:
    """(question, reasoning with calls (or without: `calls`), answer) of one GSM8K row."""
    if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise GSM8KError(f"a GSM8K row has 'question' and 'answer' strings; this one has {sorted(row)}")
    reasoning, answer = worked_solution(row["answer"], calls)
    return row["question"].strip(), reasoning, answer
