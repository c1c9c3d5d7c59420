"""The merge methods: one :class:`MergeMethod` object per method, in one registry (mergekit style).

A method declares everything the rest of the package needs to know about it: its name, where it
comes from, whether it uses ``t``, which adapters (roles) it reads and with which weights, how it
combines LoRA factors (per ``lora_strategy``, or one factor-level formula for all strategies), how
it combines (IA)^3 vectors, and which :class:`~adamergex_peft.AdaMergeXConfig` options it reads.
Config validation, the CLI choices, the sweep's t-free set, the engine's dispatch and its
"ignored setting" warnings all read :data:`METHODS`; adding a method is one
:func:`register_method` call.

Roles: ``"T"`` the source-language task adapter, ``"Rs"``/``"Rg"`` the source/target-language
reference adapters. The pure tensor formulas live in :mod:`adamergex_peft.merge_utils`; this module
only wires them to roles. It imports no torch at import time (``import adamergex_peft`` stays light).

A LoRA combine function is called per module as ``fn(mods, weights, config, rank, dtype)`` with
``mods`` mapping the roles that train the module to objects with ``.a`` (r x in), ``.b`` (out x r)
and ``.scaling``; ``weights`` the role weights (for factor-level formulas: every role the method
reads); it returns ``((A, B), kept_energy_or_None)`` in ``dtype``. An (IA)^3 combine function is
called as ``fn(vecs, weights, config)`` with float32 vectors by role (a role missing from the module
is absent) and returns the float32 result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from adamergex_peft.errors import AdaMergeXError

ROLES = ("T", "Rs", "Rg")
LORA_STRATEGIES = ("exact", "svd", "factorwise")
IA3_STRATEGIES = ("linear", "power")

#: Options (AdaMergeXConfig fields) a method may read, with their defaults and the adapter type
#: they apply to (``None``: both). A method lists the ones it reads in ``MergeMethod.options``.
OPTION_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"lora_strategy": "exact", "svd_rank": None, "ia3_strategy": "linear", "arimerge_weights": (0.5, 0.5)}
)
OPTION_PEFT_TYPES: Mapping[str, str | None] = MappingProxyType(
    {"lora_strategy": "LORA", "svd_rank": "LORA", "ia3_strategy": "IA3", "arimerge_weights": None}
)


@dataclass(frozen=True)
class LoraCombine:
    """A LoRA combine function and the representation of its result.

    ``representation``: ``"stacked"`` (scaling 1, rank = sum of the inputs' ranks, padded to the
    largest module), ``"svd"`` (scaling 1, rank ``svd_rank``) or ``"uniform"`` (the inputs' common
    rank and scaling: factor-level formulas).
    """

    fn: Callable[..., Any]
    representation: str

    def __post_init__(self) -> None:
        if self.representation not in ("stacked", "svd", "uniform"):
            raise ValueError(f"unknown LoRA representation {self.representation!r}")


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    Args:
        name: the ``method`` value in :class:`~adamergex_peft.AdaMergeXConfig` and on the CLI.
        reference: one line: the paper or code the method comes from.
        uses_t: whether the result depends on ``t`` (a sweep evaluates t-free methods once).
        roles: ``t -> {role: weight}``: the adapters the method reads and their weights.
        lora: LoRA combine per ``lora_strategy`` (a mapping over :data:`LORA_STRATEGIES`), or one
            :class:`LoraCombine` used for every strategy (a factor-level formula).
        ia3: the (IA)^3 combine function.
        options: the config options the method reads, with their defaults (keys of
            :data:`OPTION_DEFAULTS`); setting another option away from its default is logged as ignored.
        description: one line for help texts.
    """

    name: str
    reference: str
    uses_t: bool
    roles: Callable[[float], Mapping[str, float]]
    lora: LoraCombine | Mapping[str, LoraCombine]
    ia3: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a method name must be an identifier, got {self.name!r}")
        if isinstance(self.lora, Mapping) and set(self.lora) != set(LORA_STRATEGIES):
            raise ValueError(f"method {self.name!r}: lora must map every strategy {list(LORA_STRATEGIES)}")
        unknown = set(self.options) - set(OPTION_DEFAULTS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown options {sorted(unknown)}")
        bad = set(self.role_weights(1.0)) - set(ROLES)
        if bad or "T" not in self.role_weights(1.0):
            raise ValueError(f"method {self.name!r}: roles must include 'T' and be among {list(ROLES)}")

    @property
    def factor_level(self) -> bool:
        """True if the LoRA formula is one factor-level formula for every strategy."""
        return isinstance(self.lora, LoraCombine)

    def role_weights(self, t: float) -> dict[str, float]:
        """``{role: weight}`` at ``t``, in the order the method lists them."""
        return dict(self.roles(t))

    def lora_combine(self, strategy: str) -> LoraCombine:
        return self.lora if isinstance(self.lora, LoraCombine) else self.lora[strategy]

    def help_line(self) -> str:
        return f"{self.name}: {self.description or self.reference}"


#: The registered methods, by name (insertion order is the order of help texts and CLI choices).
METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod, *, replace: bool = False) -> MergeMethod:
    """Add ``method`` to :data:`METHODS` (an existing name needs ``replace=True``)."""
    if not isinstance(method, MergeMethod):
        raise TypeError(f"expected a MergeMethod, got {type(method).__name__}")
    if method.name in METHODS and not replace:
        raise ValueError(f"a merge method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> MergeMethod:
    """Remove a method from :data:`METHODS` and return it."""
    return METHODS.pop(name)


@contextlib.contextmanager
def registered(method: MergeMethod) -> Iterator[MergeMethod]:
    """Register ``method`` for the duration of a ``with`` block (tests, experiments)."""
    register_method(method)
    try:
        yield method
    finally:
        METHODS.pop(method.name, None)


def get_method(name: Any) -> MergeMethod:
    """The registered method ``name``; an :class:`AdaMergeXError` naming the choices otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise AdaMergeXError(
            f"AdaMergeXConfig.method must be one of {list(METHODS)}, got {name!r}.", field="method"
        ) from None


def methods_help() -> str:
    """``"adamergex (...), cross (...)"``: one phrase per method, for help texts."""
    return "; ".join(m.help_line() for m in METHODS.values())


# ------------------------------------------------------------------------------ LoRA combine functions
def lora_exact(mods, weights, config, rank, dtype):
    """``sum_role w_role dW_role`` as stacked factors (exact, scaling 1)."""
    from adamergex_peft import merge_utils as mu

    factors = [(mods[r].a, mods[r].b, mods[r].scaling) for r in weights]
    return mu.lora_stack(factors, [weights[r] for r in weights], rank=rank, dtype=dtype), None


def lora_svd(mods, weights, config, rank, dtype):
    """:func:`lora_exact` truncated to ``rank`` by SVD; returns the kept energy share."""
    import torch

    from adamergex_peft import merge_utils as mu

    (a, b), _ = lora_exact(mods, weights, config, None, torch.float32)
    a, b, kept = mu.lora_svd(a, b, rank)
    return (a.to(dtype), b.to(dtype)), kept


def factors32(mods, role: str):
    """Float32 factors of ``role``, or zeros of the common shape when the module is missing from it."""
    import torch

    if role in mods:
        return mods[role].a.float(), mods[role].b.float()
    ref = next(iter(mods.values()))
    return torch.zeros_like(ref.a, dtype=torch.float32), torch.zeros_like(ref.b, dtype=torch.float32)


def lora_factorwise(mods, weights, config, rank, dtype):
    """``A = sum w A_role``, ``B = sum w B_role`` (the official code's factor-wise merge)."""
    from adamergex_peft import merge_utils as mu

    roles = list(weights)
    pairs = [factors32(mods, r) for r in roles]
    coefficients = [weights[r] for r in roles]
    a = mu.linear_combination([p[0] for p in pairs], coefficients)
    b = mu.linear_combination([p[1] for p in pairs], coefficients)
    return (a.to(dtype), b.to(dtype)), None


#: The three strategies of a method that is a weighted sum of LoRA updates.
LINEAR_LORA: Mapping[str, LoraCombine] = MappingProxyType(
    {
        "exact": LoraCombine(lora_exact, "stacked"),
        "svd": LoraCombine(lora_svd, "svd"),
        "factorwise": LoraCombine(lora_factorwise, "uniform"),
    }
)


def _lora_arimerge(mods, weights, config, rank, dtype):
    from adamergex_peft import merge_utils as mu

    c0, c1 = config.arimerge_weights
    a, b = mu.arimerge_lora(*(factors32(mods, r) for r in ("T", "Rg", "Rs")), c0, c1)
    return (a.to(dtype), b.to(dtype)), None


def _lora_cross(mods, weights, config, rank, dtype):
    from adamergex_peft import merge_utils as mu

    # A module missing from an adapter has no factors to divide or multiply; the element-wise
    # analogy is only defined where all three adapters train the module.
    if len(mods) != 3:
        missing = sorted({"T", "Rg", "Rs"} - set(mods))
        raise AdaMergeXError(
            f"method 'cross' needs the module in all three adapters; missing from {', '.join(missing)}"
        )
    a, b = mu.elementwise_multiplicative_factors(*(factors32(mods, r) for r in ("T", "Rg", "Rs")), config.t)
    return (a.to(dtype), b.to(dtype)), None


# ---------------------------------------------------------------------------- (IA)^3 combine functions
def _ones_like_any(vecs):
    import torch

    return torch.ones_like(next(iter(vecs.values())))


def ia3_task(vecs, weights, config):
    """``l_T`` (a module missing from T counts as ones)."""
    return vecs.get("T", _ones_like_any(vecs)).clone()


def ia3_multiplicative(vecs, weights, config):
    """``l_T (t (l_Rg / l_Rs - 1) + 1)`` (linear) or ``l_T (l_Rg / l_Rs) ** t`` (power)."""
    from adamergex_peft import merge_utils as mu

    ones = _ones_like_any(vecs)
    fn = mu.multiplicative_linear if config.ia3_strategy == "linear" else mu.multiplicative_power
    return fn(vecs.get("T", ones), vecs.get("Rg", ones), vecs.get("Rs", ones), config.t)


def ia3_multiplicative_target_only(vecs, weights, config):
    """As :func:`ia3_multiplicative` with ``l_Rs = 1`` (no division)."""
    from adamergex_peft import merge_utils as mu

    ones = _ones_like_any(vecs)
    fn = mu.multiplicative_linear if config.ia3_strategy == "linear" else mu.multiplicative_power
    return fn(vecs.get("T", ones), vecs.get("Rg", ones), None, config.t)


def ia3_additive(vecs, weights, config):
    """``sum_role w_role l_role`` (a missing module counts as ones)."""
    from adamergex_peft import merge_utils as mu

    ones = _ones_like_any(vecs)
    roles = list(weights)
    return mu.linear_combination([vecs.get(r, ones) for r in roles], [weights[r] for r in roles])


def _ia3_arimerge(vecs, weights, config):
    from adamergex_peft import merge_utils as mu

    ones = _ones_like_any(vecs)
    c0, c1 = config.arimerge_weights
    return mu.arimerge_ia3(vecs.get("T", ones), vecs.get("Rg", ones), vecs.get("Rs", ones), c0, c1)


# ---------------------------------------------------------------------------------- the built-ins
_STRATEGY_OPTIONS = {k: OPTION_DEFAULTS[k] for k in ("lora_strategy", "svd_rank", "ia3_strategy")}

register_method(
    MergeMethod(
        name="adamergex",
        reference="Zhao et al., AdaMergeX, NAACL 2025 (structure-adaptive operators)",
        description="structure-adaptive operators: LoRA T + t (Rg - Rs), (IA)^3 T * (t (Rg / Rs - 1) + 1)",
        uses_t=True,
        roles=lambda t: {"T": 1.0, "Rg": t, "Rs": -t},
        lora=LINEAR_LORA,
        ia3=ia3_multiplicative,
        options=_STRATEGY_OPTIONS,
    )
)
register_method(
    MergeMethod(
        name="cross",
        reference="Zhao et al., NAACL 2025, ablation: the mismatched operators",
        description="the mismatched operators (element-wise ratios for LoRA, sums for (IA)^3)",
        uses_t=True,
        roles=lambda t: {"T": 1.0, "Rg": t, "Rs": -t},
        lora=LoraCombine(_lora_cross, "uniform"),
        ia3=ia3_additive,
    )
)
register_method(
    MergeMethod(
        name="arimerge",
        reference="Zhang et al., Composing parameter-efficient modules with arithmetic operations, NeurIPS 2023",
        description="AriMerge (Zhang et al. 2023): c0 T + c1 (Rg - Rs), factor-wise",
        uses_t=False,
        roles=lambda t: {"T": 1.0, "Rg": 1.0, "Rs": -1.0},  # which adapters; the formula has its own weights
        lora=LoraCombine(_lora_arimerge, "uniform"),
        ia3=_ia3_arimerge,
        options={"arimerge_weights": OPTION_DEFAULTS["arimerge_weights"]},
    )
)
register_method(
    MergeMethod(
        name="task_only",
        reference="Zhao et al., NAACL 2025, baseline Eng-FT",
        description="Eng-FT: the task adapter as is",
        uses_t=False,
        roles=lambda t: {"T": 1.0},
        lora=LINEAR_LORA,
        ia3=ia3_task,
        options=_STRATEGY_OPTIONS,
    )
)
register_method(
    MergeMethod(
        name="task_plus_target",
        reference="Zhao et al., NAACL 2025, baseline: task + target reference, no subtraction",
        description="task + t * target reference, no subtraction",
        uses_t=True,
        roles=lambda t: {"T": 1.0, "Rg": t},
        lora=LINEAR_LORA,
        ia3=ia3_multiplicative_target_only,
        options=_STRATEGY_OPTIONS,
    )
)
