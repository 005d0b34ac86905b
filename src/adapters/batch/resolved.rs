//! One lookup of a layer group's deltas per batch step, shared by every pass over them, through a
//! dense index of the step's modules built once per step.
//!
//! Invariant: [`Resolved`] lists, for every chunk and target, exactly the parts of the chunk's
//! composition that have a delta for the target, in the composition's order (so a row's sum
//! does not depend on which pass reads it, nor on its batch neighbours).
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::adapters::composition::Composition;
use crate::adapters::module_deltas::{MatrixDelta, ModuleDeltas};
use crate::adapters::target::Target;
use crate::kernels::lowrank::CompactRef;
use crate::model::linear::Proj;

/// The linear deltas of a step's distinct modules in one table, target-major: row
/// `layer * 9 + proj` holds every module's delta for that target side by side, so one layer
/// group's lookups for the whole batch read a few adjacent lines. Looking each (chunk, part,
/// target) up in the modules' own maps descended several tree nodes per lookup, and those
/// nodes had usually been evicted by the step's factor reads since the layer before.
/// Built once per step by walking every distinct module's map in order.
pub(super) struct StepIndex<'m> {
    /// Per chunk, the table column of each part of its composition (empty without one).
    cols: Vec<Vec<u32>>,
    /// Distinct modules of the step (columns).
    modules: usize,
    /// Target rows in the table.
    rows: usize,
    /// `[row][module]`.
    table: Vec<Option<&'m MatrixDelta>>,
    /// `[row][module]`: the compact factors of `table`'s delta there, where the CPU runs the
    /// compact kernel on them.
    compact: Vec<Option<CompactRef<'m>>>,
}

/// The table row of a linear target (None for the embedding and the output head).
fn row_of(t: &Target) -> Option<usize> {
    match t {
        Target::Linear(id) => Some(id.layer * Proj::ALL.len() + id.proj as usize),
        _ => None,
    }
}

