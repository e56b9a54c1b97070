"""Which parameters each role of a multi-optimiser strategy trains.

By default a role is the model's submodule of the same name (``model.encoder``...), and the
``generator`` of an adversarial model is every trainable parameter outside
``model.discriminator``. A user overrides this with attribute names per role
(``{"generator": ("encoder", "decoder"), "discriminator": "critic"}``; dotted paths reach
nested submodules or single parameters) or with a function ``(model) -> {role: [parameters]}``.

Whatever the source, the groups must be disjoint and together cover every trainable parameter:
a parameter in two groups would be stepped twice, one in none would silently never train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from engine.errors import StrategyError

GroupFunction = Callable[[nn.Module], Mapping[str, Sequence[nn.Parameter]]]
GroupNames = Mapping[str, str | Sequence[str]]
GroupChoice = GroupNames | GroupFunction | None

GENERATOR = "generator"
DISCRIMINATOR = "discriminator"


def resolve_groups(
    model: nn.Module, roles: Sequence[str], choice: GroupChoice
) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of each role, checked disjoint and covering the model."""
    raw: Mapping[str, Sequence[nn.Parameter]]
    if choice is None:
        raw = default_groups(model, roles)
    elif callable(choice):
        raw = choice(model)
        if not isinstance(raw, Mapping):
            raise StrategyError(
                f"the group function {getattr(choice, '__name__', choice)!r} must return a "
                f"mapping {{role: [parameters]}}, got {type(raw).__name__}"
            )
    elif isinstance(choice, Mapping):
        raw = groups_by_names(model, roles, choice)
    else:
        raise StrategyError(
            "groups must be None, a mapping {role: attribute name(s)} or a function "
            f"(model) -> {{role: [parameters]}}, got {choice!r}"
        )
    return check_groups(model, roles, raw)


def default_groups(model: nn.Module, roles: Sequence[str]) -> dict[str, list[nn.Parameter]]:
    """Each role's submodule of the same name; ``generator`` is all but the discriminator."""
    groups: dict[str, list[nn.Parameter]] = {}
    for role in roles:
        if role == GENERATOR:
            continue
        groups[role] = list(_submodule(model, role, role).parameters())
    if GENERATOR in roles:
        taken = {id(param) for params in groups.values() for param in params}
        groups[GENERATOR] = [param for param in model.parameters() if id(param) not in taken]
    return groups


def groups_by_names(
    model: nn.Module, roles: Sequence[str], names: GroupNames
) -> dict[str, list[nn.Parameter]]:
    """Each role's parameters from attribute names (submodules or parameters, dotted paths)."""
    _check_roles(roles, names.keys())
    groups: dict[str, list[nn.Parameter]] = {}
    for role, entry in names.items():
        paths = [entry] if isinstance(entry, str) else list(entry)
        params: list[nn.Parameter] = []
        for path in paths:
            if not isinstance(path, str):
                raise StrategyError(
                    f"group {role!r} must name attributes of the model as strings, got {path!r}"
                )
            params.extend(_parameters_at(model, role, path))
        groups[role] = params
    return groups


def check_groups(
    model: nn.Module, roles: Sequence[str], groups: Mapping[str, Sequence[nn.Parameter]]
) -> dict[str, list[nn.Parameter]]:
    """Keep each group's trainable parameters (in order, without repeats) and refuse groups
    that miss a role, overlap, hold a foreign parameter, are empty, or leave a trainable
    parameter out; every message names the parameters at fault."""
    _check_roles(roles, groups.keys())
    names = {id(param): name for name, param in model.named_parameters()}
    owner: dict[int, str] = {}
    overlaps: list[str] = []
    checked = {role: _claim(model, role, groups[role], names, owner, overlaps) for role in roles}
    if overlaps:
        raise StrategyError(
            f"parameter groups must be disjoint; these parameters are in two groups: {overlaps}"
        )
    empty = [role for role in roles if not checked[role]]
    if empty:
        raise StrategyError(f"parameter group(s) {empty} have no trainable parameters")
    missing = [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and id(param) not in owner
    ]
    if missing:
        raise StrategyError(
            f"parameter groups {list(roles)} must cover every trainable parameter; these are in "
            f"none: {missing} (name them in groups=..., or set requires_grad=False to freeze them)"
        )
    return checked


def _claim(
    model: nn.Module,
    role: str,
    params: Sequence[nn.Parameter],
    names: Mapping[int, str],
    owner: dict[int, str],
    overlaps: list[str],
) -> list[nn.Parameter]:
    """The trainable parameters of ``role``'s group, each recorded in ``owner``; one that
    another role already owns goes to ``overlaps`` instead (named, with both roles)."""
    kept: list[nn.Parameter] = []
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise StrategyError(
                f"group {role!r} must hold parameters, got a {type(param).__name__}"
            )
        if id(param) not in names:
            raise StrategyError(
                f"group {role!r} holds a parameter of shape {tuple(param.shape)} that is not "
                f"a parameter of the model {type(model).__name__}"
            )
        if not param.requires_grad:
            continue
        previous = owner.get(id(param))
        if previous == role:
            continue
        if previous is not None:
            overlaps.append(f"{names[id(param)]} (in {previous!r} and {role!r})")
            continue
        owner[id(param)] = role
        kept.append(param)  # type: ignore[arg-type]
    return kept


def _check_roles(roles: Sequence[str], given: Iterable[str]) -> None:
    keys = list(given)
    missing = [role for role in roles if role not in keys]
    unknown = [key for key in keys if key not in roles]
    if missing or unknown:
        raise StrategyError(
            f"parameter groups must be given for exactly the roles {list(roles)}; "
            f"missing {missing}, unknown {unknown}"
        )


def _submodule(model: nn.Module, role: str, path: str) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in model.named_children()]
        raise StrategyError(
            f"model {type(model).__name__} has no submodule {path!r} for the {role!r} group; "
            f"its submodules are {children}; pass groups={{role: attribute names}} or a function"
        ) from None
    return module


def _parameters_at(model: nn.Module, role: str, path: str) -> list[nn.Parameter]:
    try:
        return [model.get_parameter(path)]
    except AttributeError:
        return list(_submodule(model, role, path).parameters())
