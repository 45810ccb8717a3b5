"""kure_jax.core.formats against NumPy + ml_dtypes casts and an independent NumPy MX/NVFP4 conversion."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized

from kure_jax.core import formats as F
from kure_jax.core.formats import fake_quantize, fake_quantize_by_index

# ---------------------------------------------------------------- NumPy references (independent)

ML_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
             "fp6_e3m2": ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
             "fp4_e2m1": ml_dtypes.float4_e2m1fn}
INT_FORMATS = tuple(f"int{b}" for b in range(2, 9))
FLOAT_FORMATS = tuple(ML_DTYPES)
# OCP MX v1.0: element format and emax_elem (exponent of the element's largest normal value).
MX = {"mxfp8_e4m3": ("fp8_e4m3", 8), "mxfp8_e5m2": ("fp8_e5m2", 15), "mxfp6_e3m2": ("fp6_e3m2", 4),
      "mxfp6_e2m3": ("fp6_e2m3", 2), "mxfp4": ("fp4_e2m1", 2), "mxint8": ("int8", 0)}
LARGEST = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp6_e3m2": 28.0, "fp6_e2m3": 7.5, "fp4_e2m1": 6.0,
           "int8": 127 / 64}
f32 = np.float32


def recip(a):
  """float32 reciprocal, as the module documents (x / Δ is computed as x · (1/Δ))."""
  return f32(1.0) / np.asarray(a, f32)


def np_element(v, elem):
  """Round float32 v to the element format with saturation (RNE), via ml_dtypes."""
  if elem == "int8":  # MXINT8: int8 × 2^-6, symmetric clamp
    return (np.clip(np.round(v * f32(64)), -127, 127) / f32(64)).astype(f32)
  m = LARGEST[elem]
  return np.clip(v, -m, m).astype(ML_DTYPES[elem]).astype(f32)


def np_scalar(x, fmt, step):
  x = np.asarray(x, f32)
  step = np.asarray(step, f32)
  v = x * recip(step)
  if fmt.startswith("int"):
    half = 2.0 ** (int(fmt[3:]) - 1)
    q = np.clip(np.round(v), -half, half - 1).astype(f32)
  else:
    q = np_element(v, fmt)
  return (q * step).astype(f32)


def _blocks(x, axis, block):
  x = np.moveaxis(np.asarray(x, f32), axis, -1)
  n = x.shape[-1]
  pad = (-n) % block
  xp = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), f32)], axis=-1)
  return xp.reshape(x.shape[:-1] + (-1, block)), n


def _unblocks(b, n, axis):
  return np.moveaxis(b.reshape(b.shape[:-2] + (-1,))[..., :n], -1, axis)


def np_mx(x, fmt, *, S=1.0, ratio=1.0, axis=-1, block=32):
  """OCP MX v1.0 §6.3: X = 2^(⌊log2 max|V|⌋ − emax_elem), P_i = quantize(V_i / X) clamped."""
  elem, emax = MX[fmt]
  S = f32(S)
  yb, n = _blocks(np.asarray(x, f32) * recip(S), axis, block)
  amax = np.max(np.abs(yb), axis=-1, keepdims=True).astype(np.float64)
  with np.errstate(divide="ignore"):
    e = np.where(amax > 0, np.floor(np.log2(amax)) - emax, -127)
  e = np.clip(e, -127, 127)
  step = (f32(ratio) * (2.0 ** e).astype(f32)).astype(f32)
  with np.errstate(over="ignore", invalid="ignore"):  # 1/step overflows only for all-zero blocks
    q = np_element(np.where(yb == 0, f32(0), yb * recip(step)), elem)
  return _unblocks((q * step).astype(f32), n, axis) * S, e


def np_nvfp4(x, *, S=None, ratio=1.0, axis=-1, block=16):
  """NVFP4: S = amax/(6·448) per tensor, block scale E4M3(amax_b/6) of y = x/S, E2M1 elements."""
  x = np.asarray(x, f32)
  S = f32(max(np.max(np.abs(x)) * recip(6 * 448), np.finfo(f32).tiny)) if S is None else f32(S)
  yb, n = _blocks(x * recip(S), axis, block)
  amax = np.max(np.abs(yb), axis=-1, keepdims=True)
  s_b = np.minimum(amax * recip(6), f32(448)).astype(ml_dtypes.float8_e4m3fn).astype(f32)
  step = (f32(ratio) * s_b).astype(f32)
  with np.errstate(divide="ignore", invalid="ignore"):
    v = np.where(step > 0, yb * recip(step), 0).astype(f32)
  q = np_element(v, "fp4_e2m1")
  return _unblocks((q * step).astype(f32), n, axis) * S, s_b


def all_values(fmt):
  """Every finite value of a float format, enumerated through its ml_dtypes bit patterns."""
  dt = ML_DTYPES[fmt]
  v = np.arange(2 ** ml_dtypes.finfo(dt).bits, dtype=np.uint8).view(dt).astype(np.float64)
  return np.unique(v[np.isfinite(v)])


def hard_inputs(fmt, rng):
  """v = x/Δ: all values, exact ties (midpoints), ±1 ulp around them, zeros, saturation, random."""
  if fmt.startswith("int"):
    half = 2 ** (int(fmt[3:]) - 1)
    vals = np.arange(-half, half, dtype=np.float64)
    big = float(half)
  else:
    vals = all_values(fmt)
    big = LARGEST[fmt]
  mids = ((vals[1:] + vals[:-1]) / 2).astype(f32)
  assert np.all(mids.astype(np.float64) == (vals[1:] + vals[:-1]) / 2)  # ties are exact in float32
  sat = np.array([big * 1.01, big * 1.5, big * 3, 1e30, -big * 1.01, -big * 2, -1e30, np.inf, -np.inf], f32)
  rand = np.concatenate([rng.standard_normal(3000) * s for s in (0.01, 0.3, 1.0, big / 4)]).astype(f32)
  v = np.concatenate([vals.astype(f32), mids, np.nextafter(mids, f32(np.inf)), np.nextafter(mids, f32(-np.inf)),
                      np.array([0.0, -0.0], f32), sat, rand])
  return v.astype(f32)


SCALAR = INT_FORMATS + FLOAT_FORMATS
BLOCK = tuple(MX) + ("nvfp4",)


class ScalarFormatTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SCALAR)
  def test_equals_numpy_cast(self, fmt):
    rng = np.random.default_rng(0)
    v = hard_inputs(fmt, rng)
    step = f32(2.0 ** -3)  # a power of two: x/Δ is exactly v, ties stay ties
    x = v * step
    got = np.asarray(self.variant(lambda a: fake_quantize(a, fmt, step))(x))
    want = np_scalar(x, fmt, step)
    np.testing.assert_array_equal(got, want)
    # the values really cover the hard cases
    vals = np.abs(v[np.isfinite(v)])
    largest = F.spec(fmt).largest
    self.assertTrue(np.any(vals > largest) and np.any(vals == 0))
    if not fmt.startswith("int"):
      tiny = float(ml_dtypes.finfo(ML_DTYPES[fmt]).tiny)
      self.assertTrue(np.any(np.abs(got) / step == float(ml_dtypes.finfo(ML_DTYPES[fmt]).smallest_subnormal)))
      self.assertTrue(np.any((got != 0) & (np.abs(got) / step < tiny)))  # subnormal outputs occur
    self.assertEqual(float(np.max(got)), largest * step)  # saturation, no inf/NaN from finite or ±inf
    self.assertEqual(float(np.min(got)), (-largest - (1 if fmt.startswith("int") else 0)) * step)

  @chex.variants(with_jit=True)
  @parameterized.parameters(*SCALAR)
  def test_arbitrary_and_per_channel_steps(self, fmt):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 5)).astype(f32) * np.array([0.01, 0.1, 1, 3, 30], f32)
    per_channel = (np.max(np.abs(x), axis=0) / F.spec(fmt).largest * np.array([0.7, 1.0, 1.3, 0.37, 2.1])).astype(f32)
    for step in (f32(0.0371), per_channel):
      got = np.asarray(self.variant(lambda a, s: fake_quantize(a, fmt, s))(x, step))
      np.testing.assert_array_equal(got, np_scalar(x, fmt, step))
    # scale=None is max scaling (amax · (1/largest)) and ratio multiplies the step
    amax_step = np.max(np.abs(x)) * recip(F.spec(fmt).largest)
    np.testing.assert_array_equal(self.variant(lambda a: fake_quantize(a, fmt))(x), np_scalar(x, fmt, amax_step))
    got = self.variant(lambda a: fake_quantize(a, fmt, f32(0.02), 1.7))(x)
    np.testing.assert_array_equal(got, np_scalar(x, fmt, f32(0.02) * f32(1.7)))

  @parameterized.parameters(*SCALAR)
  def test_nan_and_dtype(self, fmt):
    x = jnp.array([jnp.nan, 1.0, -jnp.inf, 0.3], jnp.bfloat16)
    q = fake_quantize(x, fmt, 0.25)
    self.assertEqual(q.dtype, jnp.bfloat16)
    self.assertTrue(bool(jnp.isnan(q[0])))
    np.testing.assert_array_equal(np.asarray(q[1:], f32), np_scalar(np.asarray(x[1:], f32), fmt, 0.25).astype(
        jnp.bfloat16).astype(f32))

  def test_known_values(self):
    # hand-computed: RNE ties and saturation
    x = np.array([0.25, 0.75, 1.25, 2.5, 5.0, 7.0, -0.3, 100.0], f32)
    np.testing.assert_array_equal(fake_quantize(x, "fp4_e2m1", 1.0), [0, 1, 1, 2, 4, 6, -0.5, 6])
    np.testing.assert_array_equal(fake_quantize(x, "int4", 1.0), [0, 1, 1, 2, 5, 7, -0, 7])
    np.testing.assert_array_equal(fake_quantize(np.array([-9.0, -8.5, 7.5], f32), "int4", 1.0), [-8, -8, 7])
    np.testing.assert_array_equal(fake_quantize(np.array([464.0, 465.0, 1e6, 0.001], f32), "fp8_e4m3", 1.0),
                                  [448, 448, 448, 0.001953125])  # 464 is a tie: even mantissa 448
    # fp6 goes through a float8 proxy plus a fixed subnormal grid (XLA:CPU has no float6 convert)
    np.testing.assert_array_equal(fake_quantize(np.array([0.09375, 0.21875, 0.03125, 29.0], f32), "fp6_e3m2", 1.0),
                                  [0.125, 0.25, 0.0, 28.0])
    np.testing.assert_array_equal(fake_quantize(np.array([0.0625, 0.1875, 0.9375, 7.75], f32), "fp6_e2m3", 1.0),
                                  [0.0, 0.25, 1.0, 7.5])


# ------------------------------------------------------------------------------- block formats


class BlockFormatTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*MX)
  def test_mx_equals_spec_conversion(self, fmt):
    rng = np.random.default_rng(2)
    # blocks of very different magnitudes, exact ties (element midpoints × powers of two), zeros
    x = (rng.standard_normal((6, 96)) * 2.0 ** rng.integers(-20, 20, (6, 1))).astype(f32)
    x[0, :32] = 0.0
    elem = MX[fmt][0]
    if elem != "int8":
      vals = all_values(elem)
      mids = ((vals[1:] + vals[:-1]) / 2)[rng.integers(0, len(vals) - 1, 32)]
      x[1, 32:64] = mids * 2.0 ** -5  # the max of this block sets X; the rest are ties at that X
      x[1, 32] = LARGEST[elem] * 2.0 ** -5
    for ratio in (1.0, 0.5, 0.83, 1.37):
      got = np.asarray(self.variant(lambda a, r: fake_quantize(a, fmt, ratio=r))(x, f32(ratio)))
      want, e = np_mx(x, fmt, ratio=ratio)
      np.testing.assert_array_equal(got, want)
    # the stored E8M0 scales are the spec's 2^shared_exp
    _, e = np_mx(x, fmt)
    np.testing.assert_array_equal(np.asarray(F.block_scales(x, fmt), f32), (2.0 ** e[..., 0]).astype(f32))
    self.assertEqual(F.block_scales(x, fmt).dtype, jnp.float8_e8m0fnu)
    # a power-of-two ratio is the spec's encoding with every exponent shifted
    np.testing.assert_array_equal(fake_quantize(x, fmt, ratio=2.0), np_mx(x, fmt, ratio=2.0)[0])
    # a per-tensor scale is divided out before the block scales are derived
    got = np.asarray(self.variant(lambda a: fake_quantize(a, fmt, f32(0.3)))(x))
    np.testing.assert_array_equal(got, np_mx(x, fmt, S=0.3)[0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_nvfp4_equals_reference(self):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 80)) * np.exp(rng.uniform(-6, 3, (4, 80)))).astype(f32)
    x[2, 16:32] = 0.0
    x[3, :16] *= 1e-6  # a block far below the tensor's amax: its E4M3 scale underflows
    for ratio in (1.0, 0.6, 1.25):
      got = np.asarray(self.variant(lambda a, r: fake_quantize(a, "nvfp4", ratio=r))(x, f32(ratio)))
      want, s_b = np_nvfp4(x, ratio=ratio)
      np.testing.assert_array_equal(got, want)
    self.assertTrue(np.any(s_b == 0) and np.max(s_b) == 448)
    np.testing.assert_array_equal(np.asarray(F.block_scales(x, "nvfp4"), f32), s_b[..., 0])
    got = self.variant(lambda a: fake_quantize(a, "nvfp4", f32(0.01)))(x)
    np.testing.assert_array_equal(got, np_nvfp4(x, S=0.01)[0])

  def test_hand_computed_blocks(self):
    # MXFP4, amax 6: X = 2^(⌊log2 6⌋ − 2) = 1; ties to even: 5 → 4, 3.5 → 4, 0.75 → 1, 0.25 → 0
    b = np.zeros(32, f32)
    b[:8] = [6, 5, 3.5, 0.3, -2.6, 0.75, 0.25, -1.25]
    np.testing.assert_array_equal(fake_quantize(b, "mxfp4")[:8], [6, 4, 4, 0.5, -3, 1, 0, -1])
    # amax 7.9: X = 1 still, 7.9 saturates to 6 (the spec clamps); amax 8: X = 2
    b[0] = 7.9
    self.assertEqual(float(fake_quantize(b, "mxfp4")[0]), 6.0)
    b[0] = 8.0
    np.testing.assert_array_equal(fake_quantize(b, "mxfp4")[:3], [8, 4, 4])
    self.assertEqual(float(F.block_scales(b, "mxfp4")[0].astype(jnp.float32)), 2.0)
    # MXFP8 E4M3, amax 1000: X = 2^(9 − 8) = 2, 1000/2 = 500 > 448 saturates → 896;
    # 3.1/2 = 1.55 → 1.5 (steps of 1/8); −0.01 is subnormal: 5.12 · 2^-9 → 5 · 2^-9
    c = np.zeros(32, f32)
    c[:3] = [1000, 3.1, -0.02]
    np.testing.assert_array_equal(fake_quantize(c, "mxfp8_e4m3")[:3], [896, 3.0, -10 * 2.0**-9])
    # MXINT8, amax 3: X = 2; 3/2 = 1.5 = 96/64; −3.99 → clamp to −127/64
    d = np.zeros(32, f32)
    d[:4] = [3.0, 0.3, -3.99, 0.01]
    np.testing.assert_array_equal(fake_quantize(d, "mxint8")[:4], [3.0, 10 / 32, -127 / 32, 0.0])
    # NVFP4 with S = 1: amax 6 → s = 1; amax 9 → s = 1.5 (4/1.5 = 2.67 → 3 → 4.5);
    # amax 0.097 → s = E4M3(0.016167) = 2^-6 (1.035 → 1 in steps of 1/8), 0.097/2^-6 = 6.2
    # saturates → 0.09375; amax 0.1 → s = E4M3(0.016667) = 1.125 · 2^-6 (1.067 → 1.125)
    e = np.zeros(64, f32)
    e[:3] = [6, 5, 1.25]
    e[16:18] = [9, 4]
    e[32:34] = [0.097, -0.03]
    e[48] = 0.1
    got = np.asarray(fake_quantize(e, "nvfp4", 1.0))
    np.testing.assert_array_equal(got[[0, 1, 2, 16, 17, 32, 33, 48]],
                                  [6, 4, 1, 9, 4.5, 0.09375, -0.03125, 6 * 1.125 * 2.0**-6])
    np.testing.assert_array_equal(np.asarray(F.block_scales(e, "nvfp4", 1.0), f32), [1, 1.5, 2.0**-6, 1.125 * 2.0**-6])

  @parameterized.parameters("mxfp4", "mxint8", "nvfp4")
  def test_padding_and_axis(self, fmt):
    rng = np.random.default_rng(4)
    block = F.spec(fmt).block_size
    x = rng.standard_normal((3, 2 * block + 13)).astype(f32)
    s = 1.0 if fmt != "nvfp4" else 0.002
    q = np.asarray(fake_quantize(x, fmt, s))
    # the short last block is quantized as a block of its own (zero padding changes no amax)
    np.testing.assert_array_equal(q[:, 2 * block:], fake_quantize(x[:, 2 * block:], fmt, s))
    np.testing.assert_array_equal(q[:, :block], fake_quantize(x[:, :block], fmt, s))
    # blocks along another axis
    np.testing.assert_array_equal(fake_quantize(x.T, fmt, s, axis=0), q.T)
    np.testing.assert_array_equal(fake_quantize(x[None].transpose(2, 0, 1), fmt, s, axis=-3),
                                  q[None].transpose(2, 0, 1))
    self.assertEqual(F.block_scales(x, fmt, s).shape, (3, 3))
    # another block size
    np.testing.assert_array_equal(fake_quantize(x, fmt, s, block_size=8)[:, :8], fake_quantize(x[:, :8], fmt, s))

  def test_e8m0_clamp_and_zero_blocks(self):
    x = np.zeros(96, f32)
    x[:32] = 2.0**-115  # ⌊log2⌋ − emax = −130 for E5M2 elements: E8M0 clamps to 2^-127 (biased 0)
    x[64:] = 2.0**-100  # −115: no clamp
    bits = np.asarray(F.block_scales(x, "mxfp8_e5m2")).view(np.uint8)
    np.testing.assert_array_equal(bits, [0, 0, 127 - 115])  # the all-zero block also gets 2^-127
    q = np.asarray(fake_quantize(x, "mxfp8_e5m2"))
    np.testing.assert_array_equal(q[64:], x[64:])
    np.testing.assert_array_equal(q[32:64], 0.0)
    # the clamped block is exact where float32 subnormals survive, zero where XLA flushes them (documented)
    self.assertTrue(np.all(q[:32] == x[:32]) or np.all(q[:32] == 0))

  def test_nonfinite_blocks(self):
    x = np.ones(64, f32)
    x[3] = np.nan
    x[40] = np.inf
    for fmt in ("mxfp8_e4m3", "nvfp4"):
      q = np.asarray(fake_quantize(x, fmt, 1.0)).reshape(-1, F.spec(fmt).block_size)
      self.assertEqual(np.any(np.isnan(q), axis=1).tolist(), [i in (0, 40 // len(q[0])) for i in range(len(q))])
      self.assertTrue(np.all(np.isnan(q[0])) and np.all(np.isnan(q[40 // len(q[0])])))
    x[40] = 1.0
    q = np.asarray(fake_quantize(x, "mxfp4"))
    self.assertTrue(np.all(np.isnan(q[:32])) and np.all(q[32:] == 1.0))


# ------------------------------------------------------------------------ gradients, jit, vmap


def _inside(x, fmt, step_fn):
  """1 where x/step is within ±largest."""
  return (np.abs(x * recip(step_fn)) <= F.spec(fmt).largest).astype(f32)


class GradientTest(chex.TestCase):

  @chex.variants(without_jit=True)
  @parameterized.parameters(*SCALAR)
  def test_straight_through_scalar(self, fmt):
    x = np.linspace(-3, 3, 301).astype(f32)
    step = f32(2.0 / F.spec(fmt).largest)  # |x| > 2 clips
    w = np.random.default_rng(5).standard_normal(301).astype(f32)
    g = self.variant(jax.grad(lambda a: jnp.sum(fake_quantize(a, fmt, step) * w)))(x)
    inside = _inside(x, fmt, step)
    if fmt.startswith("int"):  # the signed grid reaches one step further on the negative side
      inside = ((x * recip(step) >= -F.spec(fmt).largest - 1) & (x * recip(step) <= F.spec(fmt).largest)).astype(f32)
    self.assertTrue(0 < inside.sum() < 301)
    np.testing.assert_allclose(g, w * inside, rtol=1e-6, atol=1e-7)

  @parameterized.parameters("int4", "fp8_e4m3", "fp4_e2m1")
  def test_scale_gets_lsq_gradient(self, fmt):
    x = np.linspace(-1.5, 3, 301).astype(f32)
    w = np.random.default_rng(9).uniform(0, 1, 301).astype(f32)
    step = f32(2.0 / F.spec(fmt).largest)
    g = jax.grad(lambda s: jnp.sum(fake_quantize(x, fmt, s) * w))(step)
    q = np_scalar(x, fmt, step) / step
    v = x * recip(step)
    inside = (v >= -F.spec(fmt).largest - fmt.startswith("int")) & (v <= F.spec(fmt).largest)
    want_in = np.sum(w * np.where(inside, q - v, 0))  # LSQ: round(v) − v inside
    want_out = np.sum(w * np.where(inside, 0, q))  # the clip level outside
    np.testing.assert_allclose(g, want_in + want_out, rtol=1e-4)
    g_in = jax.grad(lambda s: jnp.sum(fake_quantize(x, fmt, s) * w * inside))(step)
    np.testing.assert_allclose(g_in, want_in, rtol=2e-3, atol=1e-3)
    self.assertGreater(abs(want_in), 0.05)

  @parameterized.parameters(*BLOCK)
  def test_straight_through_block(self, fmt):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 64)).astype(f32)
    w = rng.standard_normal((2, 64)).astype(f32)
    ratio = 0.5  # half-size steps: the larger elements of every block saturate
    g = np.asarray(jax.grad(lambda a: jnp.sum(fake_quantize(a, fmt, ratio=ratio) * w))(x))
    if fmt == "nvfp4":
      _, s_b = np_nvfp4(x)
      S = np.max(np.abs(x)) * recip(6 * 448)
    else:
      _, e = np_mx(x, fmt)
      s_b, S = (2.0 ** e).astype(f32), f32(1)
    yb, _ = _blocks(x * recip(S), -1, F.spec(fmt).block_size)
    inside = _unblocks((np.abs(yb * recip(f32(ratio) * s_b)) <= F.spec(fmt).largest).astype(f32), 64, -1)
    self.assertTrue(0.05 < inside.mean() < 0.95)
    np.testing.assert_allclose(g, w * inside, rtol=1e-5, atol=1e-6)


class ByIndexTest(chex.TestCase):

  def test_vmap_over_index_scale_and_ratio_equals_by_name(self):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 48)).astype(f32)
    n = len(F.FORMATS)
    scales = F.max_scales(x)
    self.assertEqual(scales.shape, (n,))
    ratios = jnp.asarray(rng.uniform(0.6, 1.4, n), jnp.float32)
    fn = jax.jit(jax.vmap(lambda i, s, r: fake_quantize_by_index(x, i, s, r)))
    got = fn(jnp.arange(n, dtype=jnp.int32), scales, ratios)
    for i, fmt in enumerate(F.FORMATS):
      np.testing.assert_array_equal(got[i], fake_quantize(x, fmt, ratio=ratios[i]), err_msg=fmt)
      np.testing.assert_array_equal(fake_quantize_by_index(x, i, None, ratios[i]),
                                    fake_quantize(x, fmt, ratio=ratios[i]), err_msg=fmt)
    # lax.map (one point at a time: only the chosen branch runs), with per-channel scales
    fs = ("int4", "fp8_e4m3", "mxfp4", "nvfp4", "fp6_e2m3")
    per_channel = F.max_scales(x, fs, channel_axis=0)
    self.assertEqual(per_channel.shape, (len(fs), 8, 1))
    idx = jnp.array([4, 0, 2, 3, 1, 0], jnp.int32)
    got = jax.jit(lambda idx: jax.lax.map(
        lambda i: fake_quantize_by_index(x, i, per_channel[i], 1.1, formats=fs), idx))(idx)
    for k, i in enumerate(np.asarray(idx)):
      np.testing.assert_array_equal(got[k], fake_quantize(x, fs[i], per_channel[i], 1.1), err_msg=fs[i])

  def test_gradient_equals_by_name(self):
    x = np.random.default_rng(8).standard_normal(64).astype(f32)
    loss = lambda a, i: jnp.sum(fake_quantize_by_index(a, i, ratio=0.7) ** 2)  # noqa: E731
    by_index = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(x, jnp.arange(len(F.FORMATS)))
    by_name = jax.jit(lambda a: [jax.grad(lambda b: jnp.sum(fake_quantize(b, f, ratio=0.7) ** 2))(a)
                                 for f in F.FORMATS])(x)
    for i, fmt in enumerate(F.FORMATS):
      np.testing.assert_array_equal(by_index[i], by_name[i], err_msg=fmt)
      self.assertGreater(float(jnp.sum(jnp.abs(by_index[i]))), 0.0)

  # The by-index path rounds with arithmetic (no dtype casts, no per-format branch): it must give the by-name
  # path's values and x-gradients bit for bit, on every hard input and for every tuple of formats it serves.

  @parameterized.parameters(*SCALAR)
  def test_scalar_arithmetic_rounding_is_bit_exact(self, fmt):
    rng = np.random.default_rng(10)
    v = np.concatenate([hard_inputs(fmt, rng), [np.nan, -np.nan, 1e-40, -1e-40, 2.0 ** -149]]).astype(f32)
    w = rng.standard_normal(v.shape).astype(f32)
    for formats in (F.FORMATS, F.SCALAR_FORMATS, (fmt,)):
      for step, ratio in ((f32(2.0 ** -3), f32(1.0)), (f32(0.0371), f32(0.77)), (f32(3e-3), f32(1.3))):
        x = v * step  # power-of-two steps keep the ties of hard_inputs exact
        got = _by_index_and_grads(x, [formats.index(fmt)], step, ratio, w, formats)
        want = _by_name_and_grads(x, fmt, step, ratio, w)
        _assert_same_results(got, 0, want, (fmt, formats, step), x, step, ratio, w)

  @pytest.mark.slow  # ~1 min of compiles: one per block shape and format tuple
  def test_block_arithmetic_is_bit_exact(self):
    rng = np.random.default_rng(11)
    mx = F.formats_of_kinds(("mx",))
    for shape, axis, scale_kind, ratio_kind in (
        ((13, 96), -1, "1", "1"), ((13, 96), -1, "0.3", "0.83"), ((13, 96), -1, "row", "element"),
        ((13, 96), -1, "varying", "0.83"), ((13, 96), 0, "row", "0.83"), ((13, 24), -1, "0.3", "1"),
        ((13, 16), -1, "1", "0.83"), ((13, 70), 1, "varying", "element")):
      x = _block_inputs(rng, shape)
      x = x.T if axis == 0 else x
      w = rng.standard_normal(x.shape).astype(f32)
      a = axis % x.ndim
      scale = {"1": f32(1.0), "0.3": f32(0.3),  # per row (constant along the blocks) or varying along them
               "row": rng.uniform(0.5, 2.0, [1 if d == a else n for d, n in enumerate(x.shape)]).astype(f32),
               "varying": rng.uniform(0.5, 2.0, [n if d == a else 1 for d, n in enumerate(x.shape)]).astype(f32)
               }[scale_kind]
      ratio = {"1": f32(1.0), "0.83": f32(0.83), "element": rng.uniform(0.5, 1.5, x.shape).astype(f32)}[ratio_kind]
      want = {f: _by_name_and_grads(x, f, scale, ratio, w, axis=axis) for f in BLOCK}
      for formats in (F.FORMATS, mx, ("nvfp4",)):  # every kind (selected by jnp.where), one kind
        fs = [f for f in BLOCK if f in formats]
        got = _by_index_and_grads(x, [formats.index(f) for f in fs], scale, ratio, w, formats, axis=axis)
        for k, f in enumerate(fs):
          _assert_same_results(got, k, want[f], (f, shape, axis, scale_kind, ratio_kind, len(formats)), x, scale,
                               ratio, w)
    # scale=None: each format's max scaling, chosen by the traced index
    x = rng.standard_normal((4, 64)).astype(f32)
    fn = jax.jit(lambda a, i: fake_quantize_by_index(a, i, None, 0.9))
    for fmt in F.FORMATS:
      _assert_same_bits(fn(x, F.FORMATS.index(fmt)), fake_quantize(x, fmt, None, 0.9), fmt)

  def test_kinds(self):
    self.assertEqual(F.KINDS, ("scalar", "mx", "nvfp4"))
    self.assertEqual(F.formats_of_kinds(("scalar",)), F.SCALAR_FORMATS)
    self.assertEqual(F.formats_of_kinds(("nvfp4", "mx")), F.BLOCK_FORMATS)
    self.assertEqual([F.kind(f) for f in ("int4", "fp4_e2m1", "mxint8", "nvfp4")], ["scalar", "scalar", "mx", "nvfp4"])
    # an out-of-range traced index is clamped
    x = np.linspace(-2, 2, 64).astype(f32)
    got = jax.jit(lambda i: fake_quantize_by_index(x, i, 0.1, formats=("int4", "mxfp4")))(jnp.int32(7))
    np.testing.assert_array_equal(got, fake_quantize(x, "mxfp4", 0.1))

  def test_helpers(self):
    fs = ("int2", "int8", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "mxint8", "mxfp4", "nvfp4")
    np.testing.assert_array_equal(F.largest_values(fs), [1, 127, 448, 57344, 28, 7.5, 6, 127 / 64, 6, 6])
    x = np.array([[0.5, -2.0], [1.0, 0.25]], f32)
    np.testing.assert_allclose(F.max_scales(x, fs), [2, 2 / 127, 2 / 448, 2 / 57344, 2 / 28, 2 / 7.5, 2 / 6, 1, 1,
                                                     2 / 2688], rtol=1e-7)
    np.testing.assert_allclose(F.max_scale(x, "int8", channel_axis=-1), [[1 / 127, 2 / 127]], rtol=1e-7)
    self.assertEqual(F.FORMATS, SCALAR + BLOCK)


def _block_inputs(rng, shape):
  """x for the block formats: rows of zeros, of exact element ties for each element format (the block
  maximum, at the start of every 16 elements, sets the scale 2^−5: MX for every element, NVFP4 for E2M1), of
  E8M0 clamps and a float32 subnormal, a NaN, an inf, and random rows of very different magnitudes."""
  x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-25, 25, (shape[0], 1))).astype(f32)
  x[0] = 0.0
  for r, elem in enumerate(("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"), start=1):
    vals = all_values(elem)
    x[r] = ((vals[1:] + vals[:-1]) / 2)[rng.integers(0, len(vals) - 1, shape[1])] * 2.0 ** -5
    x[r, ::16] = LARGEST[elem] * 2.0 ** -5
  x[6] = (2 * rng.integers(-127, 127, shape[1]) + 1) / 128 * 2.0 ** -5  # MXINT8 ties (steps of 2^−6 · 2^−5)
  x[6, ::16] = LARGEST["int8"] * 2.0 ** -5
  x[7] = 2.0 ** -115  # E8M0 clamps for E5M2 elements (steps below float32's normal range)
  x[7, 1] = 1e-40  # a float32 subnormal
  x[8, 3] = np.nan
  x[9, -1] = -np.inf
  return x


def _assert_same_bits(a, b, msg, zero_sign=True):
  """Equal bit patterns (so −0 ≠ +0, unless not `zero_sign`); any NaN equals any NaN."""
  a, b = np.asarray(a, f32), np.asarray(b, f32)
  same = (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))
  if not zero_sign:
    same |= (a == 0) & (b == 0)
  assert same.all(), (msg, int((~same).sum()), a[~same][:4], b[~same][:4])


def _assert_same_results(got, k, want, msg, x, scale, ratio, w):
  """Values and x's gradient bit for bit (the gradient's zeros of either sign); scale's and ratio's gradients to
  float32 rounding of their terms.

  `got` holds stacked results (the k-th is compared). The LSQ gradients of scale and ratio are differences
  of nearly equal terms (round(v) − v, each of size about |x · w| / param) summed where the parameter
  broadcasts, and XLA may contract a product and a sum into one FMA in one program and not in the other: the
  tolerance is 1e-5 of the summed term sizes.
  """
  (q, grads), (q_want, grads_want) = jax.tree.map(lambda a: np.asarray(a)[k], got), want
  _assert_same_bits(q, q_want, msg)
  _assert_same_bits(grads[0], grads_want[0], (msg, "grad x"), zero_sign=False)  # a dropped kind adds +0
  terms = np.nan_to_num(np.abs(np.asarray(x, np.float64) * w), nan=0.0, posinf=0.0)
  for a, b, p, name in zip(grads[1:], grads_want[1:], (scale, ratio), ("scale", "ratio")):
    a, b, p = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(p, np.float64)
    size = terms / p  # x-shaped
    size = size.sum(axis=tuple(range(size.ndim - p.ndim)))  # summed where p broadcasts
    size = size.sum(axis=tuple(d for d in range(p.ndim) if p.shape[d] == 1), keepdims=True)
    ok = (a == b) | (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= 1e-5 * size)
    assert ok.all(), (msg, name, a[~ok][:4], b[~ok][:4])


def _loss_grads(q_fn, x, scale, ratio, w):
  """q and the gradients of sum(q · w) with respect to x, scale and ratio."""
  loss = lambda a, s, r: jnp.sum(q_fn(a, s, r) * w)  # noqa: E731
  return q_fn(x, scale, ratio), jax.grad(loss, argnums=(0, 1, 2))(x, scale, ratio)


@functools.lru_cache(maxsize=None)
def _grads_fn(fmt_or_formats, axis):
  """A jitted (q, grads) function: by name for one format, or by index for a tuple of formats, mapped (lax.map,
  one traced index at a time, as in the sweep) over an array of indices."""
  if isinstance(fmt_or_formats, str):
    return jax.jit(lambda *a: _loss_grads(lambda x, s, r: fake_quantize(x, fmt_or_formats, s, r, axis=axis), *a))
  q_fn = lambda i: lambda x, s, r: fake_quantize_by_index(x, i, s, r, formats=fmt_or_formats, axis=axis)  # noqa: E731
  return jax.jit(lambda idx, *a: jax.lax.map(lambda i: _loss_grads(q_fn(i), *a), idx))


def _by_name_and_grads(x, fmt, scale, ratio, w, axis=-1):
  return _grads_fn(fmt, axis)(x, scale, ratio, w)


def _by_index_and_grads(x, indices, scale, ratio, w, formats, axis=-1):
  return _grads_fn(tuple(formats), axis)(jnp.asarray(indices, jnp.int32), x, scale, ratio, w)


class ErrorTest(parameterized.TestCase):

  @parameterized.parameters(
      (lambda: fake_quantize(np.ones(4), "fp8"), "unknown format 'fp8'; choose one of 'int2'"),
      (lambda: fake_quantize(np.ones(4), "fp8_e4m3", block_size=32), "`block_size` applies only to the block"),
      (lambda: fake_quantize(np.ones((4, 4)), "mxfp4", axis=2), "block `axis` 2 is out of range for a 2-d"),
      (lambda: fake_quantize(np.ones(4), "mxfp4", block_size=0), "positive integer"),
      (lambda: fake_quantize(np.ones(4), "int4", -1.0), "`scale` must be finite and > 0"),
      (lambda: fake_quantize(np.ones(4), "int4", 1.0, 0.0), "`ratio` must be finite and > 0"),
      (lambda: fake_quantize(np.ones((4, 3)), "int4", np.ones(4)), "does not broadcast to x's shape (4, 3)"),
      (lambda: fake_quantize(np.ones(4, np.int32), "int4"), "must be a float array"),
      (lambda: fake_quantize(np.ones(0), "int4"), "is empty"),
      (lambda: fake_quantize_by_index(np.ones(4), 19), "`index` must be one integer in 0…18"),
      (lambda: fake_quantize_by_index(np.ones(4), 0, formats=("int4", "mx")), "unknown format 'mx'"),
      (lambda: F.block_scales(np.ones(4), "int4"), "unknown format 'int4'; choose one of 'mxfp8_e4m3'"),
  )
  def test_one_line_errors(self, call, message):
    with pytest.raises(ValueError) as err:
      call()
    self.assertIn(message, str(err.value))
    self.assertNotIn("\n", str(err.value))

  def test_scalar_formats_ignore_axis(self):
    np.testing.assert_array_equal(fake_quantize(np.float32(0.3), "int4", 0.25), 0.25)  # 0-d, default axis


def test_format_table_matches_ml_dtypes():
  for fmt, dt in ML_DTYPES.items():
    fi = ml_dtypes.finfo(dt)
    assert F.spec(fmt).largest == float(fi.max) and F.spec(fmt).bits == fi.bits
  for fmt, (elem, emax) in MX.items():
    assert F.spec(fmt).emax == emax and F.spec(fmt).block_size == 32 and math.isclose(F.spec(fmt).largest,
                                                                                       LARGEST[elem])
  assert F.spec("nvfp4").block_size == 16
