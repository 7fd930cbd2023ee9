"""The abc table derived from Everett et al. 2024's constraints (arXiv:2407.05872).

Nothing here reads the LR exponents of lm_align's table to compute them: for each
optimizer x alignment x parameterization, the maximal stable c of every layer
is found by searching all c in a grid of halves for the points where the
paper's stability constraints hold, then compared with the table. The
constraints, for a network embedding -> hidden -> hidden -> readout of width n
(docs/scaling.md, "Where each cell comes from"):

  stability at init   a_1 + b_1 = 0,  a_l + b_l = 1/2,  a_{L+1} + b_{L+1} >= 1/2

  p_l: the change of the forward weight n^(-a_l) w_l in one step, ~ n^(-p_l)
    Adam       p_l = a_l + c_l                        (update ~ LR, any gradient)
    Adafactor  p_l = a_l + b_l + c_l                  (update ~ LR * RMS(w_l)), and c_l >= 0
    SGD        p_l = 2 a_l + c_l + gamma  (l <= L),   p_{L+1} = 2 a_{L+1} + c_{L+1}
               gamma = min(a_{L+1} + b_{L+1}, 2 a_{L+1} + c_{L+1}): the backward
               signal dL/dh ~ n^(-gamma) comes through the readout weights, the sum
               of their init (n^(-b)) and their updates (n^(-a-c)); the larger wins.

  r_l: the change of layer l's output, ~ n^(-r_l); stable iff every r_l >= 0
    r_1     = p_1                                      (no sum over the width)
    r_l     = min(p_l - alpha, p_l + r_{l-1} - u, a_l + b_l + r_{l-1} - omega)
    r_{L+1} = min(a_{L+1} + b_{L+1} + r_L - omega, p_{L+1} - alpha, p_{L+1} + r_L - u)

  alignment (alpha, omega, u) of the terms (dW h, W dh, dW dh): full (1, 1/2, 1),
  none (1/2, 1/2, 1/2).

The paper prints the SGD gradient exponent with a max where the derivation
needs a min; the tests below show the max cannot be meant (it makes the
constraints unbounded) and a coordinate check on the Transformer agrees with
the min.
"""

import itertools

import pytest

from lm_align import parameterization as P

ROLES = ("embedding", "hidden", "readout")
ALIGNMENT = {"full": (1.0, 0.5, 1.0), "none": (0.5, 0.5, 0.5)}  # (alpha, omega, u)
GRID = [k / 2 for k in range(-8, 9)]  # c in [-4, 4], steps of 1/2
CELLS = sorted(P.C)  # (optimizer, alignment, name), every tabulated cell


def residuals(optimizer, ab, c, alignment, gradient_scale=min):
    """(r_1, r_hidden_1, r_hidden_2, r_{L+1}) of the module doc; stable iff all >= 0."""
    alpha, omega, u = ALIGNMENT[alignment]
    (a1, b1), (ah, bh), (aL, bL) = ab
    c1, ch, cL = c
    if optimizer == "sgd":
        gamma = gradient_scale(aL + bL, 2 * aL + cL)
        p1, ph, pL = 2 * a1 + c1 + gamma, 2 * ah + ch + gamma, 2 * aL + cL
    elif optimizer == "adam":
        p1, ph, pL = a1 + c1, ah + ch, aL + cL
    else:  # adafactor
        p1, ph, pL = a1 + b1 + c1, ah + bh + ch, aL + bL + cL
    r = [p1]
    for _ in range(2):  # two hidden layers: the hidden -> hidden term appears
        r.append(min(ph - alpha, ph + r[-1] - u, ah + bh + r[-1] - omega))
    r.append(min(aL + bL + r[-1] - omega, pL - alpha, pL + r[-1] - u))
    return tuple(r)


def stable(optimizer, ab, c, alignment, gradient_scale=min):
    r = residuals(optimizer, ab, c, alignment, gradient_scale)
    # Adafactor scales its update by the parameter's RMS: c < 0 would grow a
    # parameter by a factor n^(-c) per step (Everett et al.: c_1 >= 0, c_{L+1} >= 0).
    return all(x >= 0 for x in r) and (optimizer != "adafactor" or min(c) >= 0)