impl<'m> StepIndex<'m> {
    pub(super) fn new(chunks: &[(usize, usize, Option<&'m Composition>)]) -> Self {
        let mut columns: HashMap<*const ModuleDeltas, u32> = HashMap::new();
        let mut modules: Vec<&'m ModuleDeltas> = Vec::new();
        let cols = chunks
            .iter()
            .map(|&(_, _, comp)| {
                comp.map_or_else(Vec::new, |c| {
                    c.parts
                        .iter()
                        .map(|(m, _)| {
                            *columns.entry(Arc::as_ptr(m)).or_insert_with(|| {
                                modules.push(m);
                                (modules.len() - 1) as u32
                            })
                        })
                        .collect()
                })
            })
            .collect();
        let rows = modules
            .iter()
            .filter_map(|m| m.targets.range(..Target::Embedding).next_back().and_then(|(t, _)| row_of(t)))
            .max()
            .map_or(0, |r| r + 1);
        let mut table = vec![None; rows * modules.len()];
        let int8 = crate::kernels::cpu().int8_avx2;
        for (col, m) in modules.iter().enumerate() {
            for (t, d) in m.targets.range(..Target::Embedding) {
                if let Some(r) = row_of(t) {
                    table[r * modules.len() + col] = Some(d);
                    if let (MatrixDelta::Packed(h), true) = (d, int8) {
                        h.prefetch_fields();
                    }
                }
            }
        }
        // (A second pass: the first asked for every packed delta's fields, so their misses
        // overlap instead of coming one by one.)
        let compact = table
            .iter()
            .map(|d| match d {
                Some(MatrixDelta::Packed(h)) if int8 => h.compact(),
                _ => None,
            })
            .collect();
        Self { cols, modules: modules.len(), rows, table, compact }
    }

    /// Chunk `ci`'s part `pi`'s delta for `t`, if it has one, with its compact factors where the
    /// compact kernel runs on them.
    fn get(&self, ci: usize, pi: usize, comp: &'m Composition, t: &Target) -> Option<(&'m MatrixDelta, Option<CompactRef<'m>>)> {
        match row_of(t) {
            Some(r) if r < self.rows => {
                let at = r * self.modules + self.cols[ci][pi] as usize;
                self.table[at].map(|d| (d, self.compact[at]))
            }
            Some(_) => None,
            None => comp.parts[pi].0.targets.get(t).map(|d| (d, None)),
        }
    }
}

/// The deltas of a layer group, looked up once per call through the step's [`StepIndex`]: for
/// every chunk and target, the `(matrix, scale)` of each part of the chunk's composition that
/// has a delta there, in the composition's order, with its compact factors beside it. Every
/// later pass (which targets are touched, the sparse plan, the prefetches, the kernels) reads
/// this instead of looking each module's map up again.
pub(super) struct Resolved<'m> {
    pub(super) entries: Vec<(&'m MatrixDelta, f32)>,
    /// Beside each entry, its compact factors where the compact kernel runs on them.
    pub(super) compact: Vec<Option<CompactRef<'m>>>,
    /// `[chunk][target]` ranges into `entries` (every chunk, in order).
    ranges: Vec<Range<usize>>,
    targets: usize,
}

impl<'m> Resolved<'m> {
    pub(super) fn new(chunks: &[(usize, usize, Option<&'m Composition>)], index: &StepIndex<'m>, targets: &[Target]) -> Self {
        let mut entries = Vec::new();
        let mut compact = Vec::new();
        let mut ranges = Vec::with_capacity(chunks.len() * targets.len());
        for (ci, &(_, _, comp)) in chunks.iter().enumerate() {
            for t in targets {
                let from = entries.len();
                if let Some(c) = comp {
                    for (pi, (_, s)) in c.parts.iter().enumerate() {
                        if let Some((m, cr)) = index.get(ci, pi, c, t) {
                            entries.push((m, *s));
                            compact.push(cr);
                        }
                    }
                }
                ranges.push(from..entries.len());
            }
        }
        Self { entries, compact, ranges, targets: targets.len() }
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

    /// Whether entry `i` is sparse (an entry with compact factors is not: its delta is not read).
    fn is_sparse(&self, i: usize) -> bool {
        self.compact[i].is_none() && matches!(self.entries[i].0, MatrixDelta::Sparse(_))
    }

    /// Whether some chunk has a sparse delta for target `ti`.
    pub(super) fn any_sparse(&self, ti: usize) -> bool {
        self.ranges.iter().skip(ti).step_by(self.targets.max(1)).any(|r| r.clone().any(|i| self.is_sparse(i)))
    }

    /// Whether chunk `ci` has a delta other than a sparse one for target `ti`.
    pub(super) fn any_not_sparse(&self, ci: usize, ti: usize) -> bool {
        self.range(ci, ti).any(|i| !self.is_sparse(i))
    }

    /// The same lookups for the targets `keep` (indices, in order) only.
    pub(super) fn only(self, keep: &[usize]) -> Self {
        let chunks = self.ranges.len() / self.targets.max(1);
        let ranges = (0..chunks)
            .flat_map(|ci| keep.iter().map(move |&ti| (ci, ti)))
            .map(|(ci, ti)| self.ranges[ci * self.targets + ti].clone())
            .collect();
        Self { entries: self.entries, compact: self.compact, ranges, targets: keep.len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::sparse_layout::SparseMatrix;
    use crate::model::linear::LinearId;

    fn module(targets: &[Target]) -> Arc<ModuleDeltas> {
        let mut m = ModuleDeltas::default();
        for (i, &t) in targets.iter().enumerate() {
            let sp = SparseMatrix::from_flat(4, 4, &[i as u64 % 16], &[1.0 + i as f32]).unwrap();
            m.targets.insert(t, MatrixDelta::Sparse(sp));
        }
        Arc::new(m)
    }

    /// Through the step's index, every (chunk, target) lists exactly what the modules' own maps
    /// hold, in the composition's order, for linear targets of several layers (modules of
    /// different depths, a module repeated across chunks and within one composition), the
    /// embedding, and a target beyond every module's layers.
    #[test]
    fn index_lookups_equal_the_maps() {
        let lin = |layer, proj| Target::Linear(LinearId { layer, proj });
        let a = module(&[lin(0, Proj::Q), lin(0, Proj::V), lin(3, Proj::Down), Target::Embedding]);
        let b = module(&[lin(0, Proj::Q), lin(1, Proj::GateUp)]);
        let c = module(&[lin(5, Proj::O), Target::LmHead]);
        let comp = |parts: &[(&Arc<ModuleDeltas>, f32)]| Composition {
            parts: parts.iter().map(|(m, s)| (Arc::clone(m), *s)).collect(),
            pinned: Vec::new(),
            key: String::new(),
        };
        let (x, y, z) = (comp(&[(&b, 0.5), (&a, 2.0)]), comp(&[(&c, 1.0), (&a, -1.0), (&c, 3.0)]), comp(&[(&a, 1.5)]));
        let chunks: Vec<(usize, usize, Option<&Composition>)> =
            vec![(0, 1, Some(&x)), (1, 4, None), (5, 1, Some(&y)), (6, 2, Some(&z)), (8, 1, Some(&x))];
        let targets = [
            lin(0, Proj::Q),
            lin(0, Proj::K),
            lin(0, Proj::V),
            lin(1, Proj::GateUp),
            lin(3, Proj::Down),
            lin(5, Proj::O),
            lin(9, Proj::Q),
            Target::Embedding,
            Target::LmHead,
        ];
        let index = StepIndex::new(&chunks);
        let res = Resolved::new(&chunks, &index, &targets);
        let mut seen = 0;
        for (ci, &(_, _, comp)) in chunks.iter().enumerate() {
            for (ti, t) in targets.iter().enumerate() {
                let want: Vec<(*const MatrixDelta, f32)> = comp
                    .map(|c| c.parts.iter().filter_map(|(m, s)| m.targets.get(t).map(|d| (d as *const _, *s))).collect())
                    .unwrap_or_default();
                let got: Vec<(*const MatrixDelta, f32)> = res.of(ci, ti).iter().map(|&(d, s)| (d as *const _, s)).collect();
                assert_eq!(got, want, "chunk {ci}, {t:?}");
                seen += want.len();
            }
        }
        assert_eq!(seen, 24, "the cases above hold deltas");
    }
}
