//! Linear pre-scan of pickle bytes before candle's pickle reader (`candle_core::pickle::Stack`)
//! parses them, so a small hostile file cannot make the parse take gigabytes or minutes.
//!
//! candle's reader deep-copies an object on every memo put and memo get (BINPUT / LONG_BINPUT /
//! BINGET / LONG_BINGET), so a ~200-byte pickle that memo-puts and gets a growing tuple doubles its
//! size per round ("memo deep-copy bomb"). Its objects are also recursive Rust values, so a pickle
//! that nests containers a million levels deep overflows the thread stack when candle drops, clones,
//! compares or prints it, which aborts the process (no `catch_unwind` can contain that).
//!
//! [`scan`] walks the opcode stream once without building objects. It mirrors candle 0.11's
//! reader: the same opcode set (what `candle_core::pickle::OpCode` accepts, a subset of protocols
//! 2-5; `DICT` is read as an empty dict like candle does), the same argument sizes, and the same
//! stack discipline (marks, lists, dicts, `collections.OrderedDict` / `defaultdict` reduced to an
//! empty dict), tracking for every stack item and memo slot only its kind, an upper bound on its
//! size in nodes (a container is 1 + the sum of its items; a string weighs 1 + len / 64, since a
//! node is roughly 64 bytes of candle memory) and its nesting depth.
//!
//! Invariants:
//! - Every pickle byte this crate gives candle was accepted by [`scan`] first: the loaders go
//!   through [`parse`], which scans and then parses the very same bytes (never a path candle would
//!   re-read).
//! - An accepted pickle makes candle copy at most [`MAX_COPIED_NODES`] nodes on memo operations and
//!   nest objects at most [`MAX_DEPTH`] levels; every other step of candle's parse is linear in the
//!   input, so an accepted parse is linear in the input plus that budget.
//! - The scan itself is linear in the input (each opcode does O(1) work, plus the items a MARK pop
//!   removes) and uses memory proportional to the stack and memo sizes, never to object sizes.
//! - A refusal is a [`Refusal`] (unknown or truncated opcode, a stack error candle would also hit,
//!   the copy budget, the depth limit) naming the byte offset; loaders turn it into
//!   `AdapterError::Malformed` (code `adapter_malformed`) naming the file and the archive entry.
//! - It may refuse a pickle candle would parse only when that parse is over budget; it refuses a
//!   structurally broken pickle that candle would also refuse (with a clearer message, and before
//!   candle formats a possibly huge object into its error).
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::pickle::{Object, Stack};

use crate::adapters::error::{guard_parser, AdapterError};

/// Most nodes candle may copy on memo puts and gets in one pickle. Real checkpoints memoize small
/// objects (strings, globals, tuples of a tensor's rebuild arguments, containers while still
/// empty), a few nodes per tensor; the kit's composable-sft diffs copy about 5 000.
pub const MAX_COPIED_NODES: u64 = 10_000_000;

/// Deepest nesting of objects accepted. torch checkpoints nest fewer than 10 levels (dict ->
/// rebuild call -> argument tuple -> storage reference -> tuple -> class); candle's recursive drop,
/// clone and `Debug` of a much deeper object can overflow a 2 MiB thread stack.
pub const MAX_DEPTH: u32 = 100;

