//! Choosing the device: CPU everywhere, CUDA only in builds with the `cuda` feature and on
//! machines with a GPU. Asking for CUDA otherwise is an error, never a quiet fallback to CPU.

use candle_core::Device;

use crate::error::{Error, Result};

/// `cpu` or `cuda` (`cuda:N` for GPU N).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal: usize = n
                .strip_prefix("cuda:")
                .map(|o| {
                    o.parse()
                        .map_err(|_| Error::Device(format!("bad GPU ordinal in {n:?}")))
                })
                .transpose()?
                .unwrap_or(0);
            cuda(ordinal)
        }
        other => Err(Error::Device(format!(
            "unknown device {other:?}; use cpu or cuda[:N]"
        ))),
    }
}

/// `1`: float32 matrix products (and so convolutions) in TF32 on a CUDA device's tensor
/// cores (README, "Running on a GPU"). Off by default, as in PyTorch's matmuls.
pub const CUDA_TF32_ENV: &str = "VDG_CUDA_TF32";

/// Whether `VDG_CUDA_TF32` asks for TF32 products.
pub fn tf32_from_env() -> bool {
    std::env::var(CUDA_TF32_ENV).is_ok_and(|v| v == "1" || v == "true")
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    let device = open_cuda(ordinal)?;
    // Process-wide in candle; set from the environment every time a device is opened.
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32_from_env());
    Ok(device)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        // The first line only: candle appends a backtrace when RUST_BACKTRACE is set.
        let e = e.to_string();
        let e = e.lines().next().unwrap_or_default();
        let hint = if e.contains("STUB_LIBRARY") {
            "this process loaded the link-time driver stub, not an NVIDIA driver \
             (unset LD_LIBRARY_PATH on a GPU machine)"
        } else {
            "check that `nvidia-smi` lists the GPU and that the driver supports CUDA 13.0 \
             (driver 580 or newer)"
        };
        Error::Device(format!(
            "CUDA device {ordinal} is not available: {e}; {hint}"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    Err(Error::Device(
        "this vdg was built without CUDA support; build the CUDA one with `scripts/setup --cuda` \
         (README, \"Running on a GPU\"), or use --device cpu"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_works_and_cuda_never_falls_back() {
        assert!(device("cpu").unwrap().is_cpu());
        assert!(device("tpu").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(
            device("cuda")
                .unwrap_err()
                .to_string()
                .contains("without CUDA")
        );
    }
}
