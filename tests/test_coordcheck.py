"""Coordinate check (Yang et al. 2022; docs/scaling.md): muP flat, SP with one LR grows.

result = coord_check(cfg, widths=(32, 64, 128), steps=5)   # result.slopes, .table(), .plot(png)
base_width_for(cfg, widths)   # param.base_width, or the smallest width for a non-standard name
"""

import json
import math
import os
import subprocess
import sys

import pytest

from lm_align.config import apply_overrides, load_config
from lm_align.coordcheck import base_width_for, coord_check, loglog_slope, width_overrides
from tests.helpers import DEFAULT_EXPERIMENT, REPO, env_with_devices

WIDTHS = (32, 64, 128)
SMALL = [
    "model.n_layers=1",
    "data.seq_len=16",
    "train.batch_size=4",
    "optimizer.name=adam",
    "optimizer.lr=3e-2",
]


def _cfg(extra):
    return apply_overrides(load_config(DEFAULT_EXPERIMENT), SMALL + extra)


def test_loglog_slope_recovers_a_power_law():
    widths = [32, 64, 128, 256]
    assert loglog_slope(widths, [3 * w**0.5 for w in widths]) == pytest.approx(0.5)
    assert loglog_slope(widths, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)


def test_widths_scale_heads_and_mlp_jointly():
    cfg = _cfg([])  # d_model 128, 4 heads of 32, d_ff 512
    assert width_overrides(cfg, 64) == [
        "model.d_model=64",
        "model.n_heads=2",
        "model.head_dim=32",
        "model.d_ff=256",
    ]
    with pytest.raises(ValueError, match="multiple of the head dim"):
        width_overrides(cfg, 48)


def test_base_width_is_the_configs_or_the_smallest_width_for_a_non_standard_name():
    assert base_width_for(_cfg(["param.name=mup", "param.base_width=64"]), WIDTHS) == (64, "")
    assert base_width_for(_cfg(["param.name=standard"]), WIDTHS) == (None, "")
    base, note = base_width_for(_cfg(["param.name=ntk"]), (128, 32, 64))
    assert base == 32 and "smallest width 32" in note and "param.base_width" in note


def test_mup_passes_and_standard_with_one_lr_fails(tmp_path):
    # No param.base_width: muP takes the smallest width as its base (were every
    # width its own base, this would be SP with one LR, and the hidden slopes grow).
    mup = coord_check(_cfg(["param.name=mup"]), WIDTHS, steps=5, seeds=(0, 1))
    assert mup.base_width == WIDTHS[0] and "base width 32 (the smallest width)" in mup.description
    assert set(mup.slopes) == {"embedding", "block0.attn", "block0.mlp", "logits"}
    for layer, slope in mup.slopes.items():
        assert abs(slope) < 0.15, (layer, slope, mup.table())
    # Standard parameterization, the same LR at every width (base_width None).
    sp = coord_check(_cfg(["param.name=standard"]), WIDTHS, steps=5, seeds=(0, 1))
    assert sp.base_width is None and sp.note == ""
    for layer in ("block0.attn", "block0.mlp"):
        assert sp.slopes[layer] > 0.5, (layer, sp.slopes[layer], sp.table())
    png = mup.plot(str(tmp_path / "mup.png"))
    assert os.path.getsize(png) > 10_000


def test_cli_prints_slopes_as_json_and_writes_the_plot(tmp_path):
    out = tmp_path / "cc.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_align.cli",
            "coordcheck",
            "--widths",
            "32,64",
            "--steps",
            "1",
            "--out",
            str(out),
            "--json",
            "--config.model.n_layers=1",
            "--config.data.seq_len=8",
            "--config.train.batch_size=2",
            "--config.param.name=mup",
        ],
        capture_output=True,
        text=True,
        env=env_with_devices(1),
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    slopes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(slopes) == {"embedding", "block0.attn", "block0.mlp", "logits"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in slopes.values())
    assert out.exists() and out.stat().st_size > 10_000
    assert "smallest width 32 is the base width of mup" in proc.stderr, proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "lm_align.cli", "coordcheck", "--widths", "64"],
        capture_output=True,
        text=True,
        env=env_with_devices(1),
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2 and "at least 2" in bad.stderr


def test_coordcheck_does_not_import_the_cli():
    """The CLI imports coordcheck; coordcheck loads configs through lm_align.config."""
    with open(os.path.join(REPO, "lm_align", "coordcheck.py")) as f:
        source = f.read()
    assert "lm_align.cli" not in source and "from lm_align import cli" not in source
