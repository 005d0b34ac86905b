//! Tests of the pickle pre-scan: hand-assembled opcode streams against the limits and against
//! candle's own reader.
use super::*;

/// `\x80\x02` then `body` then STOP.
fn pkl(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, 2];
    v.extend_from_slice(body);
    v.push(b'.');
    v
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

/// `]q\0` then `rounds` x (`h\0 h\0 TUPLE2 q\0`): each round doubles the memo'd object.
fn memo_bomb(rounds: usize) -> Vec<u8> {
    let mut b = b"]q\x00".to_vec();
    for _ in 0..rounds {
        b.extend_from_slice(b"h\x00h\x00\x86q\x00");
    }
    pkl(&b)
}

/// A torch-style state dict with one tensor, memoizing like the pickler does.
fn small_state_dict() -> Vec<u8> {
    let mut b = b"}q\x00(".to_vec();
    b.extend(unicode("w"));
    b.extend_from_slice(b"q\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((");
    b.extend(unicode("storage"));
    b.extend_from_slice(b"q\x03ctorch\nFloatStorage\nq\x04");
    b.extend(unicode("0"));
    b.extend(unicode("cpu"));
    b.extend_from_slice(b"K\x06tq\x05QK\x00K\x02K\x03\x86q\x06K\x03K\x01\x86q\x07\x89ccollections\nOrderedDict\nq\x08)Rq\ttq\nRq\x0b");
    // A list of ints, memoized while empty, and a memo copy of it.
    b.extend(unicode("steps"));
    b.extend_from_slice(b"]q\x0c(K\x01K\x02K\x03e");
    b.extend(unicode("again"));
    b.extend_from_slice(b"h\x0cu");
    pkl(&b)
}

fn candle_parse(bytes: &[u8]) -> candle_core::Result<Object> {
    let mut s = Stack::empty();
    s.read_loop(&mut std::io::Cursor::new(bytes))?;
    s.finalize()
}

#[test]
fn a_memo_bomb_is_refused_quickly() {
    // 40 rounds would copy ~2^41 nodes; the scan stops when the budget is crossed.
    let t = std::time::Instant::now();
    let r = scan(&memo_bomb(40));
    assert!(matches!(r, Err(Refusal::CopyBudget { max: MAX_COPIED_NODES, .. })), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("memo deep-copy bomb"));
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    // A few rounds are fine, and the estimate bounds candle's actual copies.
    let s = scan(&memo_bomb(5)).unwrap();
    assert!(s.copied_nodes < 1000, "{s:?}");
    candle_parse(&memo_bomb(5)).unwrap();
    // A small budget refuses at the first round over it.
    let r = scan_with(&memo_bomb(10), Limits { max_copied_nodes: 100, ..Limits::default() });
    assert!(matches!(r, Err(Refusal::CopyBudget { .. })), "{r:?}");
}

#[test]
fn a_big_memoized_string_counts_by_its_bytes() {
    let mut b = unicode(&"x".repeat(64 * 1000));
    b.extend_from_slice(b"q\x00");
    for _ in 0..20 {
        b.extend_from_slice(b"h\x00");
    }
    let s = scan_with(&pkl(&b), Limits { max_copied_nodes: 1_000_000, ..Limits::default() }).unwrap();
    assert_eq!(s.copied_nodes, 21 * 1001);
    let r = scan_with(&pkl(&b), Limits { max_copied_nodes: 20_000, ..Limits::default() });
    assert!(matches!(r, Err(Refusal::CopyBudget { .. })), "{r:?}");
}

#[test]
fn a_normal_pickle_is_accepted_and_candle_agrees() {
    let p = small_state_dict();
    let s = scan(&p).unwrap();
    assert!(s.copied_nodes < 100 && s.depth <= 6, "{s:?}");
    let obj = candle_parse(&p).unwrap();
    assert!(matches!(obj, Object::Dict(ref d) if d.len() == 3), "{obj:?}");
    // Bytes after STOP are ignored (as candle ignores them).
    let mut q = p.clone();
    q.extend_from_slice(b"\xff\xff");
    assert_eq!(scan(&q).unwrap(), s);
}

