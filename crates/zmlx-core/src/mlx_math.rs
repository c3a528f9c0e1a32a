//! Transcendental functions exactly as MLX's CPU backend computes them.
//!
//! MLX does not call libm for `exp`, `sin` and `cos` on the CPU: it uses
//! Cephes-style polynomials (`mlx/backend/cpu/simd/math.h`). Softmax, RoPE's
//! tables and SiLU all go through them, so a token-identical reference must
//! too. Written from MLX's description of the algorithm; tested against
//! `mlx.core` on fresh random inputs (tests/oracle).

use crate::DType;

/// MLX `simd::exp` on f32: 2^(x·log2 e) split into integer and fractional parts.
///
/// `floor(x + 0.5)` is evaluated in double in MLX (`0.5` is a double literal
/// and `Simd<float,1> + double` is a double), so it is here too. (An exhaustive
/// sweep of every f32 in [-89, 89] finds no input where the f32 sum would
/// differ, but the double form is literal and costs the same.)
#[inline]
pub fn exp(x_init: f32) -> f32 {
    let x = x_init * 1.442695_f32;
    let ipart = ((x as f64) + 0.5).floor() as f32;
    let fpart = x - ipart;
    let mut p = 1.535336188319500e-4_f32;
    p = p.mul_add(fpart, 1.339887440266574e-3_f32);
    p = p.mul_add(fpart, 9.618437357674640e-3_f32);
    p = p.mul_add(fpart, 5.550332471162809e-2_f32);
    p = p.mul_add(fpart, 2.402264791363012e-1_f32);
    p = p.mul_add(fpart, 6.931472028550421e-1_f32);
    p = p.mul_add(fpart, 1.000000000000000_f32);
    // 2^ipart built from the exponent bits.
    let epart = ((ipart as i32).wrapping_add(127)).wrapping_shl(23);
    let mut result = if x_init.is_nan() { x_init } else { f32::from_bits(epart as u32) * p };
    if x_init > 88.0 {
        result = f32::INFINITY;
    }
    if x_init < -88.0 {
        result = 0.0;
    }
    result
}

/// MLX `simd::sin` on f32.
#[inline]
pub fn sin(x: f32) -> f32 {
    if x.abs() > 8_388_608.0 {
        return x.sin();
    }
    sincos::<true>(x)
}

/// MLX `simd::cos` on f32.
#[inline]
pub fn cos(x: f32) -> f32 {
    if x.abs() > 8_388_608.0 {
        return x.cos();
    }
    sincos::<false>(x)
}

fn sincos<const SINE: bool>(input: f32) -> f32 {
    let mut sign_sin = input < 0.0;
    let x = input.abs();
    let y = x * 1.27323954473516_f32;
    let mut emm2 = y as u32;
    emm2 = emm2.wrapping_add(1) & !1u32;
    let y = emm2 as f32;
    let poly_mask = (emm2 & 2) != 0;
    let mut x = y.mul_add(-0.78515625_f32, x);
    x = y.mul_add(-2.4187564849853515625e-4_f32, x);
    x = y.mul_add(-3.77489497744594108e-8_f32, x);
    sign_sin ^= (emm2 & 4) != 0;
    let sign_cos = (emm2.wrapping_sub(2) & 4) != 0;
    let z = x * x;
    let mut y1 = z.mul_add(2.443315711809948e-5_f32, -1.388731625493765e-3_f32);
    let mut y2 = z.mul_add(-1.9515295891e-4_f32, 8.3321608736e-3_f32);
    y1 = y1.mul_add(z, 4.166664568298827e-2_f32);
    y2 = y2.mul_add(z, -1.6666654611e-1_f32);
    y1 *= z;
    y2 *= z;
    y1 *= z;
    y2 = x.mul_add(y2, x);
    y1 = z.mul_add(-0.5_f32, y1);
    y1 += 1.0;
    if SINE {
        let ys = if poly_mask { y1 } else { y2 };
        if sign_sin { -ys } else { ys }
    } else {
        let yc = if poly_mask { y2 } else { y1 };
        if sign_cos { yc } else { -yc }
    }
}

/// MLX `Sigmoid` for an array of `dtype`: `exp` rounds to the dtype, the rest is f32.
#[inline]
pub fn sigmoid(dtype: DType, x: f32) -> f32 {
    let e = dtype.round(exp(x.abs()));
    let y = 1.0_f32 / (1.0_f32 + e);
    dtype.round(if x < 0.0 { y } else { 1.0 - y })
}

/// `nn.silu`: `x * sigmoid(x)`, each op rounded to the dtype.
#[inline]
pub fn silu(dtype: DType, x: f32) -> f32 {
    dtype.round(x * sigmoid(dtype, x))
}

/// mlx-lm's `swiglu(gate, x) = silu(gate) * x`, each op rounded to the dtype.
#[inline]
pub fn swiglu(dtype: DType, gate: f32, up: f32) -> f32 {
    dtype.round(silu(dtype, gate) * up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm() {
        // The polynomial is accurate to a few ulp; catches a mistyped constant.
        let mut x = -87.0_f32;
        while x < 87.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 1e-5, "exp({x}) off by {rel}");
            x += 0.0137;
        }
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn sincos_is_close_to_libm() {
        let mut x = -300.0_f32;
        while x < 300.0 {
            assert!((sin(x) as f64 - (x as f64).sin()).abs() < 2e-6, "sin({x})");
            assert!((cos(x) as f64 - (x as f64).cos()).abs() < 2e-6, "cos({x})");
            x += 0.0173;
        }
    }
}
