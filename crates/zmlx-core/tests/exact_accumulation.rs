//! `set_exact_accumulation` flips a process-wide switch, so its test lives in its own
//! test binary (process) and cannot race the other quantization tests.

use zmlx_core::quant::{set_exact_accumulation, QuantSpec, QuantizedMatrix};
use zmlx_core::DType;

#[test]
fn exact_accumulation_is_the_f64_dot_rounded_once() {
    let (rows, cols) = (16, 256);
    let mut st = 12345u64;
    let mut rnd = || {
        st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((st >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let w: Vec<f32> = (0..rows * cols).map(|_| DType::BF16.round(rnd())).collect();
    let x: Vec<f32> = (0..cols).map(|_| DType::BF16.round(rnd() * 4.0)).collect();
    let m = QuantizedMatrix::quantize(&w, rows, cols, QuantSpec::new(4, 64).unwrap(), DType::BF16).unwrap();
    let mlx = m.matmul_t(&x, 1);
    set_exact_accumulation(true);
    let exact = m.matmul_t(&x, 1);
    let mut buf = vec![0f32; cols];
    let exact_row3 = m.dot_row(3, &x, &mut buf);
    set_exact_accumulation(false);
    assert_eq!(exact[3], exact_row3);
    for r in 0..rows {
        let codes = m.unpack_row(r);
        let want: f64 = (0..cols).map(|i| x[i] as f64 * (m.scales[r * 4 + i / 64] as f64 * codes[i] as f64 + m.biases[r * 4 + i / 64] as f64)).sum();
        assert_eq!(exact[r], DType::BF16.round(want as f32), "row {r}");
}
    // bf16 accumulation (MLX's CPU) differs from the exact sum on random data.
    assert!(mlx.iter().zip(&exact).any(|(a, b)| a != b));
}
