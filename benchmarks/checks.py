"""What a peer engine must pass before it is timed: it reads our prompt ids as the same tokens,
and at full precision its greedy tokens are transformers' on the same weights.

Imports nothing from gpt2onnx: it runs in the peers' own environments (worker.py)."""

from __future__ import annotations


class CheckError(RuntimeError):
    pass


def first_difference(a: list, b: list) -> int | None:
    """The first index where a and b differ (a length difference counts); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_same(who: str, what: str, theirs: list, ours: list) -> None:
    """Raises CheckError naming the first difference between their `what` and ours."""
    i = first_difference(theirs, ours)
    if i is not None:
        at = lambda xs: repr(xs[i]) if i < len(xs) else "(end)"  # noqa: E731
        raise CheckError(f"{who}: {what} differ from ours at index {i} of {len(ours)} "
                         f"(theirs {at(theirs)}, ours {at(ours)}); it would not run the same prompts")  # fmt: skip


def check_greedy(who: str, theirs: list[int], reference: list[int], exact: bool) -> dict:
    """Their greedy tokens against transformers' fp32 ones on the same prompt. At full precision
    (exact) they must be equal, else CheckError; quantized, the agreeing prefix is reported."""
    i = first_difference(theirs, reference)
    agree = len(reference) if i is None else i
    if exact and i is not None:
        raise CheckError(f"{who}: greedy token {i} is {theirs[i] if i < len(theirs) else '(none)'}, transformers' "
                         f"is {reference[i]} (same weights, fp32): the conversion is not faithful")  # fmt: skip
    return {"greedy_prefix_equal_to_transformers": agree, "greedy_checked": len(reference)}
