//! A member's checkpoints: one atomic commit per epoch.
//!
//! Everything an epoch leaves behind (weights, optimizer state, the best weights so far and
//! the JSON state with the RNG positions and history) is written into `.ckpt-NNNNNN.tmp/`
//! in the member folder, which is then renamed to `ckpt-NNNNNN/`. A folder under its final
//! name is therefore always complete and consistent: a crash between any two writes leaves
//! the previous epoch's checkpoint as the newest, and resuming from it repeats the epoch.
//! Older checkpoints are deleted after the rename.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::evaluate::EpochRecord;

/// Weights of the last epoch.
pub const WEIGHTS: &str = "weights.safetensors";
/// Momentum buffers.
pub const OPTIM: &str = "optim.safetensors";
/// Weights of the selected (best) epoch so far.
pub const BEST: &str = "best.safetensors";
/// [`MemberState`].
pub const STATE: &str = "state.json";

/// What a checkpoint's `state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    /// Epochs trained.
    pub epochs_done: usize,
    /// Every epoch's record.
    pub history: Vec<EpochRecord>,
    /// The selected epoch (1-based).
    pub best_epoch: usize,
    /// Its selection score.
    pub best_score: f64,
    /// Dropout RNG (seed, position).
    pub dropout_rng: ([u8; 32], u128),
    /// Relation-subset RNG, for heads that sample subsets.
    pub sampler_rng: Option<([u8; 32], u128)>,
}

/// A hook called after each write of a commit with its name (`weights`, `optim`, `best`,
/// `state`, `rename`); an error it returns aborts the commit there. Tests inject faults
/// with it.
pub type FaultHook<'a> = Option<&'a dyn Fn(&str) -> Result<()>>;

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source: e,
    }
}

fn dir_name(epoch: usize) -> String {
    format!("ckpt-{epoch:06}")
}

/// The newest complete checkpoint of `member_dir`: its epoch and folder.
pub fn latest(member_dir: &Path) -> Result<Option<(usize, PathBuf)>> {
    let rd = match std::fs::read_dir(member_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(member_dir, e)),
    };
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in rd {
        let entry = entry.map_err(|e| io(member_dir, e))?;
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ckpt-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(e, _)| epoch > *e) {
            best = Some((epoch, entry.path()));
        }
    }
    Ok(best)
}

