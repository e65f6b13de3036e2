"""Optimizer state written the way DCP's resume code reads it: parameters by name, not by number.

``Optimizer.state_dict()`` numbers its parameters 0, 1, 2... in ``param_groups`` order and keys
``state`` by those numbers. DCP's resume code does not: ``get_state_dict(model, optimizer)``
(``torch.distributed.checkpoint.state_dict``) gives ``state`` keyed by each parameter's FQN
(``conv1.weight``) and ``param_groups[i]["params"]`` as FQN lists; ``dcp.load`` fills exactly
those keys and ``set_state_dict`` maps them back to the live parameters. A numbered optimizer
written as it is would flatten to ``optimizer.state.0.momentum_buffer``, which no resuming job asks
for (and ``optimizer.load_state_dict`` of ``dcp_to_torch_save``'s output keeps those buffers under
the string ``"0"``: silently unused). So each numbered optimizer is written under parameter names.

torch itself maps numbers to names through the live objects (the i-th parameter of the
optimizer's groups *is* a parameter of the model). A checkpoint holds no objects, so the mapping
rests on what the checkpoint and ``--model`` can show, and is refused wherever they cannot:

1. The model: a flat state_dict (str keys to tensors) beside the optimizer in the same dict
   (walking up through lists, as Lightning's ``optimizer_states`` list). None: refused. With
   several (a GAN's generator and discriminator), the one that fits the optimizer by the rules
   below; refused when none does, or when models of other parameter names fit alike (which model
   an optimizer trains no name says: ``model`` beside ``discriminator_optimizer`` is a guess).
2. Its parameters in order: the model's ``named_parameters()`` with ``--model``; without it the
   model state_dict's tensors (a tied one once), which are its parameters only when it holds
   no buffers. A state_dict interleaves buffers (BatchNorm's ``running_mean``) with parameters
   and nothing in it says which is which, so:
3. The optimizer must number exactly as many parameters (0..N-1, in ``param_groups`` order) as
   the model has: without ``--model``, as many as its state_dict holds tensors — which, for an
   optimizer over the model's own parameters, means the state_dict holds no buffers and the
   optimizer all parameters. Otherwise refused, saying what is missing (``--model``, or that
   the optimizer does not cover every parameter).
4. One param group: number i is the i-th parameter, as for an optimizer built over
   ``model.parameters()`` (torch's own convention). Checked where the checkpoint can: every
   per-parameter state tensor with dims (``momentum_buffer``, ``exp_avg``...) must have its
   parameter's shape. Otherwise refused.
5. Several param groups: the numbers follow the groups' order, which is generally not the
   model's (a weight-decay split lists the weights, then the biases; a user may list the decoder
   before the encoder). Which number is which parameter, and so which group's hyper-parameters a
   parameter gets back from ``set_state_dict``, is then *found*: each number is the one parameter
   of the shape of its state tensors with dims. Written only when that proves it: every number
   has such state (0-dim parameters and parameters without state yet have none) and no two
   parameters of the model share a shape. Otherwise refused (convert the model alone, or keep the
   numbered optimizer in another format).

What no check can see: an optimizer with one group built over the parameters in another order
that swaps only parameters of equal shapes. The state of such a pair would be exchanged. With one
group and no state at all, the order does not matter to ``set_state_dict`` (nothing is assigned
per parameter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...core.errors import UnsupportedValueError, format_tree_path, shown
from ...core.tree import MAPPING_TYPES, TensorRef

TreePath = tuple[str | int, ...]


@dataclass(frozen=True)
class Named:
    """A numbered optimizer (at ``path``) and the parameter name of each number."""

    path: TreePath
    names: tuple[str, ...]


@dataclass(frozen=True)
class ModelParameters:
    """What ``--model`` says: its ``named_parameters()`` and its ``state_dict()``, names and shapes."""

    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    state: tuple[tuple[str, tuple[int, ...]], ...]


def name_parameters(tree: Any, model: ModelParameters | None = None) -> list[Named]:
    """Every numbered optimizer of ``tree`` with its parameter names; ``UnsupportedValueError``
    (one line, naming the optimizer, what is missing and what to do) where they cannot be known."""
    return [_name(tree, path, node, model) for path, node in numbered_optimizers(tree)]


def numbered_optimizers(tree: Any) -> list[tuple[TreePath, Mapping[Any, Any]]]:
    """The optimizer state_dicts DCP would flatten (reached through dicts and lists) whose
    parameters are numbered."""
    found: list[tuple[TreePath, Mapping[Any, Any]]] = []
    stack: list[tuple[TreePath, Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if type(node) in MAPPING_TYPES:
            if _numbered(node):
                found.append((path, node))
                continue
            stack.extend(((*path, key), value) for key, value in reversed(node.items()))
        elif type(node) is list:
            stack.extend(((*path, index), value) for index, value in reversed(list(enumerate(node))))
    return found


def renamed(tree: Any, named: Sequence[Named]) -> Any:
    """``tree`` with each named optimizer keyed by parameter names, as ``get_state_dict`` gives it:
    ``state`` by name, each group's ``params`` a list of names. Everything else is shared."""
    for item in named:
        tree = _replace(tree, item.path, lambda optimizer, names=item.names: _by_name(optimizer, names))
    return tree


