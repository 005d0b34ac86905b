//! Output buffers shared by parallel tasks that each write their own disjoint part.
//!
//! [`SendPtr`] is the raw form the GEMM uses inside this room; [`ColumnBlocks`] is the safe form
//! for callers outside it: a row-major `[rows, width]` buffer cut into blocks of columns, each
//! block claimed by at most one task.
//! Invariants: a block can be claimed once per [`ColumnBlocks`] (a second claim panics), a
//! claimed block hands out one row slice at a time, and every slice is bounds-checked against the
//! buffer it came from, so no two live `&mut` slices overlap.
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

/// An output buffer's pointer shared by parallel tasks that each write their own disjoint part.
/// Whoever writes through it states which part it owns.
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only written through by tasks owning disjoint ranges of the buffer,
// which outlives the parallel loop that shares it.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// A row-major `[rows, width]` buffer written by parallel tasks, block `b` of `block` columns
/// (`b * block..`, the last block possibly narrower) by the task that claimed it.
pub struct ColumnBlocks<'a> {
    ptr: SendPtr,
    rows: usize,
    width: usize,
    block: usize,
    claimed: Vec<AtomicBool>,
    _buf: PhantomData<&'a mut [f32]>,
}

impl<'a> ColumnBlocks<'a> {
    /// `buf` holds `rows * width` values; blocks are `block` columns wide (`block > 0`).
    pub fn new(buf: &'a mut [f32], rows: usize, width: usize, block: usize) -> Self {
        assert!(block > 0 && buf.len() == rows * width, "a [{rows}, {width}] buffer of {} values", buf.len());
        let claimed = (0..width.div_ceil(block)).map(|_| AtomicBool::new(false)).collect();
        Self { ptr: SendPtr(buf.as_mut_ptr()), rows, width, block, claimed, _buf: PhantomData }
    }

    /// Takes block `b` for writing. Panics if `b` is out of range or was claimed before.
    pub fn claim(&self, b: usize) -> ColumnBlock<'_, 'a> {
        assert!(!self.claimed[b].swap(true, Ordering::AcqRel), "column block {b} claimed twice");
        let c0 = b * self.block;
        ColumnBlock { owner: self, c0, w: (self.width - c0).min(self.block) }
    }
}

/// One claimed block of columns of a [`ColumnBlocks`] buffer.
pub struct ColumnBlock<'b, 'a> {
    owner: &'b ColumnBlocks<'a>,
    c0: usize,
    w: usize,
}

impl ColumnBlock<'_, '_> {
    /// The block's columns of row `r` (one live slice at a time: it borrows the block mutably).
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        let o = self.owner;
        assert!(r < o.rows, "row {r} of {}", o.rows);
        // SAFETY: `r * width + c0 + w <= rows * width` (checked above and at construction), the
        // buffer outlives `'a`, and this block's columns of this row are written only through this
        // claimed block (claims are exclusive), one slice at a time (`&mut self`).
        unsafe { std::slice::from_raw_parts_mut(o.ptr.0.add(r * o.width + self.c0), self.w) }
    }

    /// The block's columns of up to `N` distinct rows at once (`None` asks for none). Panics if a
    /// row is out of range or asked for twice.
    pub fn rows_many<const N: usize>(&mut self, rows: [Option<usize>; N]) -> [Option<&mut [f32]>; N] {
        let o = self.owner;
        for (i, r) in rows.iter().enumerate() {
            if let Some(r) = *r {
                assert!(r < o.rows, "row {r} of {}", o.rows);
                assert!(!rows[..i].contains(&Some(r)), "row {r} asked for twice");
            }
        }
        // SAFETY: every row is in range (so its `w` columns from `c0` are inside the buffer, as in
        // `row_mut`) and distinct (checked above), so the slices do not overlap; they borrow the
        // claimed block mutably, as `row_mut`'s does.
        rows.map(|r| r.map(|r| unsafe { std::slice::from_raw_parts_mut(o.ptr.0.add(r * o.width + self.c0), self.w) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "claimed twice")]
    fn a_block_is_claimed_once() {
        let mut buf = vec![0f32; 12];
        let blocks = ColumnBlocks::new(&mut buf, 3, 4, 3);
        let _a = blocks.claim(1);
        let _b = blocks.claim(1);
    }

    #[test]
    #[should_panic(expected = "asked for twice")]
    fn a_row_is_handed_out_once_at_a_time() {
        let mut buf = vec![0f32; 12];
        let blocks = ColumnBlocks::new(&mut buf, 3, 4, 2);
        let mut b = blocks.claim(0);
        let _ = b.rows_many([Some(1), None, Some(1)]);
    }

    #[test]
    fn blocks_write_their_own_columns() {
        let mut buf = vec![0f32; 3 * 5];
        {
            let blocks = ColumnBlocks::new(&mut buf, 3, 5, 2);
            for b in 0..3 {
                let mut blk = blocks.claim(b);
                for r in 0..3 {
                    blk.row_mut(r).iter_mut().for_each(|v| *v = (10 * r + b) as f32);
                }
            }
        }
        assert_eq!(buf, vec![0., 0., 1., 1., 2., 10., 10., 11., 11., 12., 20., 20., 21., 21., 22.]);
        {
            let blocks = ColumnBlocks::new(&mut buf, 3, 5, 2);
            let mut blk = blocks.claim(2);
            let [a, b, c] = blk.rows_many([Some(2), None, Some(0)]);
            assert!(b.is_none());
            a.unwrap()[0] = -2.0;
            c.unwrap()[0] = -1.0;
        }
        assert_eq!(buf[4], -1.0);
        assert_eq!(buf[14], -2.0);
    }
}