/// Deletes unfinished commits (`.ckpt-*.tmp`) left by a crash.
pub fn remove_unfinished(member_dir: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(member_dir) else {
        return Ok(());
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".ckpt-") && name.ends_with(".tmp") {
            std::fs::remove_dir_all(entry.path()).map_err(|e| io(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// What one epoch commits.
pub struct Commit<'a> {
    /// The model's variables.
    pub vars: &'a VarMap,
    /// The optimizer's momentum buffers.
    pub optim: &'a std::collections::HashMap<String, Tensor>,
    /// Whether this epoch is the new best (else the previous checkpoint's best is kept).
    pub improved: bool,
    /// The state after the epoch (`epochs_done` names the checkpoint).
    pub state: &'a MemberState,
}

/// Writes `c` as `ckpt-<epochs_done>/` in one atomic rename, then deletes older checkpoints.
pub fn commit(member_dir: &Path, c: &Commit<'_>, fault: FaultHook<'_>) -> Result<PathBuf> {
    let hook = |what: &str| fault.map_or(Ok(()), |f| f(what));
    let epoch = c.state.epochs_done;
    let previous = latest(member_dir)?;
    let tmp = member_dir.join(format!(".{}.tmp", dir_name(epoch)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    c.vars.save(tmp.join(WEIGHTS))?;
    hook("weights")?;
    candle_core::safetensors::save(c.optim, tmp.join(OPTIM))?;
    hook("optim")?;
    match (&previous, c.improved) {
        (Some((_, prev)), false) if prev.join(BEST).exists() => {
            let (from, to) = (prev.join(BEST), tmp.join(BEST));
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(|e| io(&to, e))?;
            }
        }
        _ => c.vars.save(tmp.join(BEST))?,
    }
    hook("best")?;
    let json = serde_json::to_vec_pretty(c.state).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(tmp.join(STATE), json).map_err(|e| io(&tmp.join(STATE), e))?;
    for f in [WEIGHTS, OPTIM, BEST, STATE] {
        let p = tmp.join(f);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&p, e))?;
    }
    hook("state")?;
    let dest = member_dir.join(dir_name(epoch));
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
    if let Ok(d) = std::fs::File::open(member_dir) {
        let _ = d.sync_all();
    }
    hook("rename")?;
    // Older checkpoints are no longer needed.
    if let Ok(rd) = std::fs::read_dir(member_dir) {
        for entry in rd.flatten() {
            let name = entry.file_name();
            let old = name
                .to_str()
                .and_then(|n| n.strip_prefix("ckpt-"))
                .and_then(|n| n.parse::<usize>().ok());
            if old.is_some_and(|e| e < epoch) {
                std::fs::remove_dir_all(entry.path()).map_err(|e| io(&entry.path(), e))?;
            }
        }
    }
    Ok(dest)
}

/// Reads a checkpoint's state.
pub fn read_state(ckpt: &Path) -> Result<MemberState> {
    let p = ckpt.join(STATE);
    let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// Loads a checkpoint's momentum buffers.
pub fn read_optim(
    ckpt: &Path,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(ckpt.join(OPTIM), device)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;

    fn state(epoch: usize) -> MemberState {
        MemberState {
            epochs_done: epoch,
            history: Vec::new(),
            best_epoch: epoch,
            best_score: epoch as f64,
            dropout_rng: ([epoch as u8; 32], epoch as u128),
            sampler_rng: None,
        }
    }

    fn weights(vm: &VarMap) -> Vec<f32> {
        vm.all_vars()[0]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn set(vm: &VarMap, v: f32) {
        let var = &vm.all_vars()[0];
        var.set(&(var.as_tensor().ones_like().unwrap() * f64::from(v)).unwrap())
            .unwrap();
    }

    #[test]
    fn a_fault_between_any_two_writes_leaves_the_previous_epoch_whole() {
        let dir = tempfile::tempdir().unwrap();
        let vm = VarMap::new();
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)
            .get((2, 3), "w")
            .unwrap();
        let optim = |v: f32| {
            std::collections::HashMap::from([(
                "w".to_string(),
                Tensor::full(v, (2, 3), &Device::Cpu).unwrap(),
            )])
        };
        // Epoch 1, committed whole: weights 1, momentum 10, the best so far.
        let commit_epoch_1 = || {
            set(&vm, 1.0);
            let (o1, s1) = (optim(10.0), state(1));
            let c = Commit {
                vars: &vm,
                optim: &o1,
                improved: true,
                state: &s1,
            };
            commit(dir.path(), &c, None).unwrap();
        };
        commit_epoch_1();
        for point in ["weights", "optim", "best", "state", "rename"] {
            set(&vm, 2.0);
            let (o2, s2) = (optim(20.0), state(2));
            let fail = |what: &str| {
                if what == point {
                    Err(Error::Config(format!("injected fault after {what}")))
                } else {
                    Ok(())
                }
            };
            let err = commit(
                dir.path(),
                &Commit {
                    vars: &vm,
                    optim: &o2,
                    improved: false,
                    state: &s2,
                },
                Some(&fail),
            );
            assert!(err.is_err(), "{point}");
            remove_unfinished(dir.path()).unwrap();
            let (epoch, ckpt) = latest(dir.path()).unwrap().unwrap();
            // After the rename the new epoch is complete; before it the old one is intact.
            let want = if point == "rename" { 2 } else { 1 };
            assert_eq!(epoch, want, "fault after {point}");
            let st = read_state(&ckpt).unwrap();
            assert_eq!(st, state(want), "fault after {point}");
            let o = read_optim(&ckpt, &Device::Cpu).unwrap();
            let ov: Vec<f32> = o["w"].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(ov, vec![10.0 * want as f32; 6], "fault after {point}");
            let check = VarMap::new();
            VarBuilder::from_varmap(&check, DType::F32, &Device::Cpu)
                .get((2, 3), "w")
                .unwrap();
            let mut c = check.clone();
            c.load(ckpt.join(WEIGHTS)).unwrap();
            assert_eq!(weights(&check), vec![want as f32; 6], "fault after {point}");
            // The best weights are epoch 1's in both cases (epoch 2 did not improve).
            c.load(ckpt.join(BEST)).unwrap();
            assert_eq!(weights(&check), vec![1.0; 6], "fault after {point}");
            if point != "rename" {
                assert!(!dir.path().join("ckpt-000002").exists());
                assert!(!dir.path().join(".ckpt-000002.tmp").exists());
            }
            // Start the next round from epoch 1 again.
            if point == "rename" {
                std::fs::remove_dir_all(dir.path().join("ckpt-000002")).unwrap();
            }
            if latest(dir.path()).unwrap().is_none() {
                commit_epoch_1();
            }
        }
    }
}