def feasible(optimizer, ab, alignment, gradient_scale=min):
    return [
        c
        for c in itertools.product(GRID, repeat=3)
        if stable(optimizer, ab, c, alignment, gradient_scale)
    ]


def maximal_stable_c(optimizer, ab, alignment, gradient_scale=min):
    """The c at which every layer has its largest stable LR at once, or None.

    None when there is no such point: the smallest stable c of each layer, taken
    together, is not stable (raising one layer's LR forces another's down).
    """
    points = feasible(optimizer, ab, alignment, gradient_scale)
    best = tuple(min(c[i] for c in points) for i in range(3))
    return best if best in points else None


def ab_of(name):
    return tuple(P.AB[name][r] for r in ROLES)


def table_c(optimizer, alignment, name):
    return tuple(P.C[(optimizer, alignment, name)][r] for r in ROLES)


# ----------------------------------------------------------------------------
# The table satisfies the constraints, cell by cell
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", P.NAMES)
def test_ab_is_stable_at_init(name):
    (a1, b1), (ah, bh), (aL, bL) = ab_of(name)
    assert a1 + b1 == 0 and ah + bh == 0.5
    # readout: 1/2 (SP and NTK, O(1) logits at init) or 1 (muP and MFP, 1/sqrt(n))
    assert aL + bL == (0.5 if name in ("standard", "ntk") else 1.0)


@pytest.mark.parametrize("optimizer, alignment, name", CELLS)
def test_every_lr_exponent_is_the_maximal_stable_one(optimizer, alignment, name):
    derived = maximal_stable_c(optimizer, ab_of(name), alignment)
    assert derived is not None and min(derived) > GRID[0]  # one maximal point, inside the grid
    assert derived == table_c(optimizer, alignment, name), (optimizer, alignment, name)


@pytest.mark.parametrize("optimizer, alignment, name", CELLS)
def test_at_the_table_every_layer_is_stable_and_learns_features(optimizer, alignment, name):
    """r_l = 0: the embedding and hidden outputs (features) and the logits move by
    Theta(1). Except Adafactor without alignment under muP and MFP: c >= 0 caps the
    readout's LR, and the logits (n^-1/2 at init) move by n^-1/2 only."""
    r = residuals(optimizer, ab_of(name), table_c(optimizer, alignment, name), alignment)
    capped = optimizer == "adafactor" and alignment == "none" and name in ("mup", "mfp")
    assert r == (0, 0, 0, 0.5 if capped else 0), (optimizer, alignment, name, r)


def test_the_table_and_the_derivation_cover_the_same_cells():
    tabulated = {(o, a) for o, a, _ in P.C}
    assert tabulated == {(o, a) for o in P.OPTIMIZERS for a in P.ALIGNMENTS} - {("sgd", "none")}
    assert all((o, a, n) in P.C for o, a in tabulated for n in P.NAMES)


# ----------------------------------------------------------------------------
# The cells that were open
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mup", "mfp"])
def test_adafactor_without_alignment_has_readout_exponent_zero(name):
    """The update is already normalised: c >= 0 binds before the activations do."""
    assert table_c("adafactor", "none", name) == (0, 0, 0)
    # without the c >= 0 rule the activations alone would allow c_readout = -1/2
    assert min(residuals("adafactor", ab_of(name), (0, 0, -0.5), "none")) == 0


def test_the_sgd_gradient_scale_is_a_min_not_the_printed_max():
    sp = ab_of("standard")
    # Read as a max, lowering the readout's LR would license any embedding LR:
    # no maximal point, and the smallest stable c_1 sits at the edge of the grid.
    assert maximal_stable_c("sgd", sp, "full", gradient_scale=max) is None
    assert stable("sgd", sp, (-4.0, -3.0, 4.0), "full", gradient_scale=max)
    # It would also claim a backward signal smaller than at init, where the
    # readout weights are their init alone: n^-(2a+c) = n^-1 < n^-(a+b) = n^-1/2.
    (aL, bL), cL = sp[2], table_c("sgd", "full", "standard")[2]
    assert max(aL + bL, 2 * aL + cL) > aL + bL
    # With the readout at its own maximal LR, the max reading gives SP embedding
    # -1 and hidden 0 (NTK -1 and -1); the min reading gives the table's cells.
    fixed_readout = [c for c in feasible("sgd", sp, "full", max) if c[2] == 1]
    assert (min(c[0] for c in fixed_readout), min(c[1] for c in fixed_readout)) == (-1, 0)
    assert table_c("sgd", "full", "standard")[:2] == (-0.5, 0.5)
    assert table_c("sgd", "full", "ntk")[:2] == (-0.5, -0.5)