def check_named(tree: Any, named: Sequence[Named]) -> str | None:
    """What is wrong with ``named`` (read from a file) for ``tree``, or None: each must be a
    numbered optimizer of ``tree`` with one str name per number, every numbered optimizer named."""
    optimizers = dict(numbered_optimizers(tree))
    paths = [item.path for item in named]
    if len(set(paths)) != len(paths) or set(paths) != set(optimizers):
        return "the optimizers it names are not the tree's numbered optimizers"
    for item in named:
        where = format_tree_path(item.path)
        numbers, state = _numbers(optimizers[item.path]), optimizers[item.path]["state"]
        count = len(numbers)
        if numbers != list(range(count)) or not all(type(key) is int and 0 <= key < count for key in state):
            return f"the optimizer at {where} does not number its parameters 0..{count - 1}"
        if len(item.names) != count or not all(type(name) is str for name in item.names):
            return f"the optimizer at {where} numbers {count} parameters, not {len(item.names)}"
        if len(set(item.names)) != count:
            return f"the optimizer at {where} gives two numbers one name"
    return None


# ----------------------------------------------------------------------------------------- rules


def _numbered(node: Mapping[Any, Any]) -> bool:
    """``Optimizer.state_dict()``'s shape (``state`` + ``param_groups`` with ``params`` lists) with
    at least one int parameter id or state key. All-str ones are named already (get_state_dict's)."""
    if len(node) != 2 or set(node) != {"state", "param_groups"}:
        return False
    groups, state = node["param_groups"], node["state"]
    if type(groups) is not list or type(state) not in MAPPING_TYPES:
        return False
    if not all(type(group) in MAPPING_TYPES and type(group.get("params")) is list for group in groups):
        return False
    return any(type(p) is int for group in groups for p in group["params"]) or any(type(k) is int for k in state)


def _numbers(optimizer: Mapping[Any, Any]) -> list[Any]:
    return [number for group in optimizer["param_groups"] for number in group["params"]]


def _name(tree: Any, path: TreePath, optimizer: Mapping[Any, Any], model: ModelParameters | None) -> Named:
    def refuse(why: str, fix: str) -> UnsupportedValueError:
        leave_out = f", or leave the optimizer out (--exclude {format_tree_path(path)})" if path else ""
        return UnsupportedValueError(
            f"cannot name this optimizer's parameters for DCP: {why}. DCP's resume code (get_state_dict/"
            f"set_state_dict) finds optimizer state by parameter name, and a guess could load silently wrong: "
            f"{fix}{leave_out}",
            path=path or None,
        )

    numbers = _numbers(optimizer)
    count = len(numbers)
    if numbers != list(range(count)):
        raise refuse(
            f"its param_groups number the parameters {shown(numbers, 60)}, not 0..{count - 1} in order as "
            "Optimizer.state_dict() numbers them",
            "write it as Optimizer.state_dict() gives it",
        )
    state = optimizer["state"]
    stray = next((key for key in state if type(key) is not int or not 0 <= key < count), None)
    if stray is not None:
        raise refuse(
            f"its state has the key {shown(repr(stray), 40)}, which is not one of its {count} parameters",
            "write it as Optimizer.state_dict() gives it",
        )
    candidates = _models_beside(tree, path)
    if not candidates:
        raise refuse(
            f"no model state_dict lies beside it to name its {count} numbered parameters",
            "convert it beside its model (e.g. {'model': model.state_dict(), 'optimizer': optimizer.state_dict()})",
        )
    evidence = [_state_shapes(state.get(number)) for number in range(count)]
    groups = len(optimizer["param_groups"])
    fits: list[tuple[TreePath, tuple[str, ...]]] = []
    unfit: list[tuple[TreePath, _Unfit]] = []
    for model_path, state_dict in candidates:
        try:
            fits.append((model_path, _fit(format_tree_path(model_path), state_dict, evidence, groups, model)))
        except _Unfit as exc:
            unfit.append((model_path, exc))
    if len(candidates) == 1 and unfit:
        raise refuse(unfit[0][1].why, unfit[0][1].fix)
    if not fits:
        at, first = unfit[0]
        raise refuse(
            f"none of the {len(candidates)} model state_dicts beside it ({_listed(candidates)}) fits it "
            f"(at {format_tree_path(at)}: {first.why})",
            first.fix,
        )
    if len({names for _, names in fits}) > 1:  # models with other parameter names fit alike: which one it trains?
        raise refuse(
            f"{len(fits)} model state_dicts beside it ({_listed(fits)}) fit its parameters alike, and which "
            "model it trains the checkpoint cannot say",
            "convert each model with its own optimizer (--select them), or write another format",
        )
    return Named(path, fits[0][1])


