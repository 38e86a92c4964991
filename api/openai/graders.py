"""OpenAI graders as this server's reward functions: a grader (or each grader of a ``multi``)
becomes one reward spec, and ``calculate_output``, a weighted sum of the graders' names, their
weights. Errors name the grader's OpenAI param (``method.reinforcement.grader...``)."""

from __future__ import annotations

import ast
import math
from typing import Any

from jobs.errors import InvalidRequest

GRADER = "method.reinforcement.grader"
# OpenAI grader type → (native reward type, the grader's fields besides type and name).
GRADERS = {
    "string_check": ("string_check", {"input", "reference", "operation"}),
    "text_similarity": ("text_similarity", {"input", "reference", "evaluation_metric"}),
    "python": ("python_grader", {"source", "image_tag", "timeout_s", "memory_mb"}),
}
MODEL_GRADERS = ("score_model", "label_model")
MAX_FORMULA_CHARS = 1000


def invalid(param: str, message: str) -> InvalidRequest:
    """The 400 for an OpenAI request, naming the OpenAI ``param`` at fault."""
    return InvalidRequest(message, param=param)


def grader_rewards(grader: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The reward functions for a grader, and for each the param of the grader it came from.

    A ``multi`` grader gives one reward per sub-grader, named by its key and weighted by its
    coefficient in ``calculate_output`` (a weighted sum of the keys).
    """
    if isinstance(grader, dict) and grader.get("type") == "multi":
        unknown = sorted(set(grader) - {"type", "name", "graders", "calculate_output"})
        if unknown:
            raise invalid(
                f"{GRADER}.{unknown[0]}",
                "unknown field for a multi grader; its fields: calculate_output, graders, name",
            )
        graders = grader.get("graders")
        if isinstance(graders, dict) and isinstance(graders.get("type"), str):  # one grader, not a mapping
            graders = {str(graders.get("name") or graders["type"]): graders}
        if not isinstance(graders, dict) or not graders:
            raise invalid(
                f"{GRADER}.graders",
                'must map names to graders, e.g. {"exact": {"type": "string_check", ...}}',
            )
        weights = linear_weights(grader.get("calculate_output"), set(graders), f"{GRADER}.calculate_output")
        rewards, paths = [], []
        for key, sub in graders.items():
            path = f"{GRADER}.graders.{key}"
            reward = native_reward(sub, path)
            reward.update(name=key, weight=weights.get(key, 0.0))
            rewards.append(reward)
            paths.append(path)
        return rewards, paths
    return [native_reward(grader, GRADER)], [GRADER]


def native_reward(grader: Any, param: str) -> dict[str, Any]:
    """The reward function for one (not multi) grader, or ``InvalidRequest`` at ``param``."""
    if not isinstance(grader, dict):
        raise invalid(
            param,
            'must be a grader object, e.g. {"type": "string_check", "input": "{{sample.output_text}}", '
            '"reference": "{{item.answer}}", "operation": "eq"}',
        )
    kind = grader.get("type")
    supported = ", ".join([*GRADERS, "multi"])
    if kind in MODEL_GRADERS:
        raise invalid(
            f"{param}.type",
            f"{kind} graders are not supported: they call a model hosted by OpenAI. Score with "
            "a model of your own (the native reward type reward_model: a sequence-classification model the "
            "workers load) or with your own endpoint (type http) in a job created with POST /v1/jobs; "
            f"graders supported here: {supported}",
        )
    if kind == "multi":
        raise invalid(f"{param}.type", "a multi grader cannot contain another multi grader")
    if kind not in GRADERS:
        raise invalid(f"{param}.type", f"unknown grader type {kind!r}; supported here: {supported}")
    native, fields = GRADERS[kind]
    unknown = sorted(set(grader) - fields - {"type", "name"})
    if unknown:
        raise invalid(
            f"{param}.{unknown[0]}",
            f"unknown field for a {kind} grader; its fields: {', '.join(sorted(fields | {'name'}))}",
        )
    if grader.get("image_tag") is not None:
        raise invalid(
            f"{param}.image_tag",
            "python graders run in this server's sandbox, on the standard library only; remove image_tag",
        )
    reward = {
        "type": native,
        **{key: value for key, value in grader.items() if key in fields and key != "image_tag"},
    }
    if grader.get("name") is not None:
        reward["name"] = grader["name"]
    return reward


def linear_weights(formula: Any, names: set[str], param: str) -> dict[str, float]:
    """``"0.7 * exact + 0.3 * fuzzy"`` → ``{"exact": 0.7, "fuzzy": 0.3}``: the formula must be a
    weighted sum of grader names (numbers, +, -, * and / by numbers, parentheses)."""
    first, last = sorted(names)[0], sorted(names)[-1]
    example = f"'0.7 * {first} + 0.3 * {last}'" if first != last else f"'{first}'"
    refuse = invalid(
        param,
        f"only a weighted sum of the graders' names is supported here, e.g. {example} "
        "(no functions, constants or products of graders)",
    )
    if not isinstance(formula, str):
        raise invalid(param, f"is required: a weighted sum of the graders' names, e.g. {example}")
    if len(formula) > MAX_FORMULA_CHARS:
        raise invalid(param, f"is longer than {MAX_FORMULA_CHARS} characters")

    def linear(node: ast.AST) -> tuple[dict[str, float], float]:
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            return {}, float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise invalid(param, f"names no grader {node.id!r}; the graders: {', '.join(sorted(names))}")
            return {node.id: 1.0}, 0.0
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
            terms, constant = linear(node.operand)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return {name: sign * weight for name, weight in terms.items()}, sign * constant
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
            (left, left_constant), (right, right_constant) = linear(node.left), linear(node.right)
            sign = -1.0 if isinstance(node.op, ast.Sub) else 1.0
            terms = dict(left)
            for name, weight in right.items():
                terms[name] = terms.get(name, 0.0) + sign * weight
            return terms, left_constant + sign * right_constant
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Div):
            (left, left_constant), (right, right_constant) = linear(node.left), linear(node.right)
            if isinstance(node.op, ast.Mult) and not left:  # 0.5 * exact: the graders go left
                left, left_constant, right, right_constant = right, right_constant, left, left_constant
            if right or (isinstance(node.op, ast.Div) and right_constant == 0):
                raise refuse
            factor = right_constant if isinstance(node.op, ast.Mult) else 1.0 / right_constant
            return {name: weight * factor for name, weight in left.items()}, left_constant * factor
        raise refuse

    try:
        terms, constant = linear(ast.parse(formula.strip(), mode="eval").body)
    except (SyntaxError, RecursionError):
        raise refuse from None
    if constant != 0 or not terms or not all(math.isfinite(weight) for weight in terms.values()):
        raise refuse
    return terms
