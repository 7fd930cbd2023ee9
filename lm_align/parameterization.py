"""abc-parameterizations: one table gives every parameter's init, multiplier, LR and epsilon.

Everett et al. 2024 (arXiv 2407.05872) write every parameterization as three
width exponents per layer. For a parameter w of role l (embedding, hidden,
readout) in a model of width n (d_model):

    forward weight   W_l   = A_l * n^(-a_l) * w_l
    init             w_l   ~ N(0, (B_l * n^(-b_l))^2)
    learning rate    eta_l = eta * C_l * (n / n_base)^(-c_l)
    Adam epsilon     eps_l = eps * (n / n_base)^(-g_l)

(a, b) depend on the parameterization (table AB), c on the optimizer, the
alignment assumption and the parameterization (table C), g on the
parameterization (table G). These three tables are the only copy of the
numbers in lm_align: the model reads init stds and multipliers from
:class:`Parameterization`, the optimizer reads LR and epsilon scales from it.
Cells not yet confirmed against the paper are listed in :data:`CHECK` (single
cells) and :data:`CHECK_TABLES` (whole tables), so one reading audits them all.
The tables, with what each cell means, are in docs/scaling.md.

    p = Parameterization.from_config({"name": "mup", "base_width": 128},
                                     optimizer="adamw", width=512)
    print(p.describe())
    lr_scales = p.lr_scales(params, logical_axes)  # same tree as params, floats
    tx = lm_align.optim.per_layer_lr(optax.adam(1e-3), lr_scales)

Roles (:func:`role_of`, from the logical axis names alone): every vector
(norm scales, biases) and every tensor whose first axis is ``'vocab'`` or does
not grow with width (``('vocab', 'embed')``, ``(None, 'embed')``) is
*embedding*-type; width to a fixed size (``('embed', 'vocab')``) is *readout*;
width to width (q/k/v, attention out, MLP in/out) is *hidden*. A scan axis
``'layers'`` is ignored.

"Init std" is the std the model hands its initializer (for lm_align's
truncated-normal matrices, the untruncated std, as now). For parameters the
model initialises to a constant it is the factor on that constant (norm scale
= init_std * 1; biases stay 0).

Width mode (the one choice the paper's notation leaves open here): what "n"
means in n^(-a) and n^(-b).

- ``"relative"`` (the default): every width factor is r = n / n_base, the same
  ratio the LR and epsilon formulas already use for c and g::

      W_l = A_l * r^(-a_l) * w_l,  std_l = B_l * sigma_l * r^(-b_l),

  with sigma_l lm_align's standard init at the base width: 1 for
  embedding-type, ``fan_in_base^(-1/2) = (fan_in / r)^(-1/2)`` for matrices.
  Why: (1) at n = n_base all four parameterizations are the *same* model with
  the same LR (SP with constants A, B, C), so eta and the constants tuned at
  the base width mean the same thing under every name and transfer to other
  widths (muTransfer; what the ``mup`` package does with its base shapes).
  (2) With a, b, c and g all relative, the abc symmetry
  a -> a+t, b -> b-t, c -> c-t (Adam; c-2t SGD; c Adafactor), g -> g+t
  leaves training identical *with the same constants* and, thanks to g, the
  same Adam epsilon (:meth:`Parameterization.shifted`). Absolute n in a, b but
  n/n_base in c matches only after rescaling C_l by m_base^(k t) (k = 2 SGD,
  1 Adam, m_base the layer's fan-in at the base width), and per-layer
  epsilons by m_base^(-t) (the C part is tested).
  (3) Standard parameterization with constants 1 is the model's current init
  (embedding std 1, matrices 1/sqrt(fan_in)) at every width.
- ``"absolute"``: the paper's formula literally, ``W = A m^(-a) w`` and
  ``std = B m^(-b)`` with m the layer's fan-in for matrices (n for q/k/v,
  MLP-in and readout; heads*head_dim for attention-out; d_ff for MLP-out) and
  m = n for embedding-type. Use it to reproduce Everett et al.'s fixed-width
  comparisons, where parameterizations differ even at n = n_base. It is the
  relative family with A_rel = A m_base^(-a) and B_rel = B m_base^(-b) / sigma.

Both modes assume widths scale jointly (fan_in / fan_in_base = n / n_base for
every matrix: d_ff and heads*head_dim proportional to d_model).

Defaults (:data:`DEFAULTS`): ``base_width=None`` means n_base = n, so r = 1 and
every multiplier, LR scale and epsilon scale is exactly 1 and every init std
is the model's current one, for any name and any model width: nothing changes
until an experiment names the width its hyperparameters were tuned at. With
``name="standard"``, ``global_lr=True`` and constants 1 the LR scale is r^(-c)
with c the hidden exponent (Adam 1, SGD 1/2, Adafactor 1/2 or 0) for every
layer: 1 at n = n_base. ``global_lr`` defaults to False so that
``param.name=mup`` alone means muP's per-layer LRs (with r = 1 it changes
nothing either way); set it True for the "one LR for all layers" baseline.

Tied embeddings: the shared [V, D] matrix has the embedding's axes, so it
takes the embedding role (init, LR, epsilon). A tied matrix has one forward
multiplier, so :meth:`Parameterization.check_tied_embeddings` raises unless
the embedding and readout multipliers agree (standard only: NTK, muP and MFP
put a different a on the readout).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, NamedTuple

import jax

ROLES = ("embedding", "hidden", "readout")
NAMES = ("standard", "ntk", "mup", "mfp")
OPTIMIZERS = ("sgd", "adam", "adafactor")
ALIGNMENTS = ("full", "none")
WIDTH_MODES = ("relative", "absolute")
# optimizer.name -> the row family of table C (Adam-atan2 and AdamW use Adam's).
OPTIMIZER_FAMILY = {
    "adamw": "adam",
    "adam": "adam",
    "adam_atan2": "adam",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "muon": "adam",  # its Adam-updated parameters; Muon's matrices: see `muon_dims`
}
# Logical axis names that grow with the model width.
WIDTH_AXES = frozenset({"embed", "heads", "kv_heads", "head_dim", "mlp"})
# Stacking axes (scan over layers) that are not part of the layer's shape.
STACK_AXES = frozenset({"layers"})


def _roles(embedding, hidden, readout) -> dict[str, Any]:
    return {"embedding": embedding, "hidden": hidden, "readout": readout}


# ----------------------------------------------------------------------------
# THE TABLE (Everett et al. 2024, arXiv:2407.05872; docs/scaling.md, "The exponent
# tables" and "Where each cell comes from"). Cells marked [check] are in CHECK.
# ----------------------------------------------------------------------------

# fmt: off
# (a, b): forward exponent, init exponent. Each satisfies the paper's stability at
# init: a+b = 0 (embedding), 1/2 (hidden), >= 1/2 (readout; 1/2 SP/NTK, 1 muP/MFP).
AB = {
    "standard": _roles((0, 0),       (0, 1/2), (0, 1/2)),
    "ntk":      _roles((0, 0),       (1/2, 0), (1/2, 0)),
    "mup":      _roles((-1/2, 1/2),  (0, 1/2), (1/2, 1/2)),
    # Mean field: unit-variance weights (b = 0) everywhere, like NTK, and the
    # readout multiplier 1/n; with SGD one LR ~ n for every layer (c = -1).
    "mfp":      _roles((0, 0),       (1/2, 0), (1, 0)),
}

# c: maximal stable LR exponent per (optimizer, alignment, name), derived from the
# paper's stability constraints (tests/test_abc_constraints.py derives every cell).
# SGD with alignment "none" is not tabulated: unsupported.
C = {
    ("sgd", "full", "standard"):        _roles(-1/2, 1/2, 1),
    ("sgd", "full", "ntk"):             _roles(-1/2, -1/2, 0),
    ("sgd", "full", "mup"):             _roles(0, 0, 0),
    ("sgd", "full", "mfp"):             _roles(-1, -1, -1),
    ("adam", "full", "standard"):       _roles(0, 1, 1),
    ("adam", "full", "ntk"):            _roles(0, 1/2, 1/2),
    ("adam", "full", "mup"):            _roles(1/2, 1, 1/2),
    ("adam", "full", "mfp"):            _roles(0, 1/2, 0),
    ("adam", "none", "standard"):       _roles(0, 1/2, 1/2),
    ("adam", "none", "ntk"):            _roles(0, 0, 0),
    ("adam", "none", "mup"):            _roles(1/2, 1/2, 0),
    ("adam", "none", "mfp"):            _roles(0, 0, -1/2),
    ("adafactor", "full", "standard"):  _roles(0, 1/2, 1/2),
    ("adafactor", "full", "ntk"):       _roles(0, 1/2, 1/2),
    ("adafactor", "full", "mup"):       _roles(0, 1/2, 0),
    ("adafactor", "full", "mfp"):       _roles(0, 1/2, 0),
    ("adafactor", "none", "standard"):  _roles(0, 0, 0),
    ("adafactor", "none", "ntk"):       _roles(0, 0, 0),
    ("adafactor", "none", "mup"):       _roles(0, 0, 0),
    ("adafactor", "none", "mfp"):       _roles(0, 0, 0),
}

# g: width exponent of the layer's gradient at init (Adam epsilon): a_l + a_{L+1} + b_{L+1}
# for the embedding and hidden layers, a_{L+1} for the readout.   [whole table check]
G = {
    "standard": _roles(1/2, 1/2, 0),
    "ntk":      _roles(1/2, 1, 1/2),
    "mup":      _roles(1/2, 1, 1/2),
    "mfp":      _roles(1, 3/2, 1),
}

# Cells flagged [check] (not yet confirmed against the paper): (table, row key, role).
# None left: AB and C are settled (docs/scaling.md, "Where each cell comes from").
CHECK: frozenset = frozenset()
# Tables flagged [check] as a whole, with the reason.
CHECK_TABLES = {
    "G": "epsilon exponents = the gradient's width exponent at init (consistent with AB, "
    "tests/test_abc_constraints.py); the paper's per-layer epsilon is not checked cell by cell",
}
# fmt: on


def is_flagged(table: str, row: Any, role: str) -> bool:
    """Whether cell (table, row, role) is flagged [check] (not yet confirmed against the paper)."""
    return table in CHECK_TABLES or (table, row, role) in CHECK


# ----------------------------------------------------------------------------
# Config group `param`
# ----------------------------------------------------------------------------

# fmt: off
DEFAULTS = {
    "name": "standard",           # standard | ntk | mup | mfp: the (a, b) row of table AB
    "alignment": "full",          # full | none: the LR-exponent row of table C
    "base_width": None,           # n_base: width eta, constants were tuned at; None = model width
    "global_lr": False,           # True: every layer uses the hidden layer's LR exponent
    "width_mode": "relative",     # relative: n/n_base in a, b too; absolute: n^(-a), n^(-b)
    "per_layer_eps": False,       # Adam: eps_l = optimizer.eps * (n/n_base)^(-g_l), not one eps
    "init_scale_embedding": 1.0,  # B_embedding: init std of embeddings, init value of norm scales
    "init_scale_hidden": 1.0,     # B_hidden: 1 = std 1/sqrt(fan_in) under standard (model's init)
    "init_scale_readout": 1.0,    # B_readout: likewise for the readout
    "multiplier_embedding": 1.0,  # A_embedding: constant forward multiplier
    "multiplier_hidden": 1.0,     # A_hidden
    "multiplier_readout": 1.0,    # A_readout
    "lr_scale_embedding": 1.0,    # C_embedding: constant LR factor
    "lr_scale_hidden": 1.0,       # C_hidden
    "lr_scale_readout": 1.0,      # C_readout
}
# fmt: on


class RoleValues(NamedTuple):
    """One value per role (hashable, so a Parameterization can be a jit static)."""

    embedding: Any
    hidden: Any
    readout: Any

    def of(self, role: str) -> Any:
        return getattr(self, role)


class Exponents(NamedTuple):
    """Width exponents of one role: forward a, init b, LR c, epsilon g."""

    a: float
    b: float
    c: float
    g: float


ONES = RoleValues(1.0, 1.0, 1.0)
VALUE_COLUMNS = ("init_std", "multiplier", "lr_scale", "eps_scale")  # of table_rows()


def table_exponents(
    name: str, optimizer: str, alignment: str, global_lr: bool = False
) -> RoleValues:
    """(a, b, c, g) per role read from AB, C and G; c of every role = c_hidden if global_lr."""
    _check_choice("param.name", name, NAMES)
    optimizer = _optimizer_family(optimizer)
    _check_choice("param.alignment", alignment, ALIGNMENTS)
    key = (optimizer, alignment, name)
    if key not in C:
        raise ValueError(
            f"optimizer {optimizer!r} with param.alignment={alignment!r} is not supported: "
            "Everett et al. tabulate no LR exponents for SGD without alignment; use "
            "param.alignment=full or an adaptive optimizer (adam, adamw, adam_atan2, adafactor)."
        )
    c = C[key]
    return RoleValues(
        *(
            Exponents(
                a=float(AB[name][r][0]),
                b=float(AB[name][r][1]),
                c=float(c["hidden"] if global_lr else c[r]),
                g=float(G[name][r]),
            )
            for r in ROLES
        )
    )


def _check_choice(field: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(valid)}.")


def _optimizer_family(optimizer: str) -> str:
    if optimizer in OPTIMIZERS:
        return optimizer
    if optimizer not in OPTIMIZER_FAMILY:
        raise ValueError(
            f"optimizer {optimizer!r} has no LR-exponent row; use one of "
            f"{', '.join(sorted(set(OPTIMIZER_FAMILY) | set(OPTIMIZERS)))}."
        )
    return OPTIMIZER_FAMILY[optimizer]


# ----------------------------------------------------------------------------
# Roles and fan-in from logical axis names
# ----------------------------------------------------------------------------


def _path_str(path: Any) -> str:
    if isinstance(path, str):
        return path
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _layer_axes(logical_axes: tuple, shape: tuple | None = None):
    """Axes (and shape) with scan-stacking axes removed."""
    keep = [i for i, ax in enumerate(logical_axes) if ax not in STACK_AXES]
    axes = tuple(logical_axes[i] for i in keep)
    return axes, (None if shape is None else tuple(shape[i] for i in keep))


def role_of(path: Any, logical_axes: tuple) -> str:
    """``"embedding" | "hidden" | "readout"`` from a parameter's logical axis names.

    After dropping a ``'layers'`` (scan) axis: vectors (ndim <= 1), tensors
    whose first axis is ``'vocab'`` (``('vocab', 'embed')``, or ``('vocab', None)``
    when the model dim is left unsharded) and tensors whose first axis does not
    grow with width (``(None, 'embed')``, a bias ``(None, 'heads', 'head_dim')``)
    are embedding-type; a tensor whose last axis is ``'vocab'`` or another fixed
    size (``('embed', 'vocab')``) is the readout; width to width is hidden.
    Width axes are :data:`WIDTH_AXES`. The names are the sharding names too:
    whoever renames them for sharding must keep this classification
    (tests/test_parameterization.py checks it on the Transformer).

    Args:
      path: the parameter's tree path (a jax key path or a string); only used in
        error messages.
      logical_axes: tuple of axis names (str or None), one per array axis.

    Raises:
      ValueError: a tensor with ndim >= 2, no 'vocab' axis and no width axis (unannotated).
    """
    axes, _ = _layer_axes(tuple(logical_axes))
    if len(axes) <= 1:
        return "embedding"
    if axes[0] == "vocab":
        return "embedding"
    if axes[-1] == "vocab":
        return "readout"
    if not any(ax in WIDTH_AXES for ax in axes):
        raise ValueError(
            f"cannot classify parameter {_path_str(path)!r} with logical axes "
            f"{tuple(logical_axes)}: "
            f"no 'vocab' axis and no axis that grows with width (width axes: {sorted(WIDTH_AXES)})."
        )
    if axes[0] not in WIDTH_AXES:
        return "embedding"
    if axes[-1] not in WIDTH_AXES:
        return "readout"
    return "hidden"


def muon_dims(params: Any, logical_axes: Any) -> Any:
    """Tree of (reduction axes, output axes) for the hidden matrices, None elsewhere.

    The layout is lm_align's [inputs..., outputs...] (see `fan_in`): a matrix
    writing into the residual stream ([H, K, D], [F, D]) contracts every axis
    but the last; any other hidden matrix contracts its first axis and outputs
    its width axes ([D, 3, H, K] -> heads, head_dim). Axes in neither (a scan's
    `layers` axis, an unnamed q/k/v or gate/up axis) are batch axes, so Muon
    orthogonalises each layer, and each of q, k, v, on its own. Embedding-type
    parameters and the readout get None (Adam).
    """

    def one(path, shape, axes):
        if role_of(path, axes) != "hidden":
            return None
        axes = tuple(axes)
        dims = [i for i, a in enumerate(axes) if a not in STACK_AXES and a is not None]
        if axes[dims[-1]] == "embed":
            return tuple(dims[:-1]), (dims[-1],)
        return (dims[0],), tuple(dims[1:])

    return _map_with_axes(one, params, logical_axes)


def fan_in(path: Any, shape: tuple, logical_axes: tuple) -> int:
    """Number of inputs contracted by a hidden or readout matrix.

    lm_align's layout is ``[inputs..., outputs...]``: a matrix that writes into
    the residual stream (last axis ``'embed'``: attention-out [H, K, D], MLP-out
    [F, D]) contracts every other axis; any other (q/k/v [D, 3, H, K], MLP-in
    [D, n, F], readout [D, V]) contracts its first axis. Scan axes are ignored.
    For embedding-type parameters the value is not used by :class:`Parameterization`.
    """
    axes, dims = _layer_axes(tuple(logical_axes), tuple(shape))
    if len(dims) != len(axes):
        raise ValueError(
            f"{_path_str(path)}: shape {tuple(shape)} and axes {tuple(logical_axes)} differ in rank"
        )
    if len(dims) <= 1:
        return int(dims[0]) if dims else 1
    if axes[-1] == "embed":
        return int(math.prod(dims[:-1]))
    return int(dims[0])


def _map_with_axes(fn, params: Any, logical_axes: Any) -> Any:
    """``fn(path, shape, axes)`` for every leaf of params; logical_axes holds a tuple per leaf.

    Leaves of ``params`` must be arrays or ``jax.ShapeDtypeStruct``s (a tuple of
    ints would itself be a pytree).
    """

    def leaf(path, x, axes):
        shape = tuple(getattr(x, "shape", ()))
        return fn(path, shape, tuple(axes))

    return jax.tree_util.tree_map_with_path(leaf, params, logical_axes)


# ----------------------------------------------------------------------------
# Parameterization
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """A parameterization at one width: exponents from the table plus constants.

    Build it with :meth:`from_config`; the constructor is for tests and
    custom exponents (``exponents`` given explicitly, any ``name``).
    """

    name: str = "standard"  # standard | ntk | mup | mfp (free text with explicit exponents)
    optimizer: str = "adam"  # row family: sgd | adam | adafactor
    alignment: str = "full"  # full | none
    width: int = 128  # n, the model width (d_model)
    base_width: int = 128  # n_base
    global_lr: bool = False  # every role uses the hidden LR exponent
    width_mode: str = "relative"  # relative | absolute (module doc)
    per_layer_eps: bool = False  # adam_eps() returns a tree eps * r^(-g) instead of one eps
    A: RoleValues = ONES  # constant forward multipliers
    B: RoleValues = ONES  # constant init scales
    C: RoleValues = ONES  # constant LR factors
    exponents: RoleValues | None = None  # Exponents per role; None = table_exponents(...)

    def __post_init__(self):
        object.__setattr__(self, "optimizer", _optimizer_family(self.optimizer))
        _check_choice("param.width_mode", self.width_mode, WIDTH_MODES)
        for field in ("width", "base_width"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field} must be a positive number, got {value!r}.")
        for field in ("A", "B", "C"):
            values = RoleValues(*(float(v) for v in getattr(self, field)))
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"constants {field} must be finite, got {values}.")
            object.__setattr__(self, field, values)
        if any(v < 0 for v in self.B) or any(v < 0 for v in self.C):
            raise ValueError(
                f"init scales B and LR scales C must be >= 0, got B={self.B}, C={self.C}."
            )
        if any(v == 0 for v in self.A):
            raise ValueError(f"multipliers A must be nonzero, got {self.A}.")
        if self.exponents is None:
            object.__setattr__(
                self,
                "exponents",
                table_exponents(self.name, self.optimizer, self.alignment, self.global_lr),
            )
        else:
            object.__setattr__(
                self,
                "exponents",
                RoleValues(*(Exponents(*(float(x) for x in e)) for e in self.exponents)),
            )

    # -- construction -------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, optimizer: str, width: int
    ) -> Parameterization:
        """From the ``param`` config group (fields as in :data:`DEFAULTS`).

        Args:
          config: mapping with ``keys()`` and ``.get``; missing fields take
            their defaults, unknown fields raise.
          optimizer: ``optimizer.name`` (adamw, adam, adam_atan2, adafactor,
            sgd) or a family (sgd, adam, adafactor).
          width: the model width n (``model.d_model``).
        """
        unknown = sorted(set(config.keys()) - set(DEFAULTS))
        if unknown:
            raise ValueError(
                f"Unknown param config key(s) {unknown}; valid keys are {sorted(DEFAULTS)}."
            )
        c = {k: config.get(k, v) for k, v in DEFAULTS.items()}
        _check_choice("param.name", c["name"], NAMES)
        if not isinstance(c["global_lr"], bool) or not isinstance(c["per_layer_eps"], bool):
            raise ValueError("param.global_lr and param.per_layer_eps must be booleans.")  # noqa: TRY004
        role_consts = lambda prefix: RoleValues(*(c[f"{prefix}_{r}"] for r in ROLES))
        return cls(
            name=c["name"],
            optimizer=optimizer,
            alignment=c["alignment"],
            width=width,
            base_width=width if c["base_width"] is None else c["base_width"],
            global_lr=c["global_lr"],
            width_mode=c["width_mode"],
            per_layer_eps=c["per_layer_eps"],
            A=role_consts("multiplier"),
            B=role_consts("init_scale"),
            C=role_consts("lr_scale"),
        )

    def shifted(self, t: RoleValues | Mapping[str, float]) -> Parameterization:
        """The abc-symmetric parameterization: a+t, b-t, c-k*t, g+t per role.

        k = 2 for SGD, 1 for Adam, 0 for Adafactor. In relative width mode it
        trains identically (same W_l at every step) with the same constants.
        """
        t = RoleValues(*(t[r] for r in ROLES)) if isinstance(t, Mapping) else RoleValues(*t)
        k = {"sgd": 2.0, "adam": 1.0, "adafactor": 0.0}[self.optimizer]
        exps = RoleValues(
            *(Exponents(e.a + s, e.b - s, e.c - k * s, e.g + s) for e, s in zip(self.exponents, t))
        )
        return dataclasses.replace(self, name=f"{self.name}+shift", exponents=exps)

    # -- per-role scalars ---------------------------------------------------

    @property
    def ratio(self) -> float:
        """r = n / n_base."""
        return self.width / self.base_width

    def _width_factor(self, role: str, fan_in_: int | None) -> float:
        """What n^(-a) and n^(-b) are powers of: r (relative) or the layer's width (absolute)."""
        if self.width_mode == "relative":
            return self.ratio
        return self.width if role == "embedding" or fan_in_ is None else fan_in_

    def init_std(self, role: str, fan_in_: int | None = None) -> float:
        """Init std of w; for constant-initialised vectors the factor on the constant.

        ``fan_in_`` is the matrix's fan-in (:func:`fan_in`); None means n.
        """
        e, m = self.exponents.of(role), self._width_factor(role, fan_in_)
        std = self.B.of(role) * m ** (-e.b)
        if role != "embedding" and self.width_mode == "relative":
            fan_in_base = (self.width if fan_in_ is None else fan_in_) / self.ratio
            std *= fan_in_base**-0.5
        return std

    def multiplier(self, role: str, fan_in_: int | None = None) -> float:
        """Forward multiplier A * n^(-a): the model uses ``multiplier * w``."""
        e = self.exponents.of(role)
        return self.A.of(role) * self._width_factor(role, fan_in_) ** (-e.a)

    def lr_scale(self, role: str) -> float:
        """C * (n/n_base)^(-c): the factor on the global learning rate."""
        return self.C.of(role) * self.ratio ** (-self.exponents.of(role).c)

    def eps_scale(self, role: str) -> float:
        """(n/n_base)^(-g): the factor on the base Adam epsilon."""
        return self.ratio ** (-self.exponents.of(role).g)

    # -- trees matching a params tree --------------------------------------

    def roles(self, params: Any, logical_axes: Any) -> Any:
        """Tree of role names, one per parameter."""
        return _map_with_axes(lambda p, s, ax: role_of(p, ax), params, logical_axes)

    def init_stds(self, params: Any, logical_axes: Any) -> Any:
        """Tree of init stds (float) matching ``params`` (arrays or ShapeDtypeStructs)."""
        return _map_with_axes(self._leaf("init_std"), params, logical_axes)

    def multipliers(self, params: Any, logical_axes: Any) -> Any:
        """Tree of forward multipliers (float)."""
        return _map_with_axes(self._leaf("multiplier"), params, logical_axes)

    def lr_scales(self, params: Any, logical_axes: Any) -> Any:
        """Tree of LR scales (float), for :func:`lm_align.optim.per_layer_lr`."""
        return _map_with_axes(lambda p, s, ax: self.lr_scale(role_of(p, ax)), params, logical_axes)

    def eps_scales(self, params: Any, logical_axes: Any) -> Any:
        """Tree of Adam-epsilon scales (float): multiply the base epsilon by these."""
        return _map_with_axes(lambda p, s, ax: self.eps_scale(role_of(p, ax)), params, logical_axes)

    def adam_eps(self, eps: float, params: Any, logical_axes: Any) -> Any:
        """The ``eps`` to give Adam: the float itself, or a tree when ``per_layer_eps``."""
        if not self.per_layer_eps:
            return eps
        return jax.tree.map(lambda s: eps * s, self.eps_scales(params, logical_axes))

    def _leaf(self, method: str):
        def fn(path, shape, axes):
            role = role_of(path, axes)
            f_in = None if role == "embedding" else fan_in(path, shape, axes)
            return getattr(self, method)(role, f_in)

        return fn

    def check_tied_embeddings(self) -> None:
        """Raise if a tied embedding/readout matrix cannot have one multiplier."""
        emb, ro = self.multiplier("embedding"), self.multiplier("readout", self.width)
        if self.exponents.embedding.a != self.exponents.readout.a or emb != ro:
            raise ValueError(
                f"tied embeddings need equal embedding and readout multipliers; {self.name} gives "
                f"a = {self.exponents.embedding.a} vs {self.exponents.readout.a} "
                f"(A = {self.A.embedding} vs {self.A.readout}): untie them "
                "(model.tie_embeddings=false)."
            )

    # -- reporting ------------------------------------------------------------

    def table_rows(self) -> list[dict[str, Any]]:
        """One dict per role: exponents and this width's values (matrices: fan_in = n)."""
        rows = []
        for role in ROLES:
            e = self.exponents.of(role)
            rows.append(
                {
                    "role": role,
                    "a": e.a,
                    "b": e.b,
                    "c": e.c,
                    "g": e.g,
                    "init_std": self.init_std(role),
                    "multiplier": self.multiplier(role),
                    "lr_scale": self.lr_scale(role),
                    "eps_scale": self.eps_scale(role),
                }
            )
        return rows

    def describe(self) -> str:
        """A per-role table for logs (init std of matrices shown for fan_in = n)."""
        frac = lambda x: str(Fraction(x).limit_denominator(64))
        head = (
            f"{self.name} / {self.optimizer} / alignment {self.alignment}"
            f"{' / global LR' if self.global_lr else ''}: "
            f"n={self.width:g}, n_base={self.base_width:g}, "
            f"r={self.ratio:g}, width_mode={self.width_mode}"
        )
        names = ("init std", "mult", "lr scale", "eps scale")
        cols = f"{'role':<10}" + "".join(f" {x:>5}" for x in "abcg")
        cols += "".join(f" {x:>10}" for x in names)
        lines = [head, cols]
        for row in self.table_rows():
            lines.append(
                f"{row['role']:<10}"
                + "".join(f" {frac(row[x]):>5}" for x in "abcg")
                + "".join(f" {row[x]:>10.4g}" for x in VALUE_COLUMNS)
            )
        return "\n".join(lines)
