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

/// The element types the products take.
pub trait Real: candle_core::WithDType + sealed::Sealed {}
impl Real for f32 {}
impl Real for f64 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A matrix read from a slice with a row stride `rs` and a column stride `cs`: element
/// `(i, j)` is `data[i * rs + j * cs]`. [`Mat::rows`] is a row-major matrix, [`Mat::t`] the
/// transpose of one.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a, T> {
    /// The values.
    pub data: &'a [T],
    /// Distance between rows.
    pub rs: usize,
    /// Distance between columns.
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix whose rows lie `ld` values apart.
    pub fn rows(data: &'a [T], ld: usize) -> Self {
        Mat {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of the row-major matrix whose rows lie `ld` values apart.
    pub fn t(data: &'a [T], ld: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: ld,
        }
    }

    /// Panics unless `rows x cols` elements lie within the slice.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "{what} matrix of {} values < {rows} x {cols} at strides ({}, {})",
                self.data.len(),
                self.rs,
                self.cs
            );
        }
    }
}

/// `c = a b` (or `c += a b` with `accumulate`): `a` is `[m, k]`, `b` is `[k, n]`, both read
/// through their strides, `c` is `[m, n]` row-major and contiguous. Runs on rayon's threads
/// when there are more than one (`gemm` keeps small products on one). The result does not
/// depend on the number of threads (`gemm` splits rows and columns, never the sum).
///
/// # Panics
/// When a slice is shorter than its shape and strides say.
pub fn gemm<T: Real>(
    c: &mut [T],
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    dims: (usize, usize, usize),
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    gemm_with(c, a, b, dims, accumulate, parallelism);
}

/// [`gemm`] on the calling thread only (for code that already runs on several threads).
pub fn gemm_serial<T: Real>(
    c: &mut [T],
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    dims: (usize, usize, usize),
    accumulate: bool,
) {
    gemm_with(c, a, b, dims, accumulate, Parallelism::None);
}

fn gemm_with<T: Real>(
    c: &mut [T],
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert!(c.len() >= m * n, "destination of {} < {m} x {n}", c.len());
    a.check(m, k, "left");
    b.check(k, n, "right");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::zero());
        }
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("stride fits isize");
    // SAFETY: checked above: `c` holds the `m * n` values written at `i * n + j`; `a` holds
    // every `(i, l)` at `i * rs + l * cs` for `i < m`, `l < k` (the last one is in bounds and
    // the strides are non-negative), `b` likewise for `l < k`, `j < n`; `c` is borrowed
    // mutably, so it aliases neither input. `T` is `f32` or `f64`, which `gemm` supports.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            stride(n),
            accumulate,
            a.data.as_ptr(),
            stride(a.cs),
            stride(a.rs),
            b.data.as_ptr(),
            stride(b.cs),
            stride(b.rs),
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `c = a b` (or `c += a b` with `accumulate`), row-major: `a` is `[m, k]` with a row stride
/// of `lda` (`lda >= k`), `b` is `[k, n]` and `c` is `[m, n]`, both contiguous.
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
    if m > 0 {
        assert!(
            a.len() >= (m - 1) * lda + k,
            "left matrix of {} < {m} rows of stride {lda} and width {k}",
            a.len()
        );
    }
    gemm(c, Mat::rows(a, lda), Mat::rows(b, n), (m, n, k), accumulate);
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

    /// Every combination of row-major and transposed operands, small (gemm's small-matrix
    /// path) and large, float32 and float64.
    #[test]
    fn strided_operands_match_a_loop() {
        fn check<T: Real>(tol: f64) {
            for &(m, n, k) in &[
                (3, 4, 5),
                (1, 7, 3),
                (37, 19, 23),
                (130, 64, 70),
                (200, 256, 64),
            ] {
                let a: Vec<T> = (0..m * k)
                    .map(|i| T::from_f64(((i * 7 % 13) as f64 - 6.0) / 8.0))
                    .collect();
                let b: Vec<T> = (0..k * n)
                    .map(|i| T::from_f64(((i * 5 % 11) as f64 - 5.0) / 4.0))
                    .collect();
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    // `a` holds [m, k] row-major, or its transpose [k, m] when `ta`.
                    let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
                    let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
                    let am = if ta {
                        Mat::t(&a[..], m)
                    } else {
                        Mat::rows(&a[..], k)
                    };
                    let bm = if tb {
                        Mat::t(&b[..], k)
                    } else {
                        Mat::rows(&b[..], n)
                    };
                    let mut c = vec![T::from_f64(3.0); m * n];
                    gemm(&mut c, am, bm, (m, n, k), false);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 =
                                (0..k).map(|l| at(i, l).to_f64() * bt(l, j).to_f64()).sum();
                            let got = c[i * n + j].to_f64();
                            assert!(
                                (got - want).abs() <= tol * (1.0 + want.abs()),
                                "{m}x{n}x{k} ta {ta} tb {tb} ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        check::<f64>(1e-12);
        check::<f32>(1e-4);
    }

    #[test]
    #[should_panic(expected = "left matrix")]
    fn a_short_input_is_refused() {
        let mut c = vec![0f32; 4];
        matmul(&mut c, &[1.0; 3], 2, &[1.0; 4], (2, 2, 2), false);
    }
}