/// Largest pickle (`data.pkl`) read from a torch.save archive. A checkpoint's pickle holds only
/// names, shapes and storage references (tensor bytes live in their own entries): a few hundred
/// bytes per tensor, under 1 MB for every real adapter. Reading stops here, so an entry that
/// inflates to gigabytes from a small file costs at most this much memory.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Reads archive entry `name` of a torch.save zip, at most `cap` bytes after decompression. An
/// entry that inflates past `cap` is refused after `cap + 1` bytes were read (a zip bomb costs at
/// most `cap`), and the buffer reserved up front is bounded by `cap`, never by the size the
/// archive claims.
pub fn read_zip_entry<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    cap: u64,
    path: &Path,
) -> Result<Vec<u8>, AdapterError> {
    use std::io::Read;
    let bad = |reason: String| AdapterError::Malformed { path: path.into(), reason };
    let f = zip.by_name(name).map_err(|e| bad(format!("archive entry `{name}`: {e}")))?;
    let mut buf = Vec::with_capacity(f.size().min(cap).min(64 << 20) as usize);
    f.take(cap.saturating_add(1)).read_to_end(&mut buf).map_err(|e| bad(format!("archive entry `{name}` is unreadable: {e}")))?;
    if buf.len() as u64 > cap {
        return Err(bad(format!("archive entry `{name}` inflates past {cap} bytes, more than its contents can need: refused")));
    }
    Ok(buf)
}

/// Bytes of string data counted as one node.
const BYTES_PER_NODE: u64 = 64;

/// What [`scan_with`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See [`MAX_COPIED_NODES`].
    pub max_copied_nodes: u64,
    /// See [`MAX_DEPTH`].
    pub max_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_copied_nodes: MAX_COPIED_NODES, max_depth: MAX_DEPTH }
    }
}

/// What an accepted pickle will cost candle (upper bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scan {
    /// Opcodes up to and including STOP.
    pub opcodes: u64,
    /// Nodes the parse materializes, memo copies included.
    pub nodes: u64,
    /// Nodes copied by memo puts and gets.
    pub copied_nodes: u64,
    /// Deepest nesting seen.
    pub depth: u32,
}