class _Unfit(Exception):
    """Why a model state_dict cannot name an optimizer's parameters, and what to do."""

    def __init__(self, why: str, fix: str) -> None:
        super().__init__(why)
        self.why, self.fix = why, fix


def _state_shapes(per_parameter: Any) -> dict[tuple[int, ...], Any]:
    """The shapes of a parameter's state tensors with dims (``momentum_buffer``, ``exp_avg``...),
    each with the first state key that has it. 0-dim ones (Adam's ``step``) say nothing."""
    shapes: dict[tuple[int, ...], Any] = {}
    if type(per_parameter) in MAPPING_TYPES:
        for key, value in per_parameter.items():
            if type(value) is TensorRef and not value.numpy and value.shape:
                shapes.setdefault(value.shape, key)
    return shapes


def _fit(
    at: str,
    state_dict: Mapping[str, TensorRef],
    evidence: Sequence[Mapping[tuple[int, ...], Any]],
    groups: int,
    model: ModelParameters | None,
) -> tuple[str, ...]:
    """The name of each number, read off the model state_dict at ``at`` (and ``--model``), or
    ``_Unfit``. One group: number i is the i-th parameter (as for ``model.parameters()``), checked by
    the shapes of its state. Several: each number is the one parameter of its state's shape, which
    only holds when every number has such state and no two parameters share a shape."""
    count = len(evidence)
    if model is None:
        parameters = _unique_tensors(state_dict)
        if len(parameters) != count:
            raise _Unfit(
                f"it numbers {count} parameters but the model state_dict at {at} holds {len(parameters)} tensors, "
                "and which of them are parameters (not buffers such as BatchNorm's running_mean) the checkpoint "
                "cannot say",
                "pass --model with the model's class to tell them apart",
            )
    else:
        mismatch = _model_mismatch(model, state_dict)
        if mismatch is not None:
            raise _Unfit(f"--model does not fit the model state_dict at {at}: {mismatch}", "pass the model's own class")
        parameters = list(model.parameters)
        if len(parameters) != count:
            raise _Unfit(
                f"it numbers {count} parameters but the model at {at} has {len(parameters)}, so it was not "
                "built over all of model.parameters() and which number is which parameter cannot be known",
                "convert it where each number's parameter is known",
            )
    if groups <= 1:
        for number, shapes in enumerate(evidence):
            name, shape = parameters[number]
            for other, key in shapes.items():
                if other != shape:
                    raise _Unfit(
                        f"parameter {number}'s {shown(repr(key), 40)} has the shape {list(other)}, but "
                        f"parameter {number} of the model at {at} ({shown(name)}, in model order) has "
                        f"{list(shape)}: the optimizer was not built over model.parameters() in order",
                        "convert it where each number's parameter is known",
                    )
        return tuple(name for name, _ in parameters)
    # Several groups: the numbers follow the groups' order, which need not be the model's (a
    # weight-decay split is not). Each number is found by its shape, when that proves it.
    apart = (
        f"convert the model alone (--select {at}), or write another format, which keeps the optimizer "
        "numbered (such as .pt)"
    )
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, (_, shape) in enumerate(parameters):
        by_shape.setdefault(shape, []).append(index)
    names: list[str] = []
    for number, shapes in enumerate(evidence):
        if not shapes:
            raise _Unfit(
                f"it has {groups} param_groups whose parameters cannot be told apart: which is which number "
                f"(whose state, in which group) only the shapes of their state can show, and parameter {number} "
                "has no state with dims (no step taken yet, or a 0-dim parameter)",
                apart,
            )
        shape, key = next(iter(shapes.items()))
        if len(shapes) > 1 or shape not in by_shape:
            raise _Unfit(
                f"parameter {number}'s state has the shapes {shown([list(s) for s in shapes], 60)}, which is "
                f"not one parameter of the model at {at}",
                "convert it where each number's parameter is known",
            )
        same = by_shape[shape]
        if len(same) > 1:
            raise _Unfit(
                f"it has {groups} param_groups whose parameters cannot be told apart: "
                f"{shown(parameters[same[0]][0])} and {shown(parameters[same[1]][0])} of the model at {at} share "
                f"the shape {list(shape)}, and which of them is which number (whose state, in which group) the "
                "checkpoint cannot say",
                apart,
            )
        names.append(parameters[same[0]][0])
    if len(set(names)) != count:  # two numbers of one shape: not the model's parameters one to one
        repeated = next(name for name in names if names.count(name) > 1)
        raise _Unfit(
            f"two of its parameters have the state shape of {shown(repeated)} of the model at {at}, which has "
            "one such parameter",
            "convert it where each number's parameter is known",
        )
    return tuple(names)


