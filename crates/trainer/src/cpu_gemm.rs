//! A safe single-precision matrix product on the CPU, straight through the `gemm` crate (the
//! kernels candle's CPU products use), for code that works on plain slices
//! ([`crate::infer`]): the product can accumulate into its destination and read the left
//! matrix with a row stride, which candle's `matmul` cannot (it allocates a zeroed output for
//! every product).
//!
//! The only unsafe code of the trainer: `gemm::gemm` takes raw pointers; the bounds it reads
//! and writes are checked here before the call.
#![allow(unsafe_code)]

use ::gemm::Parallelism;

/// `c = a b` (or `c += a b` with `accumulate`), row-major: `a` is `[m, k]` with a row stride
/// of `lda` (`lda >= k`), `b` is `[k, n]` and `c` is `[m, n]`, both contiguous. Runs on
/// rayon's threads when there are more than one.
///
/// # Panics
/// When a slice is shorter than its shape says or `lda < k`.
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    lda: usize,
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(lda >= k, "row stride {lda} < k = {k}");
    assert!(c.len() >= m * n, "destination of {} < {m} x {n}", c.len());
    assert!(b.len() >= k * n, "right matrix of {} < {k} x {n}", b.len());
    if m > 0 {
        assert!(
            a.len() >= (m - 1) * lda + k,
            "left matrix of {} < {m} rows of stride {lda} and width {k}",
            a.len()
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: checked above: `c` holds `m * n` values written at `i * n + j`, `a` holds the
    // `m` rows of `k` values at `i * lda + l`, `b` the `k * n` values at `l * n + j`, all
    // in bounds; `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], lda: usize, b: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * lda + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_with_a_row_stride_and_accumulation_match_a_loop() {
        for &(m, n, k, lda) in &[
            (1, 1, 1, 1),
            (37, 19, 23, 30),
            (130, 64, 70, 70),
            (5, 3, 0, 2),
        ] {
            let a: Vec<f32> = (0..m * lda)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
                .collect();
            let want = naive(&a, lda, &b, (m, n, k));
            let mut c = vec![9f32; m * n];
            matmul(&mut c, &a, lda, &b, (m, n, k), false);
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{m}x{n}x{k}: {x} vs {y}"
                );
            }
            matmul(&mut c, &a, lda, &b, (m, n, k), true);
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (x - 2.0 * y).abs() <= 2e-4 * (1.0 + y.abs()),
                    "accumulated: {x}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "left matrix")]
    fn a_short_input_is_refused() {
        let mut c = vec![0f32; 4];
        matmul(&mut c, &[1.0; 3], 2, &[1.0; 4], (2, 2, 2), false);
    }
}
