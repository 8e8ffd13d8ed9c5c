//! Crash-safe checkpoint directories.
//!
//! A run directory `OUT` holds at most one checkpoint, `OUT/ckpt/`:
//! `config.json` + `model.safetensors` (+ `tokenizer.json`) — a complete model
//! directory — plus `optimizer.safetensors` (AdamW moments) and `trainer.json`
//! ([`TrainerState`]). It is never modified in place. Saving:
//!
//! 1. write everything into `OUT/ckpt.tmp-<pid>/`, fsync every file and the directory;
//! 2. if `OUT/ckpt` exists: delete a stale `OUT/ckpt.prev`, rename `ckpt` -> `ckpt.prev`;
//! 3. rename `ckpt.tmp-<pid>` -> `ckpt`, fsync `OUT`;
//! 4. delete `ckpt.prev` (renamed to a temporary name first, so that a kill during the
//!    deletion leaves no half-deleted `ckpt.prev`).
//!
//! A kill at any moment leaves `ckpt` or `ckpt.prev` complete: loading takes `ckpt` when
//! it exists, else `ckpt.prev`, and never looks at `ckpt.tmp-*` (a resumed run deletes
//! those). `ckpt.prev` is only deleted while a complete `ckpt` exists. The same protocol
//! writes the final model directory (`OUT/final`).

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};

pub const CKPT_DIR: &str = "ckpt";
pub const PREV_SUFFIX: &str = ".prev";
pub const TMP_INFIX: &str = ".tmp-";
pub const TRAINER_FILE: &str = "trainer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// `format` of trainer.json.
pub const TRAINER_FORMAT: &str = "kf-trainer-v1";

/// Identity of the token data a run trained on (from the shards' meta.json).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataId {
    pub tokenizer_sha256: String,
    pub corpus_sha256: String,
    pub train_tokens: u64,
    pub val_tokens: u64,
}

/// `trainer.json`: everything besides tensors that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// [`TRAINER_FORMAT`].
    pub format: String,
    /// What was trained ("teacher"; distillation stages name themselves).
    pub kind: String,
    /// Completed updates.
    pub step: u64,
    pub seed: u64,
    /// The training configuration, as parsed (its JSON form).
    pub config: serde_json::Value,
    pub data: DataId,
    pub best_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    /// Bytes of metrics.jsonl that belong to steps `<= step` (a resumed run truncates to it).
    pub metrics_bytes: u64,
    pub tokens_seen: u64,
    /// Wall time spent in the run so far (all sessions).
    pub elapsed_s: f64,
    /// Worker threads of the run that wrote it (bit-exact resume needs the same count).
    pub threads: usize,
}

impl TrainerState {
    /// Reads and checks `dir/trainer.json`; errors name the file.
    pub fn read(dir: &Path) -> Result<TrainerState> {
        let p = dir.join(TRAINER_FILE);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("checkpoint {}: cannot read", p.display()))?;
        let s: TrainerState = super::from_json_named(&text)
            .with_context(|| format!("checkpoint {}: not a valid trainer state", p.display()))?;
        ensure!(
            s.format == TRAINER_FORMAT,
            "checkpoint {}: format {:?}, expected {TRAINER_FORMAT:?}",
            p.display(),
            s.format
        );
        ensure!(
            s.elapsed_s.is_finite() && s.elapsed_s >= 0.0,
            "checkpoint {}: elapsed_s {} is not a duration",
            p.display(),
            s.elapsed_s
        );
        Ok(s)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join(TRAINER_FILE);
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(&p, json).with_context(|| format!("cannot write {}", p.display()))
    }
}

fn named(out: &Path, name: &str, suffix: &str) -> PathBuf {
    out.join(format!("{name}{suffix}"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// fsync every regular file directly inside `dir`, then `dir`.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            File::open(e.path())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot fsync {}", e.path().display()))?;
        }
    }
    sync_dir(dir)
}

/// Writes the directory `out/name` atomically (see the module docs): `fill` writes the
/// files into a fresh temporary directory. Returns `out/name`.
pub fn write_dir_atomic(
    out: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let tmp = named(out, name, &format!("{TMP_INFIX}{}", std::process::id()));
    let dst = out.join(name);
    let prev = named(out, name, PREV_SUFFIX);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let res = (|| -> Result<()> {
        fill(&tmp)?;
        sync_tree(&tmp)?;
        if dst.exists() {
            if prev.exists() {
                remove_dir_atomic(&prev)?;
            }
            std::fs::rename(&dst, &prev).with_context(|| {
                format!("cannot rename {} to {}", dst.display(), prev.display())
            })?;
        }
        std::fs::rename(&tmp, &dst)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dst.display()))?;
        sync_dir(out)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot save {}", dst.display())));
    }
    if prev.exists() {
        remove_dir_atomic(&prev)?;
    }
    Ok(dst)
}

