"""Tests of dpm_jax.report: the per-group table, by hand arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import dpm_jax
from dpm_jax import report


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1,), "VALID",
                                      dimension_numbers=("NWC", "WIO", "NWC"))


def _net(v, x):
  """[B, 3, 4] -> 8 -> 16 channels at each of 3 positions (1x1 convs), flattened into the
  head."""
  h = jax.nn.relu(_conv(x, v["w1"]) + v["b1"])
  h = jax.nn.relu(_conv(h, v["w2"]) + v["b2"])
  return h.reshape(h.shape[0], -1) @ v["w3"]


SHAPES = {"w1": (1, 4, 8), "b1": (8,), "w2": (1, 8, 16), "b2": (16,), "w3": (48, 2)}
KEEP = [np.arange(8) < 3, np.arange(16) < 10]


def _spec() -> dpm_jax.GroupSpec:
  v = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  return dpm_jax.trace_groups_fn(_net, v, jax.ShapeDtypeStruct((1, 3, 4), jnp.float32))


# MACs: w1 3 * 4 * a, w2 3 * a * b, w3 (3 * b) * 2 for a of 8 and b of 16 kept. Params:
# group 0 owns w1's columns, b1 and w2's rows; group 1 w2's columns, b2 and w3's rows (3 per
# channel after the flatten).
ROWS = [
    dict(group=0, name="w1", channels_before=8, channels_after=3,
         macs_before=96 + 384, macs_after=36 + 90,
         params_before=4 * 8 + 8 + 8 * 16, params_after=4 * 3 + 3 + 3 * 16),
    dict(group=1, name="w2", channels_before=16, channels_after=10,
         macs_before=384 + 96, macs_after=90 + 60,
         params_before=8 * 16 + 16 + 16 * 3 * 2, params_after=8 * 10 + 10 + 10 * 3 * 2),
]


def test_group_rows_by_hand():
  assert report.group_rows(_spec(), KEEP) == ROWS


def test_write_report_lists_every_group(tmp_path):
  path = report.write_report(tmp_path, _spec(), KEEP, title="MLP", summary={"accuracy": 0.5})
  lines = open(path).read().splitlines()
  assert lines[:4] == ["# MLP", "", "- accuracy: 0.5",
                       "- MACs: 576 -> 186 (32.29% remain; FLOPs = 2 x MACs)"]
  assert lines[4] == "- params: 280 -> 115 (41.07% remain)"
  header = lines.index(
      "| # | group | channels before | after | MACs before | after | params before | after |")
  assert lines[header + 2:header + 5] == [
      "| 0 | `w1` | 8 | 3 | 480 | 126 | 168 | 63 |",
      "| 1 | `w2` | 16 | 10 | 480 | 150 | 240 | 150 |",
      ""]
  assert (tmp_path / "widths.png").read_bytes()[:4] == b"\x89PNG"
