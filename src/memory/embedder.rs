//! The embedding model (fastembed, all-MiniLM-L6-v2 int8, ONNX Runtime
//! loaded dynamically) on a dedicated thread: the async runtime never runs
//! inference. If files are missing or broken, the embedder says exactly
//! what and how to fetch them, and every request gets that message.
//!
//! The ONNX Runtime library is native code, so where it is loaded from is
//! fixed when the process starts ([`Embedder::start`]): `ORT_DYLIB_PATH` if
//! set then, else `libonnxruntime.so` in the `memory.model_dir` of the
//! start. A later `memory.model_dir` change (`update_config`, over the
//! wire) moves only the model files; a library in the new folder is never
//! loaded. To use another library, change the files and restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use fastembed::{
    InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel,
};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::index::DIM;

/// The files `memory.model_dir` must hold.
pub const MODEL_FILES: &[&str] = &[
    "model.onnx",
    "tokenizer.json",
    "config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
];
/// The ONNX Runtime library, in the start `model_dir` unless
/// `ORT_DYLIB_PATH` names one (see [`library_path`]).
pub const ORT_LIBRARY: &str = "libonnxruntime.so";
/// Token limit per text (longer texts are truncated by the tokenizer).
const MAX_TOKENS: usize = 256;

#[derive(Debug, Clone)]
pub enum Status {
    Loading,
    Ready { model_id: String },
    Unavailable(String),
}

enum Job {
    Embed {
        texts: Vec<String>,
        reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
    },
    Load(PathBuf),
}

const STOPPED: &str = "the embedding thread stopped; restart the server";

/// A handle to the embedding thread (cheap to clone).
#[derive(Clone)]
pub struct Embedder {
    tx: std::sync::mpsc::SyncSender<Job>,
    status: Arc<RwLock<Status>>,
    /// The ONNX Runtime library, fixed at start.
    library: Arc<Path>,
}

/// Where the ONNX Runtime library is loaded from, for an embedder started
/// on `start_dir`: `ORT_DYLIB_PATH` as set now, else `start_dir/libonnxruntime.so`.
/// Resolved once per embedder, at its start.
pub fn library_path(start_dir: &Path) -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| start_dir.join(ORT_LIBRARY))
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("status", &self.status())
            .finish()
    }
}

fn how_to_fetch(dir: &Path) -> String {
    format!(
        "run `scripts/fetch-models.sh {}` (see README: memory)",
        dir.display()
    )
}

/// ONNX Runtime allows one environment per process (and one library): made
/// once, from the first library path, and shared by every model load.
fn ort_environment(lib: &Path) -> Result<ort::environment::Environment, String> {
    static ENV: std::sync::Mutex<Option<ort::environment::Environment>> =
        std::sync::Mutex::new(None);
    let mut env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    // A missing or too-old library would panic inside ort at first use:
    // load it here, where a problem is an error (and is retried next time).
    let made = ort::init_from(lib)
        .map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {}: {e}; it must be version 1.24 or later",
                lib.display()
            )
        })?
        .build()
        .map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
    *env = Some(made.clone());
    Ok(made)
}

/// Loads the model files from `dir` with the ONNX Runtime library `lib`
/// (fixed at start), or says what is wrong.
fn load(dir: &Path, lib: &Path) -> Result<(TextEmbedding, String), String> {
    let missing: Vec<&str> = MODEL_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "missing {} in {}",
            missing.join(", "),
            dir.display()
        ));
    }
    if !lib.is_file() {
        problems.push(format!(
            "missing the ONNX Runtime library {} (its path is fixed when the server starts: \
             ORT_DYLIB_PATH, else the memory.model_dir of the start; put it there and restart)",
            lib.display()
        ));
    }
    if !problems.is_empty() {
        return Err(format!(
            "the embedding model is not available: {}; {}",
            problems.join("; "),
            how_to_fetch(dir)
        ));
    }
    let env = ort_environment(lib)?;
    let read = |f: &str| {
        std::fs::read(dir.join(f))
            .map_err(|e| format!("cannot read {}: {e}", dir.join(f).display()))
    };
    let onnx = read("model.onnx")?;
    let model_id = format!(
        "all-MiniLM-L6-v2-int8:{}",
        &hex::encode(Sha256::digest(&onnx))[..12]
    );
    let tokenizer = TokenizerFiles {
        tokenizer_file: read("tokenizer.json")?,
        config_file: read("config.json")?,
        special_tokens_map_file: read("special_tokens_map.json")?,
        tokenizer_config_file: read("tokenizer_config.json")?,
    };
    // Mean pooling: without it fastembed uses CLS pooling, wrong for MiniLM.
    let model = UserDefinedEmbeddingModel::new(onnx, tokenizer).with_pooling(Pooling::Mean);
    let opts = InitOptionsUserDefined::new()
        .with_max_length(MAX_TOKENS)
        .with_environment(env);
    let mut te = TextEmbedding::try_new_from_user_defined(model, opts).map_err(|e| {
        format!(
            "cannot load the embedding model from {}: {e}; {}",
            dir.display(),
            how_to_fetch(dir)
        )
    })?;
    // A smoke test: the right dimension and a unit vector.
    let v = te
        .embed(vec!["ready"], None)
        .map_err(|e| format!("the embedding model does not run: {e}"))?;
    if v.first().map(Vec::len) != Some(DIM) {
        return Err(format!(
            "the model in {} does not produce {DIM}-dimensional vectors",
            dir.display()
        ));
    }
    Ok((te, model_id))
}

fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

impl Embedder {
    /// Starts the thread and begins loading from `dir`. The ONNX Runtime
    /// library path is resolved here, once ([`library_path`]).
    pub fn start(dir: PathBuf) -> Embedder {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(256);
        let status = Arc::new(RwLock::new(Status::Loading));
        let st = status.clone();
        let library: Arc<Path> = library_path(&dir).into();
        let lib = library.clone();
        std::thread::Builder::new()
            .name("embedder".into())
            .spawn(move || {
                let mut model: Option<TextEmbedding> = None;
                let set = |s: Status| *st.write().unwrap_or_else(|p| p.into_inner()) = s;
                let load_from = |dir: &Path, model: &mut Option<TextEmbedding>| {
                    *model = None;
                    set(Status::Loading);
                    let started = std::time::Instant::now();
                    match std::panic::catch_unwind(|| load(dir, &lib)) {
                        Ok(Ok((m, id))) => {
                            tracing::info!(model = %id, dir = %dir.display(), ms = started.elapsed().as_millis() as u64, "embedding model loaded");
                            *model = Some(m);
                            set(Status::Ready { model_id: id });
                        }
                        Ok(Err(msg)) => {
                            tracing::warn!("{msg}");
                            set(Status::Unavailable(msg));
                        }
                        Err(_) => set(Status::Unavailable(format!("loading the embedding model from {} crashed; {}", dir.display(), how_to_fetch(dir)))),
                    }
                };
                load_from(&dir, &mut model);
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Load(dir) => load_from(&dir, &mut model),
                        Job::Embed { texts, reply } => {
                            let out = match model.as_mut() {
                                None => Err(match &*st.read().unwrap_or_else(|p| p.into_inner()) {
                                    Status::Unavailable(m) => m.clone(),
                                    _ => "the embedding model is not loaded".to_string(),
                                }),
                                Some(m) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.embed(&texts, None))) {
                                    Ok(Ok(vs)) => Ok(vs.into_iter().map(normalise).collect()),
                                    Ok(Err(e)) => Err(format!("embedding failed: {e}")),
                                    Err(_) => Err("embedding failed (the model crashed)".to_string()),
                                },
                            };
                            let _ = reply.send(out);
                        }
                    }
                }
            })
            .expect("spawn embedder thread");
        Embedder {
            tx,
            status,
            library,
        }
    }

    /// The ONNX Runtime library this embedder loads (fixed at start).
    pub fn library(&self) -> &Path {
        &self.library
    }

    pub fn status(&self) -> Status {
        self.status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads the model files from another folder (after `memory.model_dir`
    /// changed); the library stays the one fixed at start. Requests made
    /// after this call wait behind the load (in order on the embedder
    /// thread) instead of seeing the old status.
    pub fn reload(&self, dir: PathBuf) {
        use std::sync::mpsc::TrySendError;
        let set = |st: &RwLock<Status>, s: Status| {
            *st.write().unwrap_or_else(|p| p.into_inner()) = s;
        };
        set(&self.status, Status::Loading);
        // The load job must arrive, or the status would stay "loading".
        match self.tx.try_send(Job::Load(dir)) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                let (tx, status) = (self.tx.clone(), self.status.clone());
                std::thread::spawn(move || {
                    if tx.send(job).is_err() {
                        set(&status, Status::Unavailable(STOPPED.into()));
                    }
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                set(&self.status, Status::Unavailable(STOPPED.into()))
            }
        }
    }

    /// Embeds texts in one batch; vectors are L2-normalised.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.clone();
        let job = Job::Embed { texts, reply };
        // `send` blocks only while 256 jobs are queued: do it off the runtime.
        tokio::task::spawn_blocking(move || tx.send(job))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the embedder stopped".to_string())?;
        rx.await.map_err(|_| "the embedder stopped".to_string())?
    }

    /// Blocking form for the CLI.
    pub fn embed_blocking(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Embed { texts, reply })
            .map_err(|_| "the embedder stopped".to_string())?;
        rx.blocking_recv()
            .map_err(|_| "the embedder stopped".to_string())?
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    fn embedder(capacity: usize) -> (Embedder, std::sync::mpsc::Receiver<Job>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        let e = Embedder {
            tx,
            status: Arc::new(RwLock::new(Status::Ready {
                model_id: "m".into(),
            })),
            library: Arc::from(Path::new("/nonexistent")),
        };
        (e, rx)
    }

    #[test]
    fn a_reload_is_never_lost_in_a_full_queue() {
        let (e, rx) = embedder(1);
        e.reload("a".into());
        e.reload("b".into()); // the queue is full: delivered when room frees
        assert!(matches!(e.status(), Status::Loading));
        let first = rx.recv().unwrap();
        let second = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert!(
            matches!((first, second), (Job::Load(a), Job::Load(b)) if a == Path::new("a") && b == Path::new("b"))
        );
    }

    #[test]
    fn a_reload_with_no_thread_says_so_instead_of_loading_forever() {
        let (e, rx) = embedder(1);
        drop(rx);
        e.reload("a".into());
        assert!(matches!(e.status(), Status::Unavailable(m) if m.contains("restart")));
    }
}
