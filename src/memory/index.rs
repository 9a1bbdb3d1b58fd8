//! The in-memory vector index: every memory's embedding in one contiguous
//! `f32` array, scanned exactly for top-k by dot product (vectors are
//! L2-normalised, so dot = cosine). SQLite stays the source of truth; the
//! index is loaded at start and kept in step with writes.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

/// Embedding dimension of all-MiniLM-L6-v2.
pub const DIM: usize = 384;

#[derive(Default)]
pub struct VectorIndex {
    ids: Vec<Arc<str>>,
    vecs: Vec<f32>,
    pos: HashMap<Arc<str>, usize>,
    /// The highest SQLite rowid loaded (for picking up rows other processes add).
    pub max_rowid: i64,
}

impl std::fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorIndex")
            .field("len", &self.len())
            .finish()
    }
}

/// A scored candidate; ordered so the heap's top is the worst kept.
struct Scored(f32, usize);
impl PartialEq for Scored {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reverse: BinaryHeap is a max-heap and we want to pop the lowest score.
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}

impl VectorIndex {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.pos.contains_key(id)
    }

    /// Adds (or replaces) a vector. `vec` must have `DIM` elements.
    pub fn insert(&mut self, id: &str, vec: &[f32]) {
        assert_eq!(vec.len(), DIM, "embedding dimension");
        if let Some(&i) = self.pos.get(id) {
            self.vecs[i * DIM..(i + 1) * DIM].copy_from_slice(vec);
            return;
        }
        let id: Arc<str> = id.into();
        self.pos.insert(id.clone(), self.ids.len());
        self.ids.push(id);
        self.vecs.extend_from_slice(vec);
    }

    /// Removes a vector (swapping the last one into its place).
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(i) = self.pos.remove(id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        if i != last {
            self.ids.swap(i, last);
            let (head, tail) = self.vecs.split_at_mut(last * DIM);
            head[i * DIM..(i + 1) * DIM].copy_from_slice(&tail[..DIM]);
            self.pos.insert(self.ids[i].clone(), i);
        }
        self.ids.pop();
        self.vecs.truncate(last * DIM);
        true
    }

    /// The `k` best (id, cosine) by exact scan, best first. Large indexes
    /// are scanned in parallel, one slice per core (the scan is bound by
    /// memory bandwidth; each core adds some).
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(Arc<str>, f32)> {
        assert_eq!(query.len(), DIM, "query dimension");
        if k == 0 {
            return Vec::new();
        }
        let n = self.len();
        let threads = if n >= PARALLEL_FROM {
            std::thread::available_parallelism()
                .map_or(1, |t| t.get())
                .min(8)
        } else {
            1
        };
        let mut out: Vec<Scored> = if threads <= 1 {
            top_k(&self.vecs, 0, query, k)
        } else {
            let per = n.div_ceil(threads);
            std::thread::scope(|scope| {
                let parts: Vec<_> = (0..threads)
                    .map(|t| {
                        let (lo, hi) = ((t * per).min(n), ((t + 1) * per).min(n));
                        let slice = &self.vecs[lo * DIM..hi * DIM];
                        scope.spawn(move || top_k(slice, lo, query, k))
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|h| h.join().expect("scan thread"))
                    .collect()
            })
        };
        out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        out.truncate(k);
        out.into_iter()
            .map(|Scored(s, i)| (self.ids[i].clone(), s.clamp(-1.0, 1.0)))
            .collect()
    }
}

/// Indexes at least this large are scanned on several threads.
const PARALLEL_FROM: usize = 32_768;

/// The best `k` of `vecs` (whose first vector is number `base`), unordered.
fn top_k(vecs: &[f32], base: usize, query: &[f32], k: usize) -> Vec<Scored> {
    let mut heap: BinaryHeap<Scored> = BinaryHeap::with_capacity(k + 1);
    for (i, v) in vecs.chunks_exact(DIM).enumerate() {
        let s = dot(query, v);
        if heap.len() < k {
            heap.push(Scored(s, base + i));
        } else if heap.peek().is_some_and(|w| s > w.0) {
            heap.pop();
            heap.push(Scored(s, base + i));
        }
    }
    heap.into_vec()
}

/// Dot product: AVX2+FMA when the CPU has them (checked at run time), else
/// a portable loop with 8 independent accumulators that the compiler
/// vectorises with SSE.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: every load reads 8 floats at i < n - 15 (or n - 7) from slices of length >= n.
    unsafe {
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            i += 8;
        }
        let s = _mm256_add_ps(s0, s1);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        let mut total: f32 = lanes.iter().sum();
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut v: Vec<f32> = (0..DIM)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect();
        let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.iter_mut().for_each(|a| *a /= n);
        v
    }

    #[test]
    fn dot_paths_agree() {
        let (a, b) = (unit(1), unit(2));
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-5);
        assert!((dot_portable(&a, &b) - naive).abs() < 1e-5);
    }

    #[test]
    fn parallel_scan_matches_the_serial_one() {
        let mut idx = VectorIndex::default();
        for i in 0..(PARALLEL_FROM as u64 + 1000) {
            idx.insert(&format!("m{i}"), &unit(i));
        }
        let q = unit(123_456);
        let par = idx.search(&q, 25);
        let serial: Vec<(usize, f32)> = {
            let mut v: Vec<Scored> = top_k(&idx.vecs, 0, &q, 25);
            v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            v.into_iter().map(|Scored(s, i)| (i, s)).collect()
        };
        assert_eq!(par.len(), 25);
        for ((id, s), (i, s2)) in par.iter().zip(&serial) {
            assert_eq!(&**id, &*idx.ids[*i]);
            assert!((s - s2).abs() < 1e-6);
        }
    }

    #[test]
    fn exact_top_k_matches_a_full_sort_and_survives_removal() {
        let mut idx = VectorIndex::default();
        for i in 0..500u64 {
            idx.insert(&format!("m{i}"), &unit(i + 10));
        }
        let q = unit(7);
        let mut all: Vec<(String, f32)> = (0..500u64)
            .map(|i| (format!("m{i}"), dot(&q, &unit(i + 10))))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        let got: Vec<String> = idx
            .search(&q, 10)
            .into_iter()
            .map(|(id, _)| id.to_string())
            .collect();
        let want: Vec<String> = all[..10].iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(got, want);
        assert!(idx.remove(&want[0]));
        assert!(!idx.remove(&want[0]));
        let got: Vec<String> = idx
            .search(&q, 3)
            .into_iter()
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(got, want[1..4].to_vec());
        assert_eq!(idx.len(), 499);
        idx.insert("m1", &unit(99));
        assert_eq!(idx.len(), 499, "replacing keeps one entry");
    }
}