#[test]
fn truncated_input_is_refused() {
    let p = small_state_dict();
    for cut in 0..p.len() {
        let r = scan(&p[..cut]);
        assert!(matches!(r, Err(Refusal::Truncated { .. } | Refusal::NoStop { .. })), "cut at {cut}: {r:?}");
        assert!(candle_parse(&p[..cut]).is_err(), "candle also refuses a cut at {cut}");
    }
    // A string claiming 4 GiB, and a GLOBAL without its newline.
    assert!(matches!(scan(b"\x80\x02X\xff\xff\xff\xff"), Err(Refusal::Truncated { offset: 2, opcode: b'X' })));
    assert!(matches!(scan(b"\x80\x02ctorch\nSize"), Err(Refusal::Truncated { opcode: b'c', .. })));
    assert!(matches!(scan(b""), Err(Refusal::NoStop { len: 0 })));
}

#[test]
fn unknown_opcodes_and_stack_errors_are_refused() {
    // Protocol 4 FRAME and SHORT_BINUNICODE are not read by candle.
    assert!(matches!(scan(b"\x80\x04\x95"), Err(Refusal::UnknownOpcode { offset: 2, opcode: 0x95 })));
    assert!(matches!(scan(&pkl(b"\x8c\x01a")), Err(Refusal::UnknownOpcode { opcode: 0x8c, .. })));
    for (body, what) in [
        (&b"h\x05"[..], "never set"),
        (b"t", "no MARK"),
        (b"a", "empty stack"),
        (b")K\x01a", "non-list"),
        (b"](K\x01u", "non-dict"),
        (b"}(K\x01u", "odd number"),
        (b"\x8a\x09\x01\x01\x01\x01\x01\x01\x01\x01\x01", "LONG1"),
        (b"X\x01\x00\x00\x00\xff", "UTF-8"),
    ] {
        let r = scan(&pkl(body));
        assert!(matches!(&r, Err(Refusal::Invalid { reason, .. }) if reason.contains(what)), "{what}: {r:?}");
        assert!(what == "LONG1" || candle_parse(&pkl(body)).is_err(), "candle also refuses ({what})");
    }
    assert!(matches!(scan(b"."), Err(Refusal::Invalid { .. })));
}

#[test]
fn deep_nesting_is_refused() {
    let mut b = b"N".to_vec();
    b.extend(std::iter::repeat_n(0x85u8, 100_000));
    assert!(matches!(scan(&pkl(&b)), Err(Refusal::TooDeep { max: MAX_DEPTH, .. })));
    // Through lists and memo gets too.
    let mut b = b"]q\x00".to_vec();
    for _ in 0..200 {
        b.extend_from_slice(b"]h\x00aq\x00");
    }
    assert!(matches!(scan(&pkl(&b)), Err(Refusal::TooDeep { .. })));
    let mut b = b"N".to_vec();
    b.extend(std::iter::repeat_n(0x85u8, 50));
    assert_eq!(scan(&pkl(&b)).unwrap().depth, 51);
}

#[test]
fn dict_factories_and_dict_opcode_follow_candle() {
    // OrderedDict() reduces to a dict, so SETITEMS on it is fine; another class's call is not a dict.
    let mut ok = b"ccollections\nOrderedDict\n)R(".to_vec();
    ok.extend(unicode("k"));
    ok.extend_from_slice(b"K\x01u");
    scan(&pkl(&ok)).unwrap();
    candle_parse(&pkl(&ok)).unwrap();
    let bad = b"ctorch\nSize\n)R(K\x01K\x02u";
    assert!(scan(&pkl(bad)).is_err() && candle_parse(&pkl(bad)).is_err());
    // `d` pushes an empty dict without consuming the mark (candle's reading).
    let d = b"(K\x01K\x02d";
    let s = scan(&pkl(d)).unwrap();
    assert!(matches!(candle_parse(&pkl(d)).unwrap(), Object::Dict(ref v) if v.is_empty()));
    assert_eq!(s.opcodes, 6);
}

#[test]
fn candle_handles_the_deepest_accepted_object_on_a_small_stack() {
    // 10 000 levels abort the process on a 2 MiB stack (candle's recursive clone / Debug /
    // drop); MAX_DEPTH levels must be fine, with a wide margin, on a quarter of that.
    let mut b = b"N".to_vec();
    b.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH as usize - 1));
    let p = pkl(&b);
    assert_eq!(scan(&p).unwrap().depth, MAX_DEPTH);
    let t = std::thread::Builder::new().stack_size(512 << 10).spawn(move || {
        let o = candle_parse(&p).unwrap();
        let c = o.clone();
        assert!(c == o && format!("{c:?}").len() > MAX_DEPTH as usize);
    });
    t.unwrap().join().unwrap();
}