/// Why a pickle was refused; `offset` is the byte offset of the opcode concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An opcode candle's reader does not know (or a protocol 4/5 opcode it does not support).
    UnknownOpcode { offset: usize, opcode: u8 },
    /// The argument of the opcode at `offset` runs past the end of the data.
    Truncated { offset: usize, opcode: u8 },
    /// The data ends before a STOP opcode.
    NoStop { len: usize },
    /// A step candle's reader would fail on (empty stack, no mark, missing memo slot, ...).
    Invalid { offset: usize, reason: String },
    /// Memo copies would exceed [`Limits::max_copied_nodes`].
    CopyBudget { offset: usize, copied: u64, max: u64 },
    /// Objects would nest deeper than [`Limits::max_depth`].
    TooDeep { offset: usize, max: u32 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOpcode { offset, opcode } => {
                write!(f, "unknown or unsupported pickle opcode 0x{opcode:02x} at byte {offset}")
            }
            Self::Truncated { offset, opcode } => {
                write!(f, "truncated: the argument of opcode 0x{opcode:02x} at byte {offset} runs past the end")
            }
            Self::NoStop { len } => write!(f, "truncated: no STOP opcode in its {len} bytes"),
            Self::Invalid { offset, reason } => write!(f, "{reason} (opcode at byte {offset})"),
            Self::CopyBudget { offset, copied, max } => write!(
                f,
                "memo deep-copy bomb: memo gets/puts up to byte {offset} would copy {copied} objects, more than the limit of {max}"
            ),
            Self::TooDeep { offset, max } => {
                write!(f, "objects nested more than {max} levels deep (opcode at byte {offset})")
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// Scans `bytes` with the default [`Limits`].
pub fn scan(bytes: &[u8]) -> Result<Scan, Refusal> {
    scan_with(bytes, Limits::default())
}

/// Scans `bytes` up to its STOP opcode (trailing bytes are ignored, as candle ignores them).
pub fn scan_with(bytes: &[u8], limits: Limits) -> Result<Scan, Refusal> {
    Scanner { b: bytes, pos: 0, at: 0, op: 0, stack: Vec::new(), memo: HashMap::new(), limits, out: Scan::default() }.run()
}

/// [`scan`] for entry `entry` of the archive at `path`, refusals as `Malformed` naming both.
pub fn check(path: &Path, entry: &str, bytes: &[u8]) -> Result<Scan, AdapterError> {
    scan(bytes).map_err(|r| AdapterError::Malformed { path: path.into(), reason: format!("pickle `{entry}` refused before parsing: {r}") })
}

/// Checks `bytes` (entry `entry` of the archive at `path`) with [`check`], then parses the same
/// bytes with candle's reader (a panic in it becomes `Malformed`). The one way pickle bytes reach
/// candle in this crate.
pub fn parse(path: &Path, entry: &str, bytes: &[u8]) -> Result<Object, AdapterError> {
    check(path, entry, bytes)?;
    let corrupt = |e: candle_core::Error| AdapterError::Malformed { path: path.into(), reason: format!("corrupt pickle `{entry}`: {e}") };
    guard_parser(path, "pickle", || {
        let mut stack = Stack::empty();
        stack.read_loop(&mut std::io::Cursor::new(bytes)).map_err(corrupt)?;
        stack.finalize().map_err(corrupt)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mark,
    List,
    Dict,
    /// The class `collections.OrderedDict` or `collections.defaultdict` (candle reduces a call of
    /// it to an empty dict).
    DictFactory,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Item {
    kind: Kind,
    size: u64,
    depth: u32,
}

impl Item {
    fn leaf(kind: Kind, data_bytes: usize) -> Self {
        Self { kind, size: 1 + data_bytes as u64 / BYTES_PER_NODE, depth: 1 }
    }
}

/// A container summary: total size and deepest depth of some items.
#[derive(Default)]
struct Sum {
    size: u64,
    depth: u32,
    count: usize,
}

impl Sum {
    fn add(&mut self, i: Item) {
        self.size = self.size.saturating_add(i.size);
        self.depth = self.depth.max(i.depth);
        self.count += 1;
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    pos: usize,
    /// Offset and byte of the opcode being read.
    at: usize,
    op: u8,
    stack: Vec<Item>,
    memo: HashMap<u32, Item>,
    limits: Limits,
    out: Scan,
}

impl Scanner<'_> {
    fn run(mut self) -> Result<Scan, Refusal> {
        loop {
            let Some(&op) = self.b.get(self.pos) else { return Err(Refusal::NoStop { len: self.b.len() }) };
            (self.at, self.op) = (self.pos, op);
            self.pos += 1;
            self.out.opcodes += 1;
            if self.step(op)? {
                return Ok(self.out);
            }
        }
    }

    fn invalid<T>(&self, reason: impl Into<String>) -> Result<T, Refusal> {
        Err(Refusal::Invalid { offset: self.at, reason: reason.into() })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Refusal> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(Refusal::Truncated { offset: self.at, opcode: self.op })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Refusal> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// A `\n`-terminated line without the `\n` (and a `\r` before it), as candle's `GLOBAL` reads.
    fn line(&mut self) -> Result<&[u8], Refusal> {
        let rest = &self.b[self.pos..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or(Refusal::Truncated { offset: self.at, opcode: self.op })?;
        self.pos += n + 1;
        let l = &rest[..n];
        Ok(l.strip_suffix(b"\r").unwrap_or(l))
    }

    fn check_depth(&self, depth: u32) -> Result<(), Refusal> {
        if depth > self.limits.max_depth {
            return Err(Refusal::TooDeep { offset: self.at, max: self.limits.max_depth });
        }
        Ok(())
    }

    /// Pushes an item the parse creates (one new node over what `item` already counts, or all of
    /// a leaf's weight).
    fn push_new(&mut self, item: Item, new_nodes: u64) -> Result<(), Refusal> {
        self.check_depth(item.depth)?;
        self.out.depth = self.out.depth.max(item.depth);
        self.out.nodes = self.out.nodes.saturating_add(new_nodes);
        self.stack.push(item);
        Ok(())
    }

    fn leaf(&mut self, kind: Kind, data_bytes: usize) -> Result<(), Refusal> {
        let item = Item::leaf(kind, data_bytes);
        self.push_new(item, item.size)
    }

    /// A new container holding the items of `s`.
    fn container(&mut self, kind: Kind, s: Sum) -> Result<(), Refusal> {
        self.push_new(Item { kind, size: s.size.saturating_add(1), depth: s.depth.saturating_add(1) }, 1)
    }

    fn pop(&mut self) -> Result<Item, Refusal> {
        match self.stack.pop() {
            Some(i) => Ok(i),
            None => self.invalid("pops an empty stack"),
        }
    }

    /// Pops the items above the topmost mark, and the mark.
    fn pop_to_mark(&mut self) -> Result<Sum, Refusal> {
        let Some(m) = self.stack.iter().rposition(|i| i.kind == Kind::Mark) else {
            return self.invalid("no MARK on the stack");
        };
        let mut s = Sum::default();
        self.stack.drain(m + 1..).for_each(|i| s.add(i));
        self.stack.pop();
        Ok(s)
    }

    /// Adds the items of `s` to the container on top of the stack, which must be of `kind`.
    fn extend_top(&mut self, kind: Kind, s: Sum) -> Result<(), Refusal> {
        let max = self.limits.max_depth;
        let Some(top) = self.stack.last_mut() else { return self.invalid("pops an empty stack") };
        if top.kind != kind {
            let what = if kind == Kind::List { "appends to a non-list" } else { "sets items of a non-dict" };
            return self.invalid(what);
        }
        top.size = top.size.saturating_add(s.size);
        top.depth = top.depth.max(s.depth.saturating_add(1));
        let depth = top.depth;
        if depth > max {
            return Err(Refusal::TooDeep { offset: self.at, max });
        }
        self.out.depth = self.out.depth.max(depth);
        Ok(())
    }

    /// Counts a deep copy of `item` (memo put or get) against the budget.
    fn copy(&mut self, item: Item) -> Result<(), Refusal> {
        self.out.copied_nodes = self.out.copied_nodes.saturating_add(item.size);
        self.out.nodes = self.out.nodes.saturating_add(item.size);
        if self.out.copied_nodes > self.limits.max_copied_nodes {
            return Err(Refusal::CopyBudget { offset: self.at, copied: self.out.copied_nodes, max: self.limits.max_copied_nodes });
        }
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> Result<(), Refusal> {
        let Some(&top) = self.stack.last() else { return self.invalid("memo put with an empty stack") };
        self.copy(top)?;
        self.memo.insert(id, top);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<(), Refusal> {
        let Some(&item) = self.memo.get(&id) else { return self.invalid(format!("memo get of slot {id}, which was never set")) };
        self.copy(item)?;
        self.push_new(item, 0)
    }

    /// Reads one opcode's argument and applies it; true at STOP.
    fn step(&mut self, op: u8) -> Result<bool, Refusal> {
        match op {
            // PROTO
            0x80 => {
                self.u8()?;
            }
            // GLOBAL
            b'c' => {
                let module = self.line()?.to_vec();
                let class = self.line()?;
                let factory = module == b"collections" && (class == b"OrderedDict" || class == b"defaultdict");
                let n = module.len() + class.len();
                self.leaf(if factory { Kind::DictFactory } else { Kind::Other }, n)?;
            }
            // BININT1, BININT2, BININT, BINFLOAT
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                self.take(n)?;
                self.leaf(Kind::Other, 0)?;
            }
            // LONG1: candle shifts each byte by 8 * i as i64, which overflows past 8 bytes.
            0x8a => {
                let n = self.u8()? as usize;
                if n > 8 {
                    return self.invalid(format!("LONG1 of {n} bytes (at most 8 are supported)"));
                }
                self.take(n)?;
                self.leaf(Kind::Other, 0)?;
            }
            // BINUNICODE
            b'X' => {
                let n = self.u32()? as usize;
                let s = self.take(n)?;
                if std::str::from_utf8(s).is_err() {
                    return self.invalid("BINUNICODE string is not valid UTF-8");
                }
                self.leaf(Kind::Other, n)?;
            }
            // BINPERSID
            b'Q' => {
                let id = self.pop()?;
                let mut s = Sum::default();
                s.add(id);
                self.container(Kind::Other, s)?;
            }
            // TUPLE
            b't' => {
                let s = self.pop_to_mark()?;
                self.container(Kind::Other, s)?;
            }
            // TUPLE1, TUPLE2, TUPLE3
            0x85..=0x87 => {
                let mut s = Sum::default();
                for _ in 0..(op - 0x84) {
                    let i = self.pop()?;
                    s.add(i);
                }
                self.container(Kind::Other, s)?;
            }
            // NEWTRUE, NEWFALSE, NONE, EMPTY_TUPLE
            0x88 | 0x89 | b'N' | b')' => self.leaf(Kind::Other, 0)?,
            // EMPTY_DICT, and DICT, which candle reads as EMPTY_DICT (the mark and items stay).
            b'}' | b'd' => self.leaf(Kind::Dict, 0)?,
            // EMPTY_LIST
            b']' => self.leaf(Kind::List, 0)?,
            // MARK
            b'(' => self.leaf(Kind::Mark, 0)?,
            // APPEND
            b'a' => {
                let v = self.pop()?;
                let mut s = Sum::default();
                s.add(v);
                self.extend_top(Kind::List, s)?;
            }
            // APPENDS
            b'e' => {
                let s = self.pop_to_mark()?;
                self.extend_top(Kind::List, s)?;
            }
            // SETITEM
            b's' => {
                let mut s = Sum::default();
                s.add(self.pop()?);
                s.add(self.pop()?);
                self.extend_top(Kind::Dict, s)?;
            }
            // SETITEMS
            b'u' => {
                let s = self.pop_to_mark()?;
                if self.stack.last().is_some_and(|t| t.kind == Kind::Dict) && s.count % 2 != 0 {
                    return self.invalid("SETITEMS with an odd number of items");
                }
                self.extend_top(Kind::Dict, s)?;
            }
            // BUILD: dict.update when both are dicts, else a Build node.
            b'b' => {
                let args = self.pop()?;
                let obj = self.pop()?;
                if obj.kind == Kind::Dict && args.kind == Kind::Dict {
                    let item = Item {
                        kind: Kind::Dict,
                        size: obj.size.saturating_add(args.size).saturating_sub(1),
                        depth: obj.depth.max(args.depth),
                    };
                    self.push_new(item, 0)?;
                } else {
                    let mut s = Sum::default();
                    s.add(obj);
                    s.add(args);
                    self.container(Kind::Other, s)?;
                }
            }
            // REDUCE: a call of OrderedDict / defaultdict is an empty dict, else a Reduce node.
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                if callable.kind == Kind::DictFactory {
                    self.leaf(Kind::Dict, 0)?;
                } else {
                    let mut s = Sum::default();
                    s.add(callable);
                    s.add(args);
                    self.container(Kind::Other, s)?;
                }
            }
            // NEWOBJ
            0x81 => {
                let mut s = Sum::default();
                s.add(self.pop()?);
                s.add(self.pop()?);
                self.container(Kind::Other, s)?;
            }
            // BINGET, LONG_BINGET
            b'h' => {
                let id = self.u8()? as u32;
                self.memo_get(id)?;
            }
            b'j' => {
                let id = self.u32()?;
                self.memo_get(id)?;
            }
            // BINPUT, LONG_BINPUT
            b'q' => {
                let id = self.u8()? as u32;
                self.memo_put(id)?;
            }
            b'r' => {
                let id = self.u32()?;
                self.memo_put(id)?;
            }
            // STOP: candle's `finalize` pops the result.
            b'.' => {
                if self.stack.is_empty() {
                    return self.invalid("STOP with an empty stack");
                }
                return Ok(true);
            }
            _ => return Err(Refusal::UnknownOpcode { offset: self.at, opcode: op }),
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