def test_mfp_embedding_is_the_mean_field_one():
    """Both (0, 0) and (-1/2, 1/2) satisfy a_1 + b_1 = 0 and are symmetry images
    (identical training); (0, 0) is mean field's own: with SGD one LR ~ n for
    every layer (Yang & Hu 2021's MFP, c = -1), which (-1/2, 1/2) would break."""
    assert P.AB["mfp"]["embedding"] == (0, 0)
    assert table_c("sgd", "full", "mfp") == (-1, -1, -1)
    shifted = ((-0.5, 0.5), *ab_of("mfp")[1:])
    assert maximal_stable_c("sgd", shifted, "full") == (0, -1, -1)
    # Adam: the embedding exponent moves by the shift t = 1/2, c -> c - t
    assert maximal_stable_c("adam", shifted, "full")[0] == table_c("adam", "full", "mfp")[0] + 0.5


def test_sgd_without_alignment_has_no_single_maximal_point_for_mup_and_mfp():
    """Why the table leaves SGD/none out: the readout LR trades against the others."""
    for name in ("mup", "mfp"):
        assert maximal_stable_c("sgd", ab_of(name), "none") is None
    assert maximal_stable_c("sgd", ab_of("standard"), "none") == (-0.5, 0, 0.5)
    assert maximal_stable_c("sgd", ab_of("ntk"), "none") == (-0.5, -1, -0.5)


@pytest.mark.parametrize("name", P.NAMES)
def test_epsilon_exponents_are_the_gradient_exponents_at_init(name):
    """g = a_l + a_{L+1} + b_{L+1} (embedding, hidden: the backward signal times the
    multiplier) and a_{L+1} (readout: the multiplier times O(1) features)."""
    (a1, _), (ah, _), (aL, bL) = ab_of(name)
    assert (P.G[name]["embedding"], P.G[name]["hidden"], P.G[name]["readout"]) == (
        a1 + aL + bL,
        ah + aL + bL,
        aL,
    )


def test_no_cell_of_ab_or_c_is_flagged():
    assert not P.CHECK and set(P.CHECK_TABLES) == {"G"}
    assert not any(P.is_flagged("C", k, r) for k in P.C for r in ROLES)
    assert not any(P.is_flagged("AB", n, r) for n in P.NAMES for r in ROLES)
    assert P.is_flagged("G", "mfp", "embedding")


# ----------------------------------------------------------------------------
# Coordinate check where the paper's print is ambiguous (the SGD max)
# ----------------------------------------------------------------------------


def test_sgd_coordinate_check_agrees_with_the_min(monkeypatch):
    """SP with SGD, per-layer LRs from the table: every layer's change is flat in
    width. The max reading's exponents (-1, 0, 1) make the embedding and hidden
    layers grow (about n^(1/2) and n^(1/3) here). No gradient clipping: a
    global-norm clip rescales every SGD update by the width-dependent norm."""
    from lm_align.config import apply_overrides, load_config
    from lm_align.coordcheck import coord_check
    from tests.helpers import DEFAULT_EXPERIMENT

    cfg = apply_overrides(
        load_config(DEFAULT_EXPERIMENT),
        [
            "model.n_layers=1",
            "data.seq_len=16",
            "train.batch_size=4",
            "optimizer.name=sgd",
            "optimizer.lr=0.1",
            "optimizer.clip_norm=0",
            "param.name=standard",
            "param.base_width=32",
        ],
    )
    table = coord_check(cfg, (32, 64, 128), steps=5, seeds=(0,))
    for layer, slope in table.slopes.items():
        assert abs(slope) < 0.15, (layer, slope, table.table())
    monkeypatch.setitem(P.C, ("sgd", "full", "standard"), P._roles(-1, 0, 1))
    printed_max = coord_check(cfg, (32, 64, 128), steps=5, seeds=(0,))
    assert printed_max.slopes["embedding"] > 0.3, printed_max.table()
    assert printed_max.slopes["block0.attn"] > 0.2, printed_max.table()