def _models_beside(tree: Any, path: TreePath) -> list[tuple[TreePath, Mapping[str, Any]]]:
    """The model state_dicts beside the optimizer at ``path`` (flat str -> tensor dicts in the dict
    holding it, up through lists), as ``(path, state_dict)``."""
    if not path:
        return []
    holder_path = path[:-1]
    while holder_path and type(_at(tree, holder_path)) is list:
        holder_path = holder_path[:-1]
    holder = _at(tree, holder_path)
    own_key = path[len(holder_path)]
    return [
        ((*holder_path, key), value)
        for key, value in holder.items()
        if key != own_key
        and type(value) in MAPPING_TYPES
        and value
        and all(type(k) is str and type(v) is TensorRef and not v.numpy for k, v in value.items())
    ]


def _listed(items: Sequence[tuple[TreePath, Any]]) -> str:
    shown_items = ", ".join(format_tree_path(item_path) for item_path, _ in items[:4])
    return shown_items + (", ..." if len(items) > 4 else "")


def _unique_tensors(state_dict: Mapping[str, TensorRef]) -> list[tuple[str, tuple[int, ...]]]:
    seen: set[int] = set()
    unique = []
    for key, ref in state_dict.items():
        if id(ref) not in seen:
            seen.add(id(ref))
            unique.append((key, ref.shape))
    return unique


def _model_mismatch(model: ModelParameters, state_dict: Mapping[str, TensorRef]) -> str | None:
    expected = dict(model.state)
    for key, ref in state_dict.items():
        if key not in expected:
            return f"the checkpoint has {shown(repr(key))}, which the model's state_dict does not"
        if expected[key] != ref.shape:
            return f"{shown(repr(key))} is {list(ref.shape)} in the checkpoint, {list(expected[key])} in the model"
    missing = next((key for key in expected if key not in state_dict), None)
    if missing is not None:
        return f"the model's state_dict has {shown(repr(missing))}, which the checkpoint does not"
    return None


# ----------------------------------------------------------------------------------------- trees


def _at(tree: Any, path: TreePath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(node: Any, path: TreePath, change: Any) -> Any:
    if not path:
        return change(node)
    key, rest = path[0], path[1:]
    if type(node) is list:
        copied = list(node)
        copied[key] = _replace(node[key], rest, change)  # type: ignore[index]
        return copied
    return {k: (_replace(v, rest, change) if k == key else v) for k, v in node.items()}


def _by_name(optimizer: Mapping[Any, Any], names: tuple[str, ...]) -> dict[str, Any]:
    state = {names[number]: value for number, value in optimizer["state"].items()}
    groups = [{**group, "params": [names[number] for number in group["params"]]} for group in optimizer["param_groups"]]
    return {key: state if key == "state" else groups for key in optimizer}