/// Deletes a directory so that a kill midway never leaves a half-deleted directory under
/// its name (a `ckpt.prev` without its tokenizer.json, found by tools/tests/crash_resume.rs):
/// it is first renamed to a temporary name (`<name>.tmp-del-<pid>`, removed by
/// [`remove_stale_temps`] if the deletion is cut short), then deleted.
fn remove_dir_atomic(dir: &Path) -> Result<()> {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{TMP_INFIX}del-{}", std::process::id()));
    let trash = dir.with_file_name(name);
    if trash.exists() {
        std::fs::remove_dir_all(&trash)
            .with_context(|| format!("cannot remove {}", trash.display()))?;
    }
    std::fs::rename(dir, &trash)
        .with_context(|| format!("cannot rename {} to {}", dir.display(), trash.display()))?;
    std::fs::remove_dir_all(&trash).with_context(|| format!("cannot remove {}", trash.display()))
}

/// The checkpoint to resume from: `out/ckpt`, else `out/ckpt.prev` (left by a crash
/// between the two renames), else none. Temporary directories are never returned.
pub fn find(out: &Path) -> Option<PathBuf> {
    let d = out.join(CKPT_DIR);
    if d.is_dir() {
        return Some(d);
    }
    let p = named(out, CKPT_DIR, PREV_SUFFIX);
    p.is_dir().then_some(p)
}

/// The checkpoint a run into `out` continues: `None` for a fresh run (`resume` off and no
/// checkpoint, or `resume` on and none yet); an error when `out` holds one and `resume` is
/// off (a finished or interrupted run is never overwritten by accident).
pub fn resume_dir(out: &Path, resume: bool) -> Result<Option<PathBuf>> {
    let found = find(out);
    if let (Some(f), false) = (&found, resume) {
        bail!(
            "{} already holds a checkpoint ({}): pass --resume to continue it, or choose another --out",
            out.display(),
            f.display()
        );
    }
    Ok(if resume { found } else { None })
}

/// A checkpoint's `trainer.json`, checked to belong to this run: its `kind` (teacher,
/// distill-kN), its training data (`data`, from `data_path`), and every file a resume reads.
pub fn resume_state(
    dir: &Path,
    kind: &str,
    data: &DataId,
    data_path: &Path,
) -> Result<TrainerState> {
    let st = TrainerState::read(dir)?;
    let tj = dir.join(TRAINER_FILE);
    ensure!(
        st.kind == kind,
        "checkpoint {}: kind {:?}, but this run is {kind:?}",
        tj.display(),
        st.kind
    );
    ensure!(
        &st.data == data,
        "checkpoint {} was trained on other data than {} (tokenizer, corpus or token counts differ)",
        tj.display(),
        data_path.display()
    );
    check_files(dir, &["config.json", "model.safetensors", OPTIMIZER_FILE])?;
    Ok(st)
}

/// Deletes what killed runs leave in `out`: `*.tmp-<pid>` directories and `*.tmp`
/// files (the temporaries of `loss.svg` and `summary.json`).
pub fn remove_stale_temps(out: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type()?;
        if name.contains(TMP_INFIX) && ft.is_dir() {
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("cannot remove stale {}", e.path().display()))?;
        } else if name.ends_with(".tmp") && ft.is_file() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove stale {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Checks that `dir` holds every file of a checkpoint; errors name the missing one.
pub fn check_files(dir: &Path, files: &[&str]) -> Result<()> {
    for f in files {
        let p = dir.join(f);
        if !p.is_file() {
            bail!("checkpoint {}: {} is missing", dir.display(), p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_one_complete_directory() {
        let out = std::env::temp_dir().join(format!("kf-ckpt-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        assert!(find(&out).is_none());
        for i in 0..3 {
            write_dir_atomic(&out, CKPT_DIR, |d| {
                std::fs::write(d.join("x"), format!("{i}"))?;
                Ok(())
            })
            .unwrap();
            let c = find(&out).unwrap();
            assert_eq!(
                std::fs::read_to_string(c.join("x")).unwrap(),
                format!("{i}")
            );
        }
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["ckpt".to_string()]);
        // a failing fill leaves the previous checkpoint and no temporary directory
        let e = write_dir_atomic(&out, CKPT_DIR, |_| bail!("disk full")).unwrap_err();
        assert!(format!("{e:#}").contains("disk full"));
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
        // crash between the renames: only ckpt.prev (+ a temp dir) -> prev is found
        std::fs::rename(out.join("ckpt"), out.join("ckpt.prev")).unwrap();
        std::fs::create_dir_all(out.join("ckpt.tmp-999")).unwrap();
        std::fs::write(out.join("loss.svg.tmp"), "x").unwrap();
        assert_eq!(find(&out).unwrap(), out.join("ckpt.prev"));
        remove_stale_temps(&out).unwrap();
        assert!(!out.join("ckpt.tmp-999").exists() && !out.join("loss.svg.tmp").exists());
        write_dir_atomic(&out, CKPT_DIR, |d| Ok(std::fs::write(d.join("x"), "3")?)).unwrap();
        assert_eq!(find(&out).unwrap(), out.join("ckpt"));
        assert!(!out.join("ckpt.prev").exists());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
