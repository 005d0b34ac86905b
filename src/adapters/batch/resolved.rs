//! One lookup of a layer group's deltas per batch step, shared by every pass over them.
//!
//! Invariant: [`Resolved`] lists, for every chunk and target, exactly the parts of the chunk's
//! composition that have a delta for the target, in the composition's order (so a row's sum
//! does not depend on which pass reads it, nor on its batch neighbours).
use std::ops::Range;

use crate::adapters::composition::Composition;
use crate::adapters::module_deltas::MatrixDelta;
use crate::adapters::target::Target;

/// The deltas of a layer group, looked up once per call: for every chunk and target, the
/// `(matrix, scale)` of each part of the chunk's composition that has a delta there, in the
/// composition's order. Every later pass (which targets are touched, the sparse plan, the
/// prefetches, the kernels) reads this instead of looking each module's map up again. Before,
/// five passes looked up every (chunk, part, target); the first of them missed the cache in maps
/// that the step's factor reads had just evicted (`lora32` on one thread: the lookups took about
/// 0.8 ms of a 43 ms decode step, and the delta closure 7.1-7.5 ms per step against 7.2-8.2 before,
/// four interleaved pairs).
pub(super) struct Resolved<'m> {
    pub(super) entries: Vec<(&'m MatrixDelta, f32)>,
    /// `[chunk][target]` ranges into `entries` (every chunk, in order).
    ranges: Vec<Range<usize>>,
    targets: usize,
}

impl<'m> Resolved<'m> {
    pub(super) fn new(chunks: &[(usize, usize, Option<&'m Composition>)], targets: &[Target]) -> Self {
        let mut entries = Vec::new();
        let mut ranges = Vec::with_capacity(chunks.len() * targets.len());
        for &(_, _, comp) in chunks {
            for t in targets {
                let from = entries.len();
                if let Some(c) = comp {
                    entries.extend(c.parts.iter().filter_map(|(d, s)| d.targets.get(t).map(|m| (m, *s))));
                }
                ranges.push(from..entries.len());
            }
        }
        Self { entries, ranges, targets: targets.len() }
    }

    /// Where chunk `ci`'s deltas for target `ti` are in `entries`.
    pub(super) fn range(&self, ci: usize, ti: usize) -> Range<usize> {
        self.ranges[ci * self.targets + ti].clone()
    }

    /// Chunk `ci`'s deltas for target `ti`.
    pub(super) fn of(&self, ci: usize, ti: usize) -> &[(&'m MatrixDelta, f32)] {
        &self.entries[self.range(ci, ti)]
    }

    /// Every chunk's deltas for target `ti`, chunk by chunk.
    fn column(&self, ti: usize) -> impl Iterator<Item = &[(&'m MatrixDelta, f32)]> {
        self.ranges.iter().skip(ti).step_by(self.targets.max(1)).map(|r| &self.entries[r.clone()])
    }

    /// Whether some chunk has a delta for target `ti`.
    pub(super) fn touched(&self, ti: usize) -> bool {
        self.column(ti).any(|d| !d.is_empty())
    }

    /// Whether some chunk has a sparse delta for target `ti`.
    pub(super) fn any_sparse(&self, ti: usize) -> bool {
        self.column(ti).any(|d| d.iter().any(|(m, _)| matches!(m, MatrixDelta::Sparse(_))))
    }

    /// The same lookups for the targets `keep` (indices, in order) only.
    pub(super) fn only(self, keep: &[usize]) -> Self {
        let chunks = self.ranges.len() / self.targets.max(1);
        let ranges = (0..chunks)
            .flat_map(|ci| keep.iter().map(move |&ti| (ci, ti)))
            .map(|(ci, ti)| self.ranges[ci * self.targets + ti].clone())
            .collect();
        Self { entries: self.entries, ranges, targets: keep.len() }
    }
}
